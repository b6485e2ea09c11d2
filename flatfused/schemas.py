"""The ops' schemas, read from the file that csrc/ops.cpp registers (``op_schemas.def``), so that
an op's arguments are stated once: their order and defaults (keyword calls of any backend's
kernel) and which operands it writes (the aliasing and autograd checks of :mod:`flatfused.ops`).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("op_schemas.def")
_NO_DEFAULT = object()


@dataclass(frozen=True)
class OpSchema:
    """One op: ``names`` of its arguments in order, their ``defaults`` (``_NO_DEFAULT`` where
    there is none), the ``written`` operands and the ``tensors`` (operands)."""
    name: str
    text: str
    names: tuple[str, ...]
    defaults: tuple
    written: frozenset[str]
    tensors: tuple[str, ...]

    def bind(self, args: tuple, kwargs: dict) -> list:
        """The positional arguments of a call ``(*args, **kwargs)``, defaults filled in; a
        clear TypeError for an unknown, repeated or missing argument."""
        if len(args) > len(self.names):
            raise TypeError(f"flatfused.{self.name} takes {len(self.names)} arguments, "
                            f"got {len(args)}")
        if not kwargs and len(args) == len(self.names):
            return list(args)
        unknown = sorted(set(kwargs) - set(self.names))
        if unknown:
            raise TypeError(f"flatfused.{self.name} has no argument {unknown[0]!r} "
                            f"(its schema: {self.text})")
        repeated = [n for n in self.names[:len(args)] if n in kwargs]
        if repeated:
            raise TypeError(f"flatfused.{self.name} got {repeated[0]!r} twice")
        out = list(args)
        for name, default in zip(self.names[len(args):], self.defaults[len(args):]):
            value = kwargs.get(name, default)
            if value is _NO_DEFAULT:
                raise TypeError(f"flatfused.{self.name} needs {name!r} (its schema: {self.text})")
            out.append(value)
        return out


def read(path: Path = SOURCE) -> list[str]:
    """The schema strings of ``path``: each ``FLATFUSED_OP("..." "...")``, its adjacent C string
    literals joined (comments and line breaks around them are C++'s business, not the schema's)."""
    calls = re.findall(r'FLATFUSED_OP\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\)', path.read_text())
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call)) for call in calls]


def _parse(text: str) -> OpSchema:
    schema = torch._C.parse_schema(f"flatfused::{text}")
    names, defaults, written, tensors = [], [], set(), []
    for arg in schema.arguments:
        names.append(arg.name)
        defaults.append(arg.default_value if arg.has_default_value() else _NO_DEFAULT)
        if isinstance(arg.type, torch.TensorType) or (
                isinstance(arg.type, torch.OptionalType)
                and isinstance(arg.type.getElementType(), torch.TensorType)):
            tensors.append(arg.name)
        if arg.alias_info is not None and arg.alias_info.is_write:
            written.add(arg.name)
    return OpSchema(schema.name.split("::", 1)[1], text, tuple(names), tuple(defaults),
                    frozenset(written), tuple(tensors))


@functools.cache
def all_schemas() -> dict[str, OpSchema]:
    """Every op's schema, by op name, in the file's order."""
    return {s.name: s for s in map(_parse, read())}


def schema(name: str) -> OpSchema:
    try:
        return all_schemas()[name]
    except KeyError:
        raise ValueError(f"no flatfused op named {name!r}; the ops: "
                         f"{', '.join(all_schemas())}") from None


def with_keywords(name: str, fn):
    """``fn`` (a backend's kernel, positional) callable with the schema's argument names as
    keywords, defaults filled in."""
    op = schema(name)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return fn(*op.bind(args, kwargs))

    return call
