"""Records that write themselves as JSON, and the JSON Schema their type hints define.

A report part is a dataclass deriving from :class:`Record`: ``to_dict()`` is its JSON form, and
:func:`json_schema` turns its type hints into a JSON Schema (the draft 2020-12 subset listed below),
so the schema a report is checked against is the code that writes it. :func:`schema_problems` checks a
JSON object against such a schema and lists every problem, one line each.

Type hints understood: ``str``, ``int``, ``float``, ``bool``, ``Any``, ``None``, ``Literal[...]``,
``list[X]``, ``dict[str, X]``, unions (``X | None``) and other records. Every field is required (it is
always written, None as null) except those with the metadata ``omit_if_none`` (the key is left out
instead); ``non_empty``: a string or list that must not be empty.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union

OMIT_IF_NONE = {"omit_if_none": True}
NON_EMPTY = {"non_empty": True}

_JSON_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                               type(None): "null"}


class Record:
    """Base of a report part: a dataclass whose JSON form is :meth:`to_dict`."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: fields in their order, records and lists of records as JSON too."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _json(value)
        return out


def _json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------------------ type hints -> schema
def json_schema(record: type[Record]) -> dict[str, Any]:
    """The JSON Schema of a record class, from its fields' type hints."""
    hints = typing.get_type_hints(record)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for f in dataclasses.fields(record):
        schema = _schema_of(hints[f.name])
        if f.metadata.get("non_empty"):
            schema = {**schema, "minLength" if schema.get("type") == "string" else "minItems": 1}
        properties[f.name] = schema
        if not f.metadata.get("omit_if_none"):  # written even when None (as null): always there
            required.append(f.name)
    return {"type": "object", "title": record.__name__, "properties": properties, "required": required}


def _schema_of(hint: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return {}
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if isinstance(hint, type) and issubclass(hint, Record):
        return json_schema(hint)
    if origin is Literal:
        return {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", "items": _schema_of(args[0]) if args else {}}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1]) if args else {}}
    if origin in (Union, types.UnionType):
        parts = [_schema_of(a) for a in args]
        if all(set(p) == {"type"} for p in parts):  # simple types: one "type" list
            return {"type": [p["type"] for p in parts]}
        return {"anyOf": parts}
    raise TypeError(f"no JSON Schema for the type hint {hint!r}")


# ------------------------------------------------------------------------------------------ checking
def schema_problems(value: Any, schema: dict[str, Any], where: str) -> list[str]:
    """What in ``value`` does not fit ``schema`` (a schema :func:`json_schema` writes); empty: it fits."""
    if "anyOf" in schema:
        return _any_of_problems(value, schema["anyOf"], where)
    if "const" in schema and value != schema["const"]:
        return [f"{where} is {value!r}, expected {schema['const']!r}"]
    if "enum" in schema and value not in schema["enum"]:
        return [f"{where} is {value!r}, expected one of {', '.join(map(repr, schema['enum']))}"]
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_IS[kind](value) for kind in kinds):
            return [f"{where} is {_json_type(value)}, expected {' or '.join(kinds)}"]
    if isinstance(value, (str, list)) and len(value) < schema.get("minLength", schema.get("minItems", 0)):
        return [f"{where} is empty"]
    problems: list[str] = []
    if isinstance(value, dict):
        missing = [k for k in schema.get("required", []) if k not in value]
        if missing:
            problems.append(f"{where}: missing {', '.join(missing)}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                problems += schema_problems(value[key], sub, f"{where}.{key}")
        if "additionalProperties" in schema:
            for key, item in value.items():
                problems += schema_problems(item, schema["additionalProperties"], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{where}[{i}]")
    return problems


def _any_of_problems(value: Any, options: list[dict[str, Any]], where: str) -> list[str]:
    """A value fits when one option fits. Objects told apart by a constant field (``scenario``) are
    checked against the option that constant names, so the problems listed are that option's."""
    tags = [_tag(option) for option in options]
    if isinstance(value, dict) and all(t is not None and t[0] == tags[0][0] for t in tags):
        key = tags[0][0]
        for option, (_, const) in zip(options, tags):
            if value.get(key) == const:
                return schema_problems(value, option, where)
        return [f"{where}.{key} is {value.get(key)!r}, expected one of {', '.join(repr(t[1]) for t in tags)}"]
    found = [schema_problems(value, option, where) for option in options]
    return [] if any(not p for p in found) else min(found, key=len)


def _tag(schema: dict[str, Any]) -> tuple[str, Any] | None:
    for key, sub in schema.get("properties", {}).items():
        if "const" in sub:
            return key, sub["const"]
    return None


#: JSON Schema type -> test of a parsed JSON value (a bool is not a number, as in JSON)
_IS: dict[str, Any] = {
    "null": lambda v: v is None,
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "string": lambda v: isinstance(v, str),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _json_type(value: Any) -> str:
    return next((kind for kind, test in _IS.items() if test(value)), type(value).__name__)
