"""The messages of Triton's ``inference.GRPCInferenceService`` that ``device serve --grpc-port`` answers, built at run time.

The subset served (health, metadata, ``ModelInfer``, ``ModelConfig``, ``ModelStatistics``) is declared below
as plain tables with the package, message names, field names and numbers of Triton's ``grpc_service.proto``
and ``model_config.proto`` (triton-inference-server/common), so the bytes on the wire are Triton's and any
Triton client (``tritonclient.grpc``, ``perf_analyzer``, KServe clients) talks to it. Fields we never set or
read are left out; a client's message that carries them still parses (protobuf skips unknown fields).

Why descriptors built at run time (``descriptor_pb2``) rather than ``protoc``-generated ``*_pb2.py`` files:

* generated modules carry a check of the protobuf runtime they were generated for (protobuf 5.26+ refuses
  a runtime older than the generator): on a Jetson, whose protobuf comes from whatever else is installed
  (JetPack's tools, flwr), a committed ``_pb2.py`` would break ``device serve`` at import; a
  ``FileDescriptorProto`` built here works on every protobuf since 4.22 (``GetMessageClass``);
* no generated file to keep in step with a ``.proto``, no ``grpcio-tools`` in any extra;
* the tables are checked against Triton's own compiled descriptors (those ``tritonclient.grpc`` ships)
  field by field in tests/service/test_serve_grpc.py.

The classes live in a private descriptor pool, so they never clash with ``tritonclient``'s ``inference.*``
messages in one process. :data:`METHODS` maps each served RPC to its request and response message.
"""
from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "inference"
SERVICE = "GRPCInferenceService"
_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {"bool": _F.TYPE_BOOL, "string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "int32": _F.TYPE_INT32,
            "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT,
            "double": _F.TYPE_DOUBLE}

#: message -> fields ``(name, number, type[, "repeated" | "map" | oneof name])``; a type that is not a scalar
#: names a message (or the enum ``DataType``); a dotted message name is nested in the message before the dot;
#: ``map`` fields map strings to that type (Triton's ``map<string, T>``)
MESSAGES: dict[str, list[tuple[str, ...]]] = {
    # grpc_service.proto: health and metadata
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", "1", "bool")],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", "1", "bool")],
    "ModelReadyRequest": [("name", "1", "string"), ("version", "2", "string")],
    "ModelReadyResponse": [("ready", "1", "bool")],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", "1", "string"), ("version", "2", "string"),
                               ("extensions", "3", "string", "repeated")],
    "ModelMetadataRequest": [("name", "1", "string"), ("version", "2", "string")],
    "ModelMetadataResponse": [("name", "1", "string"), ("versions", "2", "string", "repeated"),
                              ("platform", "3", "string"),
                              ("inputs", "4", "ModelMetadataResponse.TensorMetadata", "repeated"),
                              ("outputs", "5", "ModelMetadataResponse.TensorMetadata", "repeated")],
    "ModelMetadataResponse.TensorMetadata": [("name", "1", "string"), ("datatype", "2", "string"),
                                             ("shape", "3", "int64", "repeated")],
    # grpc_service.proto: inference
    "InferParameter": [("bool_param", "1", "bool", "parameter_choice"),
                       ("int64_param", "2", "int64", "parameter_choice"),
                       ("string_param", "3", "string", "parameter_choice"),
                       ("double_param", "4", "double", "parameter_choice"),
                       ("uint64_param", "5", "uint64", "parameter_choice")],
    "InferTensorContents": [("bool_contents", "1", "bool", "repeated"), ("int_contents", "2", "int32", "repeated"),
                            ("int64_contents", "3", "int64", "repeated"), ("uint_contents", "4", "uint32", "repeated"),
                            ("uint64_contents", "5", "uint64", "repeated"), ("fp32_contents", "6", "float", "repeated"),
                            ("fp64_contents", "7", "double", "repeated"), ("bytes_contents", "8", "bytes", "repeated")],
    "ModelInferRequest": [("model_name", "1", "string"), ("model_version", "2", "string"), ("id", "3", "string"),
                          ("parameters", "4", "InferParameter", "map"),
                          ("inputs", "5", "ModelInferRequest.InferInputTensor", "repeated"),
                          ("outputs", "6", "ModelInferRequest.InferRequestedOutputTensor", "repeated"),
                          ("raw_input_contents", "7", "bytes", "repeated")],
    "ModelInferRequest.InferInputTensor": [("name", "1", "string"), ("datatype", "2", "string"),
                                           ("shape", "3", "int64", "repeated"),
                                           ("parameters", "4", "InferParameter", "map"),
                                           ("contents", "5", "InferTensorContents")],
    "ModelInferRequest.InferRequestedOutputTensor": [("name", "1", "string"),
                                                     ("parameters", "2", "InferParameter", "map")],
    "ModelInferResponse": [("model_name", "1", "string"), ("model_version", "2", "string"), ("id", "3", "string"),
                           ("parameters", "4", "InferParameter", "map"),
                           ("outputs", "5", "ModelInferResponse.InferOutputTensor", "repeated"),
                           ("raw_output_contents", "6", "bytes", "repeated")],
    "ModelInferResponse.InferOutputTensor": [("name", "1", "string"), ("datatype", "2", "string"),
                                             ("shape", "3", "int64", "repeated"),
                                             ("parameters", "4", "InferParameter", "map"),
                                             ("contents", "5", "InferTensorContents")],
    # grpc_service.proto: configuration and statistics
    "ModelConfigRequest": [("name", "1", "string"), ("version", "2", "string")],
    "ModelConfigResponse": [("config", "1", "ModelConfig")],
    "ModelStatisticsRequest": [("name", "1", "string"), ("version", "2", "string")],
    "ModelStatisticsResponse": [("model_stats", "1", "ModelStatistics", "repeated")],
    "StatisticDuration": [("count", "1", "uint64"), ("ns", "2", "uint64")],
    "InferStatistics": [(name, str(i), "StatisticDuration") for i, name in enumerate(
        ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"), start=1)],
    "InferBatchStatistics": [("batch_size", "1", "uint64"), ("compute_input", "2", "StatisticDuration"),
                             ("compute_infer", "3", "StatisticDuration"), ("compute_output", "4", "StatisticDuration")],
    "ModelStatistics": [("name", "1", "string"), ("version", "2", "string"), ("last_inference", "3", "uint64"),
                        ("inference_count", "4", "uint64"), ("execution_count", "5", "uint64"),
                        ("inference_stats", "6", "InferStatistics"),
                        ("batch_stats", "7", "InferBatchStatistics", "repeated")],
    # model_config.proto
    "ModelInput": [("name", "1", "string"), ("data_type", "2", "DataType"), ("dims", "4", "int64", "repeated")],
    "ModelOutput": [("name", "1", "string"), ("data_type", "2", "DataType"), ("dims", "3", "int64", "repeated")],
    "ModelDynamicBatching": [("preferred_batch_size", "1", "int32", "repeated"),
                             ("max_queue_delay_microseconds", "2", "uint64")],
    "ModelParameter": [("string_value", "1", "string")],
    "ModelConfig": [("name", "1", "string"), ("platform", "2", "string"), ("backend", "17", "string"),
                    ("max_batch_size", "4", "int32"), ("input", "5", "ModelInput", "repeated"),
                    ("output", "6", "ModelOutput", "repeated"),
                    ("dynamic_batching", "11", "ModelDynamicBatching", "scheduling_choice"),
                    ("parameters", "14", "ModelParameter", "map")],
}
#: model_config.proto's DataType
DATA_TYPES = ("TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64", "TYPE_INT8",
              "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64", "TYPE_STRING",
              "TYPE_BF16")
#: the RPCs served: method -> (request message, response message)
METHODS = {name: (f"{name}Request", f"{name}Response") for name in (
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig",
    "ModelStatistics")}


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))


