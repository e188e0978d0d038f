"""Every JSON the project reads, read one way: bounded in size and depth, then checked against a schema.

A file (`read_json`) or a string (`parse_json`) larger than `MAX_JSON_BYTES` or nested deeper than `MAX_JSON_DEPTH`
is refused before it is used, NaN and Infinity are not JSON, and the value must match its schema: a small tree of
the types below (`Obj` with its fields, `MapOf`, `ListOf`, `Int`, `Num`, `Str`, `Bool`, `Maybe`, `OneOf`, `ANY`).
Every problem is a `JsonError` whose message names where in the document it is (`stages.vae.onnx-fp32.files`);
callers re-raise it as their own error with the fix.
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping

MAX_JSON_BYTES = 64 << 20  # a samples.json of a million images is about 7 MB
MAX_JSON_DEPTH = 32  # the deepest file the project writes (the manifest) nests 7 levels


class JsonError(ValueError):
    """JSON that is unreadable, too large, too deep, or not of its schema; the message says where and what."""


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _at(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


class Schema:
    """One node of a schema: `check(value, where)` raises JsonError when `value` does not fit."""

    def check(self, value, where: str = "") -> None:
        raise NotImplementedError

    def _fail(self, where: str, problem: str):
        raise JsonError(f"{where or 'it'} {problem}")


class _Anything(Schema):
    def check(self, value, where: str = "") -> None:
        pass


ANY = _Anything()  # any value (already bounded in depth and size by the reader)


class _Scalar(Schema):
    def check(self, value, where: str = "") -> None:
        if isinstance(value, (dict, list)) or (isinstance(value, float) and not math.isfinite(value)):
            self._fail(where, f"is {_kind(value)}, not a number, string, boolean or null")
        if isinstance(value, str) and len(value) > 4096:
            self._fail(where, f"is a string of {len(value)} characters (at most 4096)")


SCALAR = _Scalar()  # a number, a short string, a boolean or null


class Int(Schema):
    """An integer (not a boolean) in [lo, hi]."""

    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def check(self, value, where: str = "") -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            self._fail(where, f"is {_kind(value)}, not an integer")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            self._fail(where, f"is {value}, outside [{self.lo}, {self.hi}]")


class Num(Schema):
    """A finite number (an integer too) in [lo, hi]."""

    def __init__(self, lo: float | None = None, hi: float | None = None):
        self.lo, self.hi = lo, hi

    def check(self, value, where: str = "") -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self._fail(where, f"is {_kind(value)}, not a finite number")
        if (self.lo is not None and value < self.lo) or (self.hi is not None and value > self.hi):
            self._fail(where, f"is {value}, outside [{self.lo}, {self.hi}]")


class Str(Schema):
    """A string of at most `max_len` characters, matching `pattern` or one of `choices` when given."""

    def __init__(self, pattern: str | None = None, choices: Iterable[str] | None = None, max_len: int = 4096):
        self.pattern = None if pattern is None else re.compile(pattern)
        self.choices = None if choices is None else tuple(choices)
        self.max_len = max_len

    def check(self, value, where: str = "") -> None:
        if not isinstance(value, str):
            self._fail(where, f"is {_kind(value)}, not a string")
        if len(value) > self.max_len:
            self._fail(where, f"is a string of {len(value)} characters (at most {self.max_len})")
        if self.choices is not None and value not in self.choices:
            self._fail(where, f"is {value[:64]!r}, not one of {', '.join(self.choices)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            self._fail(where, f"is {value[:64]!r}, not of the form {self.pattern.pattern}")


class Bool(Schema):
    def check(self, value, where: str = "") -> None:
        if not isinstance(value, bool):
            self._fail(where, f"is {_kind(value)}, not true or false")


class Maybe(Schema):
    """`schema` or null."""

    def __init__(self, schema: Schema):
        self.schema = schema

    def check(self, value, where: str = "") -> None:
        if value is not None:
            self.schema.check(value, where)


class OneOf(Schema):
    """The first of `schemas` whose check passes; the last one's problem is reported when none does."""

    def __init__(self, *schemas: Schema):
        self.schemas = schemas

    def check(self, value, where: str = "") -> None:
        for schema in self.schemas[:-1]:
            try:
                schema.check(value, where)
                return
            except JsonError:
                pass
        self.schemas[-1].check(value, where)


