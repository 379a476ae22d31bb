"""Training checkpoints: one safetensors file, written atomically, that restores a run exactly.

``checkpoint.safetensors`` holds the model's state dict under ``model.``, the optimizer's
state tensors under ``optim.<param index>.<name>``, and everything that is not a tensor (the
run's settings, epoch and step, optimizer hyper-parameters and scalar state, the metrics
history) as JSON in the file's metadata. One file, so that weights and state can never come
from different epochs. No pickle anywhere: loading a checkpoint runs no code.

There is no RNG state to save: the loop draws data order, augmentation and dropout from
generators seeded by (seed, epoch, rank), so the state at an epoch boundary is the weights,
the optimizer and the step count.

Writes go through ``archopt.io.atomic_write``: a crash or a full disk mid-write leaves the
previous checkpoint as it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from archopt.errors import CheckpointError
from archopt.io import atomic_write

FORMAT = "archopt.train/1"
META_KEY = "archopt"
MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def _savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, no two entries on one storage (safetensors refuses shared memory)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_weights(model: nn.Module, path: str | os.PathLike) -> Path:
    """The model's state dict alone, as plain safetensors (load with ``load_weights``)."""
    from safetensors.torch import save_file

    tensors = _savable(model.state_dict())
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights saved by ``save_weights`` or the model part of a training checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        is_checkpoint = META_KEY in (f.metadata() or {})
    tensors = load_file(str(path))
    if is_checkpoint:  # keep the model part of a training checkpoint
        tensors = {
            k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)
        }
    model.load_state_dict(tensors, strict=True)
    return model


def _split_optimizer_state(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (exactly, as safetensors) apart from everything JSON can hold exactly."""
    tensors, scalars = {}, {}
    for idx, state in opt_state["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{OPTIM_PREFIX}{idx}.{name}"] = value
            elif value is None:
                continue
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": opt_state["param_groups"], "scalars": scalars}


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
) -> Path:
    """Model + optimizer tensors and the JSON-able ``state`` in one atomically written file."""
    from safetensors.torch import save_file

    opt_tensors, opt_json = _split_optimizer_state(optimizer.state_dict())
    tensors = {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}
    tensors.update(opt_tensors)
    tensors = _savable(tensors)
    meta = {"format": FORMAT, "state": state, "optimizer": opt_json}
    text = json.dumps(meta, allow_nan=True)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={META_KEY: text}))


def _read_meta(path: str | os.PathLike) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(
            f"{path} is not a readable safetensors checkpoint ({e}); it was left as it is: "
            "move it away, or choose another output folder"
        ) from e
    if META_KEY not in meta:
        raise ValueError(f"{path} is a safetensors file but not an archopt training checkpoint")
    try:
        data = json.loads(meta[META_KEY])
        ok = isinstance(data, dict) and isinstance(data.get("state"), dict) and "optimizer" in data
    except ValueError:
        ok = False
    if not ok:
        raise CheckpointError(
            f"{path}: its training record must be a JSON object with 'format', 'state' and "
            "'optimizer' (as save_checkpoint writes it), got a damaged one"
        )
    if data.get("format") != FORMAT:
        raise ValueError(
            f"{path} has checkpoint format {data.get('format')!r}, expected {FORMAT!r}"
        )
    return data


def read_checkpoint_state(path: str | os.PathLike) -> dict:
    """The JSON state saved with a checkpoint (settings, epoch, history); no tensors read."""
    return _read_meta(path)["state"]


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Restore ``model`` (and ``optimizer``) in place; returns the checkpoint's JSON state."""
    from safetensors.torch import load_file

    data = _read_meta(path)
    tensors = load_file(str(path))
    model.load_state_dict(
        {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)},
        strict=True,
    )
    if optimizer is not None:
        try:
            opt_json = data["optimizer"]
            state: dict[int, dict] = {}
            for key, value in tensors.items():
                if key.startswith(OPTIM_PREFIX):
                    idx, name = key[len(OPTIM_PREFIX) :].split(".", 1)
                    state.setdefault(int(idx), {})[name] = value
            for idx, scalars in opt_json["scalars"].items():
                state.setdefault(int(idx), {}).update(scalars)
            groups = opt_json["param_groups"]
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise CheckpointError(
                f"{path}: its optimizer record is damaged ({type(e).__name__}: {e}); "
                "expected what save_checkpoint writes"
            ) from None
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    return data["state"]
