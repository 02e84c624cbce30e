"""Typed reading of parsed JSON into dataclasses, for specs, plans and profiles alike (it sits in
`profiles`, the bottom of the import chain, so every package can use it).

Each value is checked against its dataclass field's declared type and declared range; a bad value
raises the caller's error type with one line naming the file and the JSON path, e.g.
`plan.json: steps[0].units[3].slices: expected an integer >= 1, got 2.5`.

Types: bool; int (never a bool, never a float: 32.0 is not a layer count); float (a finite int or
float, never a bool); str; Any; Literal[...]; X | None; list[X]; tuple[X, ...]; dict[K, X] (JSON
object keys; int keys are decimal strings); nested dataclasses. A range is declared once, in the
field's metadata (`layers: int = field(metadata=positive())`), and applies to every number the
field holds (each element of a list). Values are kept as written (an int stays an int where a
float is declared), so a read plan writes back byte-identical.

A class may set DERIVED_KEYS (keys its to_dict adds: accepted, ignored) or JSON_EXTRA_KEYS = True
(an open object: other keys accepted, ignored)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, NoReturn, Union

RANGE = "range"  # field-metadata key of a Range


@dataclass(frozen=True)
class Range:
    """lo <(=) value <(=) hi."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False  # value > lo rather than >= lo
    hi_open: bool = False  # value < hi rather than <= hi

    def holds(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        return above and (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.hi == math.inf:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo == -math.inf:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


def positive() -> dict[str, Range]:
    """Field metadata: > 0."""
    return {RANGE: Range(lo=0, lo_open=True)}


def at_least(lo: float) -> dict[str, Range]:
    """Field metadata: >= lo."""
    return {RANGE: Range(lo=lo)}


def within(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> dict[str, Range]:
    """Field metadata: in [lo, hi] (or open at either end)."""
    return {RANGE: Range(lo, hi, lo_open, hi_open)}


def show(v: Any) -> str:
    """A value as the user wrote it (JSON spelling), shortened."""
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _is_scalar(tp: Any) -> bool:
    return tp in (bool, int, float, str) or typing.get_origin(tp) is Literal


def describe(tp: Any, rng: Range | None = None) -> str:
    """What a value of type tp must look like, in words."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        return " or ".join(describe(a, rng) if a is not type(None) else "null" for a in args)
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if origin in (list, tuple):
        return "a list"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "an object"
    base = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(tp, str(tp))
    return f"{base} {rng}" if rng is not None and tp in (int, float) else base


# ---- compiled converters ------------------------------------------------------------------------
# A JSON path is a chain of (parent, key) tuples, () at the root, formatted only when a value is bad:
# plans hold tens of thousands of units, so the happy path builds no strings.
JsonPath = tuple
Convert = Callable[[Any, JsonPath], Any]


class _Bad(Exception):
    """A value at `path` is bad; Reader turns it into the caller's error type."""

    def __init__(self, path: JsonPath, problem: str) -> None:
        super().__init__(problem)
        self.path, self.problem = path, problem


def format_path(path: JsonPath) -> str:
    keys = []
    while path:
        path, key = path
        keys.append(key)
    out = ""
    for key in reversed(keys):
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


def _chain(keys: tuple, rel: JsonPath) -> JsonPath:
    """The path of `keys` followed by the relative path `rel`."""
    tail = []
    while rel:
        rel, key = rel
        tail.append(key)
    path: JsonPath = ()
    for key in (*keys, *reversed(tail)):
        path = (path, key)
    return path


_INT_KEY = re.compile(r"-?\d+")


def _scalar_test(tp: Any) -> Callable[[Any], bool]:
    # `type(v) is ...` first: the common case, and cheaper than isinstance (a bool is an int subclass).
    if tp is bool:
        return lambda v: isinstance(v, bool)
    if tp is int:
        return lambda v: type(v) is int or (isinstance(v, int) and not isinstance(v, bool))
    if tp is float:
        return lambda v: ((type(v) is float and math.isfinite(v)) or type(v) is int or
                          (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)))
    if tp is str:
        return lambda v: isinstance(v, str)
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        return lambda v: any(v == a and type(v) is type(a) for a in allowed)
    raise TypeError(f"typed_json: unsupported field type {tp!r}")


@functools.cache
def _compile(tp: Any, rng: Range | None) -> Convert:
    """A converter for type tp (and range rng on its numbers): returns the value (lists as tuples
    where tp says tuple, int dict keys from strings) or raises _Bad."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    want = describe(tp, rng)

    def bad(v: Any, path: JsonPath) -> NoReturn:
        raise _Bad(path, f"expected {want}, got {show(v)}")

    if tp is Any:
        return lambda v, path: v
    if _is_union(tp):
        nullable = type(None) in args
        others = [a for a in args if a is not type(None)]
        arms = [_compile(a, rng) for a in others]
        # X | None with a container or object X: X's own message is the precise one.
        precise = len(others) == 1 and not _is_scalar(others[0])

        def union(v: Any, path: JsonPath) -> Any:
            if v is None and nullable:
                return None
            if precise:
                return arms[0](v, path)
            for arm in arms:
                try:
                    return arm(v, path)
                except _Bad:
                    pass
            bad(v, path)
        return union
    if origin in (list, tuple):
        item, as_tuple = _compile(args[0], rng), origin is tuple

        def sequence(v: Any, path: JsonPath) -> Any:
            if not isinstance(v, (list, tuple)):
                bad(v, path)
            out = [item(x, (path, i)) for i, x in enumerate(v)]
            return tuple(out) if as_tuple else out
        return sequence
    if origin is dict:
        key, value = _compile_key(args[0]), _compile(args[1], rng)

        def mapping(v: Any, path: JsonPath) -> Any:
            if not isinstance(v, dict):
                bad(v, path)
            return {key(k, path): value(x, (path, str(k))) for k, x in v.items()}
        return mapping
    if dataclasses.is_dataclass(tp):
        return lambda v, path: _build(tp, v, path, False)
    test = _scalar_test(tp)
    if rng is not None and tp in (int, float):
        lo = rng.lo
        if rng.hi == math.inf and not rng.lo_open:  # the common ">= lo": one comparison
            return lambda v, path: v if test(v) and v >= lo else bad(v, path)
        if rng.hi == math.inf:
            return lambda v, path: v if test(v) and v > lo else bad(v, path)
        holds = rng.holds
        return lambda v, path: v if test(v) and holds(v) else bad(v, path)
    return lambda v, path: v if test(v) else bad(v, path)


def _compile_key(tp: Any) -> Callable[[Any, JsonPath], Any]:
    if tp is int:
        def int_key(k: Any, path: JsonPath) -> int:
            if isinstance(k, int) and not isinstance(k, bool):
                return k
            if isinstance(k, str) and _INT_KEY.fullmatch(k):
                return int(k)
            raise _Bad(path, f"key {show(k)}: expected an integer key")
        return int_key
    conv = _compile(tp, None)
    return lambda k, path: conv(k, (path, str(k)))


@dataclass(frozen=True)
class _Schema:
    """What _build needs of a dataclass, computed once per class."""

    fields: tuple[tuple[str, Convert], ...]  # (name, converter) of every init field
    required: frozenset[str]  # fields without a default
    known: frozenset[str] | None  # accepted keys (fields + DERIVED_KEYS); None: any (JSON_EXTRA_KEYS)


@functools.cache
def _schema(cls: type) -> _Schema:
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = frozenset(f.name for f in fields)
    return _Schema(
        fields=tuple((f.name, _compile(hints[f.name], f.metadata.get(RANGE))) for f in fields),
        required=frozenset(f.name for f in fields
                           if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING),
        known=None if getattr(cls, "JSON_EXTRA_KEYS", False) else names.union(getattr(cls, "DERIVED_KEYS", ())))


def _build(cls: type, d: Any, path: JsonPath, ignore_unknown: bool) -> Any:
    if not isinstance(d, dict):
        raise _Bad(path, f"expected an object, got {show(d)}")
    sc = _schema(cls)
    if sc.known is not None and not ignore_unknown and not sc.known.issuperset(d):
        raise _Bad(path, f"unknown field(s) {[k for k in d if k not in sc.known]}; "
                         f"known: {[name for name, _ in sc.fields]}")
    if not sc.required.issubset(d):
        raise _Bad(path, f"missing field(s) {[name for name, _ in sc.fields if name in sc.required and name not in d]}")
    kwargs = {name: convert(d[name], (path, name)) for name, convert in sc.fields if name in d}
    try:
        return cls(**kwargs)
    except ValueError as e:  # a rule the class checks itself (__post_init__), e.g. a SpecError
        raise _Bad(path, str(e)) from None


@dataclass(frozen=True)
class Reader:
    """Reads JSON into declared types; a bad value raises `error` as one line "origin: path: problem"."""

    origin: str  # the file (or what was read), named first in every message
    error: type[Exception]  # the package's error type

    def _raise(self, bad: _Bad) -> NoReturn:
        where = format_path(bad.path)
        raise self.error(f"{self.origin}: {where + ': ' if where else ''}{bad.problem}") from None

    def build(self, cls: type, d: Any, path: str = "", *, ignore_unknown: bool = False) -> Any:
        """An instance of dataclass cls from JSON object d (at JSON path `path` of the file): every
        field typed, unknown keys reported, missing required fields named, and a rule the class
        checks itself (in __post_init__, raising a ValueError) reported at the object's path."""
        try:
            return _build(cls, d, ((), path) if path else (), ignore_unknown)
        except _Bad as bad:
            self._raise(bad)

    def value(self, tp: Any, v: Any, path: str = "", rng: Range | None = None) -> Any:
        """v checked against type tp (and range rng)."""
        return self.checker(tp, rng)(v, *([path] if path else []))

    def checker(self, tp: Any, rng: Range | None = None) -> Callable[..., Any]:
        """value() for one type, compiled once, for checking many values (a table column):
        check(v, *keys) with the keys of v's JSON path (str: a field, int: an index)."""
        convert = _compile(tp, rng)

        def check(v: Any, *keys: str | int) -> Any:
            try:
                return convert(v, ())
            except _Bad as bad:
                self._raise(_Bad(_chain(keys, bad.path), bad.problem))
        return check

    def check(self, obj: Any) -> None:
        """Check the fields of a dataclass instance built in code (for its __post_init__)."""
        try:
            for name, convert in _schema(type(obj)).fields:
                convert(getattr(obj, name), ((), name))
        except _Bad as bad:
            self._raise(bad)