def _file() -> descriptor_pb2.FileDescriptorProto:
    """The tables as one ``.proto`` file's descriptor (proto3, package ``inference``)."""
    proto = descriptor_pb2.FileDescriptorProto(name="edgexfer/inference_subset.proto", package=PACKAGE,
                                               syntax="proto3")
    enum = proto.enum_type.add(name="DataType")
    for number, name in enumerate(DATA_TYPES):
        enum.value.add(name=name, number=number)
    made: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full in MESSAGES:  # parents come before the messages nested in them
        outer, _, inner = full.rpartition(".")
        made[full] = (made[outer].nested_type if outer else proto.message_type).add(name=inner)
    for full, fields in MESSAGES.items():
        msg = made[full]
        for name, number, kind, *rest in fields:
            mode = rest[0] if rest else ""
            field = msg.field.add(name=name, number=int(number), json_name=_camel(name)[0].lower() + _camel(name)[1:])
            field.label = _F.LABEL_REPEATED if mode in ("repeated", "map") else _F.LABEL_OPTIONAL
            if mode == "map":  # map<string, kind>: a nested XEntry message, as protoc writes it
                entry = msg.nested_type.add(name=f"{_camel(name)}Entry")
                entry.options.map_entry = True
                entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL, json_name="key")
                entry.field.add(name="value", number=2, type=_F.TYPE_MESSAGE, label=_F.LABEL_OPTIONAL,
                                type_name=f".{PACKAGE}.{kind}", json_name="value")
                field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{full}.{entry.name}"
            elif kind in _SCALARS:
                field.type = _SCALARS[kind]
            elif kind == "DataType":
                field.type, field.type_name = _F.TYPE_ENUM, f".{PACKAGE}.DataType"
            else:
                field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
            if mode not in ("", "repeated", "map"):  # a oneof
                names = [o.name for o in msg.oneof_decl]
                if mode not in names:
                    msg.oneof_decl.add(name=mode)
                    names.append(mode)
                field.oneof_index = names.index(mode)
    return proto


def _classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file())
    return {full: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{full}"))
            for full in MESSAGES}


#: message name (as in :data:`MESSAGES`) -> its class
MESSAGE_CLASSES: dict[str, Any] = _classes()


def message(name: str) -> Any:
    """The message class of ``name`` (``"ModelInferRequest"``, ``"ModelInferResponse.InferOutputTensor"``)."""
    return MESSAGE_CLASSES[name]
