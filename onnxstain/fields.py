"""Typed JSON records: read a JSON object into a frozen dataclass, checking every field, and write it back.

A record is a frozen dataclass whose fields carry a *checker* in their metadata (:func:`spec`). Reading
(:meth:`Record.from_dict`) refuses, with a :class:`FieldError` naming the field's dotted path, a missing
required field, an unknown field, a value of the wrong type or out of range; the record's own
:meth:`Record.check` then relates fields to each other. Writing (:meth:`Record.to_dict`) gives back the
JSON object it was read from: a field that may be absent is left out when it is ``None``, unless its
``write_null`` rule says that the writer records the ``None`` as ``null``.

The callers (the key and the preprocessing loaders) turn a :class:`FieldError` into their own one-line
user error. Nothing here imports ONNX.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NoReturn, Self

import numpy as np


class FieldError(ValueError):
    """A field of a JSON record that does not fit its schema: ``path`` is dotted, ``problem`` a phrase."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path} {problem}")
        self.path = path
        self.problem = problem


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


F32_MAX = float(np.finfo(np.float32).max)
MAX_INT = 2**53  # integers beyond exact float64 (and int64 arithmetic) are refused


# -- checkers: read(value, path) -> Python value, write(value) -> JSON value --------------------------------
class Checker:
    nullable: bool = False

    def read(self, value: Any, path: str) -> Any:
        raise NotImplementedError

    def write(self, value: Any) -> Any:
        return value


