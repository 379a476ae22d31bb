"""Model registry: ``register_model``, ``create_model(name, **overrides)``, ``list_models``.

A registered entry is a function that takes keyword overrides and returns an ``nn.Module``.
Names are lower-case; lookups are exact, and a miss lists the closest names.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from collections.abc import Callable
from typing import TypeVar

from torch import nn

ModelFn = Callable[..., nn.Module]
ConfigT = TypeVar("ConfigT")

_REGISTRY: dict[str, ModelFn] = {}


def register_model(fn: ModelFn | None = None, *, name: str | None = None):
    """Register ``fn`` under ``name`` (default: the function's name). Usable bare or called."""

    def wrap(f: ModelFn) -> ModelFn:
        key = (name or f.__name__).lower()
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"model name {key!r} is already registered")
        _REGISTRY[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def _ensure_models_loaded() -> None:
    # Model files register themselves on import; importing the package pulls them all in.
    import archopt.models  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern``."""
    _ensure_models_loaded()
    names = sorted(_REGISTRY)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatch(n, pattern.lower())]


def get_model_fn(name: str) -> ModelFn:
    _ensure_models_loaded()
    key = name.lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, list(_REGISTRY), n=5, cutoff=0.3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown model {name!r}: expected one of {len(_REGISTRY)} registered names{hint} "
            "(see archopt.list_models())"
        )
    return _REGISTRY[key]


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; ``overrides`` replace fields of its preset config."""
    return get_model_fn(name)(**overrides)


def with_overrides(preset: ConfigT, overrides: dict) -> ConfigT:
    """A copy of the dataclass ``preset`` with ``overrides`` applied; unknown names raise."""
    names = [f.name for f in dataclasses.fields(preset)]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(
            f"unknown {type(preset).__name__} field(s) {unknown}: expected any of {names}"
        )
    return dataclasses.replace(preset, **overrides)
