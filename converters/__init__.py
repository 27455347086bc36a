"""edgexfer.converters: ONNX to OpenVINO / ONNX Runtime / TensorRT engines. Never imports torch."""