@dataclasses.dataclass(frozen=True)
class Int(Checker):
    lo: int | None = None
    hi: int | None = None  # inclusive
    nullable: bool = False

    def read(self, value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(path, f"is {_describe(value)}, not an integer")
        if abs(value) > MAX_INT:
            raise FieldError(path, f"is {_describe(value)}, too large")
        if self.lo is not None and value < self.lo:
            raise FieldError(path, f"is {value}, below its minimum {self.lo}")
        if self.hi is not None and value > self.hi:
            raise FieldError(path, f"is {value}, above its maximum {self.hi}")
        return value


@dataclasses.dataclass(frozen=True)
class Num(Checker):
    """A finite number (an integer is kept as it was written: the record gives back the same JSON)."""

    lo: float | None = None
    hi: float | None = None  # inclusive
    positive: bool = False
    nullable: bool = False

    def read(self, value: Any, path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldError(path, f"is {_describe(value)}, not a number")
        if isinstance(value, float) and math.isnan(value):
            raise FieldError(path, "is NaN")
        if isinstance(value, int) and abs(value) > 1e308:  # beyond float64: math.isfinite would overflow
            raise FieldError(path, f"is {_describe(value)}, too large")
        if not math.isfinite(value):
            raise FieldError(path, f"is {value}, not a finite number")
        if self.positive and value <= 0:
            raise FieldError(path, f"is {value:g}, not positive")
        if self.lo is not None and value < self.lo:
            raise FieldError(path, f"is {value:g}, outside [{self.lo:g}, {self.hi if self.hi is not None else 'inf'}]")
        if self.hi is not None and value > self.hi:
            raise FieldError(path, f"is {value:g}, outside [{self.lo if self.lo is not None else '-inf'}, {self.hi:g}]")
        return value


PROBABILITY = Num(lo=0.0, hi=1.0)


@dataclasses.dataclass(frozen=True)
class Str(Checker):
    choices: tuple[str, ...] | None = None
    pattern: str | None = None  # a full-match regular expression
    nullable: bool = False

    def read(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise FieldError(path, f"is {_describe(value)}, not a string")
        if self.choices is not None and value not in self.choices:
            raise FieldError(path, f"is {_describe(value)}, not one of {', '.join(self.choices)}")
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            raise FieldError(path, f"is {_describe(value)}, not of the expected form")
        if self.choices is None and self.pattern is None and not value:
            raise FieldError(path, "is empty")
        return value


@dataclasses.dataclass(frozen=True)
class Ints(Checker):
    """A list of integers, read as a tuple."""

    lo: int | None = None
    length: int | None = None
    min_length: int = 0
    max_length: int | None = None
    nullable: bool = False

    def read(self, value: Any, path: str) -> tuple[int, ...]:
        if not isinstance(value, list):
            raise FieldError(path, f"is {_describe(value)}, not a list of integers")
        if self.length is not None and len(value) != self.length:
            raise FieldError(path, f"has {len(value)} values, not {self.length}")
        if len(value) < self.min_length:
            raise FieldError(path, f"has {len(value)} values, fewer than {self.min_length}")
        if self.max_length is not None and len(value) > self.max_length:
            raise FieldError(path, f"has {len(value)} values, more than {self.max_length}")
        item = Int(lo=self.lo)
        return tuple(item.read(v, f"{path}[{i}]") for i, v in enumerate(value))

    def write(self, value: Any) -> Any:
        return list(value)


@dataclasses.dataclass(frozen=True)
class NumMap(Checker):
    """A JSON object of finite numbers (string keys), read as a dict."""

    lo: float | None = None
    keys: str = "(?s).+"  # a full-match regular expression every key must match
    nullable: bool = False

    def read(self, value: Any, path: str) -> dict[str, float]:
        if not isinstance(value, dict):
            raise FieldError(path, f"is {_describe(value)}, not an object")
        for k in value:
            if not re.fullmatch(self.keys, k):
                raise FieldError(_join(path, k), "is not a known field")
        item = Num(lo=self.lo)
        return {k: item.read(v, _join(path, k)) for k, v in value.items()}

    def write(self, value: Any) -> Any:
        return dict(value)


@dataclasses.dataclass(frozen=True)
class F8:
    """An array stored as base64 of little-endian float64 with its shape (checked finite when read)."""

    shape: tuple[int, ...]
    f8: str

    @classmethod
    def of(cls, a: np.ndarray) -> F8:
        arr = np.ascontiguousarray(np.asarray(a, dtype="<f8"))
        return cls(tuple(int(s) for s in arr.shape), base64.b64encode(arr.tobytes()).decode("ascii"))

    def array(self) -> np.ndarray:
        return np.frombuffer(base64.b64decode(self.f8), dtype="<f8").reshape(self.shape).copy()

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class Array(Checker):
    ndim: int | None = None
    nullable: bool = False
    nonneg: bool = False  # distances (radii): never below 0

    def read(self, value: Any, path: str) -> F8:
        if not isinstance(value, dict):
            raise FieldError(path, f"is {_describe(value)}, not an array ({{'shape': [...], 'f8': base64}})")
        extra = sorted(set(value) - {"shape", "f8"})
        if extra:
            raise FieldError(_join(path, extra[0]), "is not a field of an array")
        if "shape" not in value or "f8" not in value:
            raise FieldError(_join(path, "shape" if "shape" not in value else "f8"), "is missing")
        shape = Ints(lo=0, max_length=8).read(value["shape"], _join(path, "shape"))
        if self.ndim is not None and len(shape) != self.ndim:
            raise FieldError(_join(path, "shape"), f"has {len(shape)} dimensions, not {self.ndim}")
        data = value["f8"]
        if not isinstance(data, str):
            raise FieldError(_join(path, "f8"), f"is {_describe(data)}, not a base64 string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise FieldError(_join(path, "f8"), "is not valid base64") from None
        size = math.prod(shape)
        if len(raw) != 8 * size:
            raise FieldError(_join(path, "f8"), f"holds {len(raw) // 8} values; its shape {list(shape)} needs {size}")
        values = np.frombuffer(raw, dtype="<f8")
        if not np.all(np.isfinite(values)):
            raise FieldError(path, "holds a value that is NaN or infinite")
        if values.size and np.abs(values).max() > F32_MAX:  # every array of a key comes from a float32 model
            raise FieldError(path, "holds a value beyond float32's range")
        if self.nonneg and values.size and values.min() < 0:
            raise FieldError(path, f"holds a negative value ({values.min():.6g}); it holds distances")
        return F8(shape, data)

    def write(self, value: Any) -> Any:
        return {"shape": list(value.shape), "f8": value.f8}


@dataclasses.dataclass(frozen=True)
class Nested(Checker):
    record: type[Record]
    nullable: bool = False

    def read(self, value: Any, path: str) -> Record:
        return self.record.from_dict(value, path)

    def write(self, value: Any) -> Any:
        return value.to_dict()


@dataclasses.dataclass(frozen=True)
class Custom(Checker):
    """A value read and written by two functions (a record the package defines elsewhere)."""

    reader: Callable[[Any, str], Any]
    writer: Callable[[Any], Any]
    nullable: bool = False

    def read(self, value: Any, path: str) -> Any:
        return self.reader(value, path)

    def write(self, value: Any) -> Any:
        return self.writer(value)


REQUIRED = "required"


def spec(checker: Checker, *, optional: bool = False, write_null: Callable[[Any], bool] | None = None,
         name: str | None = None) -> Any:
    """A record field. ``optional``: it may be absent (then ``None``). ``write_null(record)``: whether a
    ``None`` is written as ``null`` (otherwise left out). ``name``: its JSON name when it differs."""
    meta = {"checker": checker, "optional": optional, "write_null": write_null, "json": name}
    if optional:
        return dataclasses.field(default=None, metadata=meta)
    return dataclasses.field(metadata=meta)


def _json_name(f: dataclasses.Field) -> str:
    return f.metadata.get("json") or f.name


class Record:
    """Base of the typed JSON records (subclasses are frozen dataclasses whose fields use :func:`spec`)."""

    _what: ClassVar[str] = "an object"

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> Self:
        if not isinstance(data, Mapping):
            raise FieldError(path or "the document", f"is {_describe(data)}, not {cls._what}")
        fields = dataclasses.fields(cls)  # type: ignore[arg-type]
        known = {_json_name(f) for f in fields}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise FieldError(_join(path, unknown[0]), "is not a known field")
        values: dict[str, Any] = {}
        for f in fields:
            name, checker = _json_name(f), f.metadata["checker"]
            where = _join(path, name)
            if name not in data:
                if not f.metadata["optional"]:
                    raise FieldError(where, "is missing")
                values[f.name] = None
                continue
            value = data[name]
            if value is None:
                if not (checker.nullable or f.metadata["optional"]):
                    raise FieldError(where, "is null")
                values[f.name] = None
                continue
            values[f.name] = checker.read(value, where)
        record = cls(**values)
        record.check(path)
        return record

    def check(self, path: str) -> None:
        """Relations between fields (overridden by records that have any)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None:
                rule = f.metadata["write_null"]
                if f.metadata["optional"] and not (rule is not None and rule(self)):
                    continue
                out[_json_name(f)] = None
                continue
            out[_json_name(f)] = f.metadata["checker"].write(value)
        return out


def fail(path: str, problem: str) -> NoReturn:
    raise FieldError(path, problem)
