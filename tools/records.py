"""Typed result records: dataclasses that write themselves to JSON and read themselves back."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any


def _build(tp, value):
    """``value`` (parsed JSON) as type ``tp``: records, and lists, dicts and Optionals of them."""
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _build(args[0], value) if len(args) == 1 else value
    if origin is list:
        (arg,) = typing.get_args(tp) or (Any,)
        return [_build(arg, v) for v in value]
    if origin is dict:
        _, arg = typing.get_args(tp) or (str, Any)
        return {k: _build(arg, v) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_json(value)
    return value


class Record:
    """Base of a result dataclass: ``to_json`` gives plain JSON types, ``from_json`` inverts it.

    Keys absent from the JSON take the field's default (files written before a field existed).
    """

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict):
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _build(hints[f.name], data[f.name])
                      for f in dataclasses.fields(cls) if f.name in data})
