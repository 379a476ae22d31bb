"""Training from scratch: ``train(TrainConfig(...))`` or ``train(model, data, epochs=...)``, one
process or many (torchrun).

The recipe is the usual one for small image classifiers: SGD with momentum (or AdamW), a
linear warm-up then a cosine decay to zero, stepped every batch; label smoothing; no weight
decay on biases and normalization weights; random-crop (and, where images allow, flip)
augmentation; validation top-1 after every epoch.

Reproducibility is the design constraint. Every random draw after the model's initialization
comes from a generator seeded by (seed, epoch[, rank]): the data order, the augmentation, and
the global torch RNG (dropout) reseeded at each epoch start. A run stopped after any epoch
and resumed from its checkpoint therefore takes exactly the same steps as an uninterrupted
one, and ends with bit-identical weights (tested on CPU; on CUDA, non-deterministic cuDNN and
atomic-add kernels can still change the last bits). The schedule is a pure function of the
global step, so its "state" is one integer.

bf16 autocast: ``bf16="auto"`` uses it where it makes training faster, measured (see
``archopt.train.runtime.choose_bf16``); the choice is stored with the run and kept on resume.

Under ``torchrun --nproc-per-node N`` (WORLD_SIZE > 1) the same call trains with
DistributedDataParallel: gloo on CPU, NCCL on CUDA. ``batch_size`` is the global batch, split
evenly over the processes, so the learning rate means the same at any process count. Each
epoch's permutation is shared and sharded DistributedSampler-style; batch-norm statistics are
averaged over the ranks after every epoch so all ranks evaluate and end with the same model;
only rank 0 writes checkpoints and metrics.

A run, in steps: ``train`` settles the config and the process group; ``_run`` checks whether
the folder's run may continue (``resume.saved_run``), ``session.prepare_session`` loads the
data and builds the model and optimizer (restored from the checkpoint, or a fresh bf16
decision), then each epoch is ``run_epoch`` followed by ``resume.save_epoch``, and the end
``resume.save_result``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from archopt.report import log
from archopt.train.build import build_model
from archopt.train.config import TrainConfig, TrainResult
from archopt.train.data import ImageData, augment, normalize, parse_data_spec
from archopt.train.evaluate import evaluate, iter_batches
from archopt.train.resume import (
    read_result,
    save_epoch,
    save_result,
    saved_run,
    start_run_files,
)
from archopt.train.runtime import allreduce_sum, average_buffers, dist_info
from archopt.train.schedule import AUGMENT, TORCH, derive_seed, epoch_batches, lr_at
from archopt.train.session import Session, prepare_session

# Re-exported: the names this module has always offered.
__all__ = ["TrainConfig", "TrainResult", "build_model", "evaluate", "lr_at", "read_result", "train"]


def train(
    config: TrainConfig | str | nn.Module,
    data: str | ImageData | None = None,
    *,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    verbose: bool = True,
    **settings: Any,
) -> TrainResult:
    """Train an image classifier from scratch and return its validation top-1.

    ``config``: a ``TrainConfig`` (everything that decides the result); or, as a shortcut, a
    registered model name (built with the data's classes and channels, and
    ``model_overrides``) or a module (its classifier must match the data's classes), with the
    config's other fields as keyword ``settings`` (``epochs=3, batch_size=32, ...``).
    ``data``: ``"digits"`` (the default), ``"cifar10:PATH"``, ``"folder:PATH"`` (see
    ``archopt.train.data``), or an already loaded ``ImageData``; with a ``TrainConfig``, None
    (load ``config.data``) or the ``ImageData`` loaded for it.
    ``out_dir``: where ``checkpoint.safetensors`` (after every epoch), ``model.safetensors``,
    ``metrics.jsonl`` (one JSON object per epoch) and ``result.json`` go; None writes nothing
    and cannot resume. ``resume``: continue the run in ``out_dir`` (a finished run is
    returned as it is; no checkpoint starts a new run). Without ``resume``, an ``out_dir``
    that already holds a run is an error rather than overwritten.
    ``stop_after``: end this call after that many epochs in total, as if interrupted (a time
    slice of a longer job); the cosine schedule still spans ``epochs``.
    ``progress``: a progress bar per epoch (default: when stderr is a terminal).
    ``verbose``: one summary line per epoch on stderr.
    """
    cfg, model, data = _settle(config, data, settings)
    if isinstance(model, str):
        from archopt.registry import get_model_fn

        get_model_fn(model)  # a typo fails before any data is read
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 (epochs), got {stop_after}")
    if resume and out_dir is None:
        raise ValueError("resume needs out_dir: the folder of the run to continue")

    rank, world, local_rank = dist_info()
    own_group = world > 1 and not dist.is_initialized()
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        # Keep the caller's global RNG as it was: the run reseeds it at every epoch.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            return _run(
                cfg,
                model,
                data,
                out_dir=Path(out_dir) if out_dir is not None else None,
                resume=resume,
                stop_after=stop_after,
                device=device,
                rank=rank,
                world=world,
                progress=sys.stderr.isatty() if progress is None else progress,
                verbose=verbose,
            )
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _settle(config, data, settings: dict) -> tuple[TrainConfig, str | nn.Module, Any]:
    """(config, the model name or module, the data spec or ImageData) of a ``train`` call."""
    if isinstance(config, TrainConfig):
        if settings:
            raise ValueError(
                f"train takes settings in its TrainConfig or as keywords, not both; got "
                f"a TrainConfig and {sorted(settings)}"
            )
        if data is not None and not isinstance(data, ImageData):
            raise ValueError(
                f"with a TrainConfig, data must be None (config.data is loaded) or an "
                f"ImageData, got {data!r}"
            )
        return config, config.model, config.data if data is None else data
    data = "digits" if data is None else data
    name = config if isinstance(config, str) else f"custom:{type(config).__name__}"
    data_name = str(parse_data_spec(data)) if isinstance(data, str) else data.name
    settings["model_overrides"] = settings.get("model_overrides") or {}
    return TrainConfig(model=name, data=data_name, **settings), config, data


def _run(
    cfg: TrainConfig,
    model_arg: str | nn.Module,
    data_arg: str | ImageData,
    *,
    out_dir: Path | None,
    resume: bool,
    stop_after: int | None,
    device: torch.device,
    rank: int,
    world: int,
    progress: bool,
    verbose: bool,
) -> TrainResult:
    is_main = rank == 0
    saved = saved_run(cfg, out_dir, resume, world, announce=verbose and is_main)
    s = prepare_session(cfg, model_arg, data_arg, saved, out_dir, device, rank, world)
    if saved is not None:
        log(f"resuming {out_dir} after epoch {s.start_epoch}", verbose and is_main)
    if is_main and out_dir is not None:
        start_run_files(out_dir, fresh=saved is None)
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    session_start = time.perf_counter()
    elapsed = s.time_before  # training time of the run up to the last finished epoch
    for epoch in range(s.start_epoch, last_epoch):
        row = run_epoch(s, epoch, progress and is_main)
        s.history.append(row)
        elapsed = s.time_before + time.perf_counter() - session_start
        if is_main and out_dir is not None:
            state = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * s.steps_per_epoch,
                "config": asdict(cfg),
                "bf16": s.use_bf16,
                "world_size": world,
                "history": s.history,
                "time_s": elapsed,
            }
            save_epoch(out_dir, s.model, s.optimizer, state, row)
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss "
            f"{row['val_loss']:.4f}, val top-1 {row['val_top1']:.4f}, lr {row['lr']:.3g}, "
            f"{row['time_s']:.1f} s" + (" (bf16)" if s.use_bf16 else ""),
            verbose and is_main,
        )
    s.model.eval()
    result = _result(s, elapsed, out_dir)
    if is_main and out_dir is not None:
        save_result(out_dir, s.model, result)
    if world > 1:
        dist.barrier()  # nobody reads files rank 0 is still writing
    return result


def run_epoch(s: Session, epoch: int, progress: bool) -> dict:
    """Train one epoch, average the batch-norm statistics over ranks, validate; the epoch's
    row of metrics. Raises FloatingPointError (on every rank) when the loss diverged."""
    cfg, data, device, rank, world = s.cfg, s.data, s.device, s.rank, s.world
    t0 = time.perf_counter()
    torch.manual_seed(derive_seed(cfg.seed, epoch, TORCH, rank))  # dropout and the like
    aug_gen = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, AUGMENT, rank))
    batches = epoch_batches(
        len(data.train),
        cfg.batch_size,
        seed=cfg.seed,
        epoch=epoch,
        rank=rank,
        world_size=world,
    )
    s.train_module.train()
    # Summed on the device: reading the loss every step would stall a GPU each time.
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    bar = _progress_bar(len(batches), f"epoch {epoch + 1}/{cfg.epochs}", progress)
    for i, (images, labels) in enumerate(iter_batches(data.train, batches, cfg.num_workers)):
        step = epoch * s.steps_per_epoch + i
        lr = lr_at(step, base_lr=cfg.lr, warmup_steps=s.warmup_steps, total_steps=s.total_steps)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        images = augment(images, data.pad, data.flip, aug_gen)
        x = normalize(images.to(device, non_blocking=True), data.mean, data.std)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.use_bf16):
            logits = s.train_module(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        s.optimizer.step()
        loss_acc += loss.detach() * labels.numel()
        seen += labels.numel()
        if bar is not None and not bar.disable:
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.3g}", refresh=False)
    if bar is not None:
        bar.close()
    loss_sum, seen = allreduce_sum([loss_acc.item(), float(seen)], device, world)
    if not math.isfinite(loss_sum):  # after the all-reduce, so every rank stops together
        raise FloatingPointError(
            f"training diverged in epoch {epoch + 1} (loss is {loss_sum}); lower lr "
            f"(got {cfg.lr}) or lengthen the warm-up (got {cfg.warmup_epochs} epochs)"
        )
    average_buffers(s.model, world)
    val_loss, val_top1 = evaluate(
        s.model,
        data,
        batch_size=max(cfg.batch_size, 256),
        bf16=s.use_bf16,
        device=device,
        rank=rank,
        world_size=world,
        num_workers=cfg.num_workers,
    )
    return {
        "epoch": epoch + 1,
        "train_loss": loss_sum / seen,
        "val_loss": val_loss,
        "val_top1": val_top1,
        "lr": s.optimizer.param_groups[0]["lr"],
        "time_s": time.perf_counter() - t0,
    }


def _progress_bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _result(s: Session, elapsed: float, out_dir: Path | None) -> TrainResult:
    history, cfg = s.history, s.cfg
    done = len(history)
    last = history[-1] if history else {}
    return TrainResult(
        model_name=cfg.model,
        data=cfg.data,
        top1=last.get("val_top1", float("nan")),
        best_top1=max((h["val_top1"] for h in history), default=float("nan")),
        val_loss=last.get("val_loss", float("nan")),
        train_loss=last.get("train_loss", float("nan")),
        epochs_done=done,
        epochs=cfg.epochs,
        finished=done == cfg.epochs,
        time_s=elapsed,
        bf16=s.use_bf16,
        world_size=s.world,
        params=sum(p.numel() for p in s.model.parameters()),
        history=history,
        config=asdict(cfg),
        out_dir=str(out_dir) if out_dir is not None else None,
        model=s.model,
    )
