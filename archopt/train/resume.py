"""A run's folder: whether a run may continue there, and what each step writes into it.

``checkpoint.safetensors`` (model, optimizer and run state, written atomically after every
epoch: the truth on resume), ``metrics.jsonl`` (one JSON object per epoch, appended after the
checkpoint and rewritten from it on resume, so a crash between the two is repaired),
``model.safetensors`` and ``result.json`` at the end. Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from archopt.io import atomic_write_text
from archopt.report import log
from archopt.train.checkpoint import (
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    save_weights,
)
from archopt.train.config import TrainConfig, TrainResult

CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
RESULT = "result.json"
# Settings that may change between a run and its resumption without changing the result.
RESUME_FREE = ("num_workers",)


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE}


def saved_run(
    cfg: TrainConfig, out_dir: Path | None, resume: bool, world: int, announce: bool
) -> dict | None:
    """The state of the run in ``out_dir`` to continue, or None for a new run.

    Raises ValueError when ``out_dir`` holds a run and ``resume`` is off, or when the run's
    settings or process count differ from ``cfg`` and ``world`` (its result would not be the
    run's)."""
    ckpt_path = out_dir / CHECKPOINT if out_dir is not None else None
    if ckpt_path is None or not ckpt_path.exists():
        log(f"no checkpoint in {out_dir}; starting a new run", resume and announce)
        return None
    saved = read_checkpoint_state(ckpt_path)
    if not resume:
        raise ValueError(
            f"{out_dir} already holds a run (epoch {saved['epoch']} of "
            f"{saved['config']['epochs']}); pass resume=True (--resume) to continue it or "
            "choose another output folder"
        )
    mine, theirs = _comparable(asdict(cfg)), _comparable(saved["config"])
    diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
    if diff:
        listed = "; ".join(f"{k}: run has {a!r}, got {b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"cannot resume {out_dir} with different settings (the result would not be "
            f"the run's): {listed}"
        )
    if saved["world_size"] != world:
        raise ValueError(
            f"cannot resume {out_dir} with {world} process(es): the run used "
            f"{saved['world_size']}, and the data sharding depends on it"
        )
    return saved


def restore_run(
    out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, is_main: bool
) -> dict:
    """Load the checkpoint in ``out_dir`` into ``model`` and ``optimizer``; its run state
    (``history``, ``epoch``, ``time_s``, ``bf16``). Rank 0 rewrites the metrics from it."""
    state = load_checkpoint(out_dir / CHECKPOINT, model, optimizer)
    if is_main:  # a crash between checkpoint and metrics write is repaired here
        metrics = "".join(json.dumps(h) + "\n" for h in state["history"])
        atomic_write_text(out_dir / METRICS, metrics)
    return state


def start_run_files(out_dir: Path, fresh: bool) -> None:
    """Create ``out_dir``; a fresh run starts with empty metrics."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fresh:
        (out_dir / METRICS).write_text("")


def save_epoch(
    out_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, row: dict
) -> None:
    """After an epoch: the checkpoint with the run ``state`` (first: the truth on resume),
    then the epoch's ``row`` of metrics."""
    save_checkpoint(out_dir / CHECKPOINT, model, optimizer, state)
    with open(out_dir / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def save_result(out_dir: Path, model: nn.Module, result: TrainResult) -> None:
    """At the end: the weights alone, and the result as JSON."""
    save_weights(model, out_dir / WEIGHTS)
    atomic_write_text(out_dir / RESULT, json.dumps(result.as_dict(), indent=2) + "\n")


def read_result(out_dir: str | os.PathLike) -> dict | None:
    """A finished run's ``result.json`` as a dict, or None if there is none."""
    path = Path(out_dir) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None
