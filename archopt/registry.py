"""Models by name: ``create_model(name, pretrained=False, **overrides)``, ``list_models``,
``model_info``.

The table itself lives in ``archopt.models._registry`` (model files register there); this module
sits above the loaders, so ``create_model(name, pretrained=True)`` can hand a model with real
weights to ``archopt.loading.llm`` without the model files ever importing a loader. Names are
lower-case; lookups are exact, and a miss lists the closest names.
"""

from __future__ import annotations

import difflib
import fnmatch

from torch import nn

import archopt.models  # noqa: F401  (model files register themselves on import)
from archopt.models._registry import (
    MODELS,
    TASKS,
    ModelFn,
    ModelInfo,
    register_model,
    unregister_model,
    with_overrides,
)

__all__ = [
    "TASKS",
    "ModelInfo",
    "create_model",
    "get_model_fn",
    "list_models",
    "model_info",
    "register_model",
    "unregister_model",
    "with_overrides",
]


def list_models(pattern: str | None = None, *, task: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern`` and ``task``."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    names = sorted(n for n, info in MODELS.items() if task is None or info.task == task)
    if pattern is None:
        return names
    return [n for n in names if fnmatch.fnmatch(n, pattern.lower())]


def model_info(name: str) -> ModelInfo:
    """The entry for ``name``: its builder, task, default input and packaged weights."""
    key = name.lower()
    if key not in MODELS:
        close = difflib.get_close_matches(key, list(MODELS), n=5, cutoff=0.3)
        hint = f"; closest: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown model {name!r}: expected one of {len(MODELS)} registered names{hint} "
            "(see archopt.list_models())"
        )
    return MODELS[key]


def get_model_fn(name: str) -> ModelFn:
    return model_info(name).fn


def _check_size(info: ModelInfo, overrides: dict) -> None:
    """Build the model on the meta device first, which holds no memory, so a configuration
    too large for this machine is a ResourceError naming it instead of a failed allocation."""
    import torch

    from archopt.io import check_fits

    try:
        with torch.device("meta"):
            probe = info.fn(**overrides)
    except ValueError:
        raise  # the configuration's own errors, as the real build would raise them
    except Exception as e:
        if "overflow" in str(e).lower():
            raise ValueError(
                f"model {info.name!r} with {overrides}: a layer's size does not fit in 64 bits"
            ) from None
        return  # cannot be built on meta: the real build says what it says
    tensors = (*probe.parameters(), *probe.buffers())
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    settings = f" with {overrides}" if overrides else ""
    count = sum(t.numel() for t in tensors)
    check_fits(f"model {info.name!r}{settings} ({count:,} weights)", nbytes)


def create_model(
    name: str, pretrained: bool = False, *, weights: str | None = None, **overrides
) -> nn.Module:
    """Build a registered model; ``overrides`` replace fields of its preset config.

    ``pretrained=True`` loads the real weights the entry names (a language model's packaged
    checkpoint, through ``archopt.load_llm``; ``weights`` picks the format, default its fastest
    one, see ``archopt.choices.WEIGHT_FORMATS``); an entry without packaged weights is an
    error naming the ones that have them.
    """
    info = model_info(name)
    if not pretrained:
        if weights is not None:
            raise ValueError(f"weights={weights!r} needs pretrained=True")
        _check_size(info, overrides)
        return info.fn(**overrides)
    if info.pretrained is None:
        have = sorted(n for n, i in MODELS.items() if i.pretrained is not None)
        raise ValueError(
            f"model {name!r} has no packaged weights: pretrained=True works for {have}"
        )
    if overrides:
        raise ValueError(f"pretrained=True takes no config overrides, got {sorted(overrides)}")
    from archopt.loading.llm import load_llm

    return load_llm(info.name, weights=weights or "auto")