class ListOf(Schema):
    """A list of `item`s, of min_len..max_len entries."""

    def __init__(self, item: Schema, min_len: int = 0, max_len: int | None = None):
        self.item, self.min_len, self.max_len = item, min_len, max_len

    def check(self, value, where: str = "") -> None:
        if not isinstance(value, list):
            self._fail(where, f"is {_kind(value)}, not a list")
        if len(value) < self.min_len or (self.max_len is not None and len(value) > self.max_len):
            self._fail(where, f"has {len(value)} entries, not {self.min_len}..{self.max_len or 'any'}")
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")


class MapOf(Schema):
    """An object of any keys (matching `key` when given), every value a `value`, at least `min_len` of them."""

    def __init__(self, value: Schema, key: str | None = None, min_len: int = 0):
        self.value, self.key, self.min_len = value, None if key is None else re.compile(key), min_len

    def check(self, value, where: str = "") -> None:
        if not isinstance(value, dict):
            self._fail(where, f"is {_kind(value)}, not an object")
        if len(value) < self.min_len:
            self._fail(where, f"has {len(value)} entries, at least {self.min_len} expected")
        for k, v in value.items():
            if self.key is not None and not self.key.fullmatch(k):
                self._fail(where, f"has the key {k[:64]!r}, not of the form {self.key.pattern}")
            self.value.check(v, _at(where, k))


class Obj(Schema):
    """An object with the `required` fields, any of the `optional` ones, and no other key (unless `extra`, the schema
    of every other key's value)."""

    def __init__(self, required: Mapping[str, Schema], optional: Mapping[str, Schema] | None = None,
                 extra: Schema | None = None):
        self.required, self.optional, self.extra = dict(required), dict(optional or {}), extra

    def check(self, value, where: str = "") -> None:
        if not isinstance(value, dict):
            self._fail(where, f"is {_kind(value)}, not an object")
        for key, schema in self.required.items():
            if key not in value:
                self._fail(where, f"has no {key!r}")
            schema.check(value[key], _at(where, key))
        for key, item in value.items():
            if key in self.required:
                continue
            schema = self.optional.get(key, self.extra)
            if schema is None:
                self._fail(where, f"has an unknown field {key[:64]!r}")
            schema.check(item, _at(where, key))


def depth(value) -> int:
    """How deeply lists and objects nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str | bytes, schema: Schema = ANY, *, max_bytes: int = MAX_JSON_BYTES,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`text` parsed and checked: at most `max_bytes` long, nested at most `max_depth` deep, fitting `schema`."""
    if len(text) > max_bytes:
        raise JsonError(f"it is {len(text)} bytes, more than the {max_bytes} allowed")
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise JsonError(f"it nests deeper than {max_depth} levels") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, NaN, integers of too many digits
        raise JsonError(f"it is not JSON ({exc})") from None
    if depth(value) > max_depth:
        raise JsonError(f"it nests deeper than {max_depth} levels")
    schema.check(value)
    return value


def read_json(path: str | Path, schema: Schema = ANY, *, max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON file at `path` (a regular file, never a FIFO or device), parsed and checked as `parse_json` does.

    Raises JsonError, or OSError when the file cannot be read; the message names neither the path nor a fix."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise JsonError("it is not a regular file (a directory, FIFO, device or socket)")
        if info.st_size > max_bytes:
            raise JsonError(f"it is {info.st_size} bytes, more than the {max_bytes} allowed")
        data = f.read(max_bytes + 1)
    return parse_json(data, schema, max_bytes=max_bytes, max_depth=max_depth)
