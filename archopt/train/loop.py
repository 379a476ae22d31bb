"""Training from scratch: ``train(model, data, epochs=...)``, one process or many (torchrun).

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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from archopt.io import atomic_write_text
from archopt.train.checkpoint import (
    load_checkpoint,
    read_checkpoint_state,
    save_checkpoint,
    save_weights,
)
from archopt.train.data import (
    ImageData,
    TensorImages,
    augment,
    load_data,
    normalize,
    parse_data_spec,
)
from archopt.train.runtime import allreduce_sum, average_buffers, choose_bf16, dist_info
from archopt.train.schedule import AUGMENT, TORCH, derive_seed, epoch_batches, lr_at

OPTIMIZERS = ("sgd", "adamw")
BF16_MODES = ("auto", "on", "off")
DEFAULT_LR = {"sgd": 0.1, "adamw": 2e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}
CHECKPOINT = "checkpoint.safetensors"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
RESULT = "result.json"
# Settings that may change between a run and its resumption without changing the result.
RESUME_FREE = ("num_workers",)


@dataclass
class TrainConfig:
    """Everything that decides a run's result (and so must match when it is resumed)."""

    model: str
    data: str = "digits"
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None  # None: 0.1 for SGD, 2e-3 for AdamW
    weight_decay: float | None = None  # None: 5e-4 for SGD, 0.05 for AdamW
    momentum: float = 0.9  # SGD only
    warmup_epochs: float = 1.0  # linear warm-up length; fractions of an epoch are fine
    label_smoothing: float = 0.1
    resolution: int | None = None  # None: the data's default (32 for digits and CIFAR-10)
    channels: int | None = None  # None: as stored (1 for digits)
    model_overrides: dict[str, Any] = field(default_factory=dict)
    bf16: str = "auto"  # "auto" | "on" | "off"; see the module docstring
    seed: int = 0
    val_fraction: float = 0.2
    num_workers: int = 0  # DataLoader workers for folder data (in-memory data needs none)

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.optimizer]
        if self.weight_decay is None:
            self.weight_decay = DEFAULT_WEIGHT_DECAY[self.optimizer]
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not self.warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.bf16 not in BF16_MODES:
            raise ValueError(f"bf16 must be one of {BF16_MODES}, got {self.bf16!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        self.model_overrides = dict(self.model_overrides)


@dataclass
class TrainResult:
    model_name: str
    data: str
    top1: float  # validation top-1 after the last epoch run
    best_top1: float
    val_loss: float
    train_loss: float
    epochs_done: int
    epochs: int
    finished: bool  # False when stopped early (stop_after) or interrupted
    time_s: float  # training wall time of the run, all sessions, to its last epoch
    bf16: bool
    world_size: int
    params: int
    history: list[dict]
    config: dict
    out_dir: str | None
    model: nn.Module | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        return json.loads(json.dumps(d))


# ---------------------------------------------------------------------------------- helpers


def _iter_batches(
    dataset, batches: list[torch.Tensor], num_workers: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(dataset, TensorImages):
        for idx in batches:
            yield dataset.get_batch(idx)
        return
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=[b.tolist() for b in batches],
        num_workers=num_workers,
        persistent_workers=False,
    )
    yield from loader


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decaying biases and norm scales only shrinks what normalization rescales anyway.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def build_model(cfg: TrainConfig, data: ImageData) -> nn.Module:
    """A registered image model sized for the data: classes, channels, and ViT's img_size."""
    from archopt.registry import create_model, get_model_fn

    overrides = {"num_classes": data.num_classes, "in_chans": data.in_chans}
    overrides.update(cfg.model_overrides)
    get_model_fn(cfg.model)  # an unknown name fails here, with the closest names
    try:
        model = create_model(cfg.model, **overrides)
    except ValueError as e:
        if "num_classes" in str(e) and "unknown" in str(e):
            raise ValueError(
                f"model {cfg.model!r} is not an image classifier (it takes no num_classes and "
                f"in_chans), so it cannot be trained on {data.name}: {e}"
            ) from e
        raise
    config = getattr(model, "config", None)
    # A ViT learns position embeddings for one image size: rebuild it for the data's.
    if (
        "img_size" not in cfg.model_overrides
        and dataclasses.is_dataclass(config)
        and getattr(config, "img_size", data.resolution) != data.resolution
    ):
        model = create_model(cfg.model, **overrides, img_size=data.resolution)
    return model


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ImageData,
    *,
    batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) on the validation split, summed over ranks."""
    device = torch.device(device)
    model.eval()
    n = len(data.val)
    shard = torch.arange(rank, n, world_size)  # uneven shards are fine: no collective inside
    batches = [shard[i : i + batch_size] for i in range(0, len(shard), batch_size)]
    loss_sum = correct = count = 0.0
    for images, labels in _iter_batches(data.val, batches, num_workers):
        x = normalize(images.to(device), data.mean, data.std)
        labels = labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += float((logits.argmax(1) == labels).sum())
        count += labels.numel()
    loss_sum, correct, count = allreduce_sum([loss_sum, correct, count], device, world_size)
    return loss_sum / max(count, 1), correct / max(count, 1)


def _progress_bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: no bar
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def _comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in RESUME_FREE}


# ------------------------------------------------------------------------------------ train


def train(
    model: str | nn.Module,
    data: str | ImageData = "digits",
    *,
    epochs: int = 10,
    batch_size: int = 64,
    optimizer: str = "sgd",
    lr: float | None = None,
    weight_decay: float | None = None,
    momentum: float = 0.9,
    warmup_epochs: float = 1.0,
    label_smoothing: float = 0.1,
    resolution: int | None = None,
    channels: int | None = None,
    model_overrides: dict | None = None,
    bf16: str = "auto",
    seed: int = 0,
    val_fraction: float = 0.2,
    num_workers: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    verbose: bool = True,
) -> TrainResult:
    """Train an image classifier from scratch and return its validation top-1.

    ``model``: a registered name (built with the data's classes and channels, and
    ``model_overrides``) or a module (its classifier must match the data's classes).
    ``data``: ``"digits"``, ``"cifar10:PATH"``, ``"folder:PATH"`` (see ``archopt.train.data``),
    or an already loaded ``ImageData``.
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
    model_name = model if isinstance(model, str) else f"custom:{type(model).__name__}"
    data_name = str(parse_data_spec(data)) if isinstance(data, str) else data.name
    cfg = TrainConfig(
        model=model_name,
        data=data_name,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        warmup_epochs=warmup_epochs,
        label_smoothing=label_smoothing,
        resolution=resolution,
        channels=channels,
        model_overrides=model_overrides or {},
        bf16=bf16,
        seed=seed,
        val_fraction=val_fraction,
        num_workers=num_workers,
    )
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
            return _train(
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


def _log(msg: str, enabled: bool) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _train(
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
    ckpt_path = out_dir / CHECKPOINT if out_dir is not None else None
    saved: dict | None = None
    if ckpt_path is not None and ckpt_path.exists():
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
    elif resume:
        _log(f"no checkpoint in {out_dir}; starting a new run", verbose and is_main)

    data = (
        data_arg
        if isinstance(data_arg, ImageData)
        else load_data(
            data_arg,
            resolution=cfg.resolution,
            channels=cfg.channels,
            val_fraction=cfg.val_fraction,
        )
    )
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data) if isinstance(model_arg, str) else model_arg
    model = model.to(device)
    optimizer = _make_optimizer(model, cfg)

    batches0 = epoch_batches(
        len(data.train), cfg.batch_size, seed=cfg.seed, epoch=0, rank=rank, world_size=world
    )
    steps_per_epoch = len(batches0)
    total_steps = steps_per_epoch * cfg.epochs
    warmup_steps = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))

    history: list[dict] = []
    start_epoch, time_before = 0, 0.0
    if saved is not None:
        state = load_checkpoint(ckpt_path, model, optimizer)
        history, start_epoch = state["history"], state["epoch"]
        time_before, use_bf16 = state["time_s"], state["bf16"]
        if is_main:  # a crash between checkpoint and metrics write is repaired here
            atomic_write_text(out_dir / METRICS, "".join(json.dumps(h) + "\n" for h in history))
        _log(f"resuming {out_dir} after epoch {start_epoch}", verbose and is_main)
    else:
        x, y = next(_iter_batches(data.train, batches0[:1], cfg.num_workers))
        x, y = normalize(x.to(device), data.mean, data.std), y.to(device)
        _check_logits(model, x, data)
        use_bf16 = choose_bf16(cfg.bf16, model, x, y)
        if world > 1:  # one timing decides for every rank
            flag = [use_bf16]
            dist.broadcast_object_list(flag, src=0)
            use_bf16 = bool(flag[0])

    train_module: nn.Module = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        train_module = DistributedDataParallel(model, device_ids=ids)

    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if saved is None:
            (out_dir / METRICS).write_text("")
    last_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, stop_after)
    session_start = time.perf_counter()
    elapsed = time_before  # training time of the run up to the last finished epoch
    for epoch in range(start_epoch, last_epoch):
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
        train_module.train()
        # Summed on the device: reading the loss every step would stall a GPU each time.
        loss_acc = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        bar = _progress_bar(len(batches), f"epoch {epoch + 1}/{cfg.epochs}", progress and is_main)
        for i, (images, labels) in enumerate(_iter_batches(data.train, batches, cfg.num_workers)):
            step = epoch * steps_per_epoch + i
            lr = lr_at(step, base_lr=cfg.lr, warmup_steps=warmup_steps, total_steps=total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = augment(images, data.pad, data.flip, aug_gen)
            x = normalize(images.to(device, non_blocking=True), data.mean, data.std)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                logits = train_module(x)
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
        average_buffers(model, world)
        val_loss, val_top1 = evaluate(
            model,
            data,
            batch_size=max(cfg.batch_size, 256),
            bf16=use_bf16,
            device=device,
            rank=rank,
            world_size=world,
            num_workers=cfg.num_workers,
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / seen,
            "val_loss": val_loss,
            "val_top1": val_top1,
            "lr": optimizer.param_groups[0]["lr"],
            "time_s": time.perf_counter() - t0,
        }
        history.append(row)
        elapsed = time_before + time.perf_counter() - session_start
        if is_main and out_dir is not None:
            state = {
                "epoch": epoch + 1,
                "step": (epoch + 1) * steps_per_epoch,
                "config": asdict(cfg),
                "bf16": use_bf16,
                "world_size": world,
                "history": history,
                "time_s": elapsed,
            }
            save_checkpoint(ckpt_path, model, optimizer, state)  # first: the truth on resume
            with open(out_dir / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")
        _log(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss "
            f"{val_loss:.4f}, val top-1 {val_top1:.4f}, lr {row['lr']:.3g}, "
            f"{row['time_s']:.1f} s" + (" (bf16)" if use_bf16 else ""),
            verbose and is_main,
        )
    model.eval()
    done = len(history)
    last = history[-1] if history else {}
    result = TrainResult(
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
        bf16=use_bf16,
        world_size=world,
        params=sum(p.numel() for p in model.parameters()),
        history=history,
        config=asdict(cfg),
        out_dir=str(out_dir) if out_dir is not None else None,
        model=model,
    )
    if is_main and out_dir is not None:
        save_weights(model, out_dir / WEIGHTS)
        atomic_write_text(out_dir / RESULT, json.dumps(result.as_dict(), indent=2) + "\n")
    if world > 1:
        dist.barrier()  # nobody reads files rank 0 is still writing
    return result


def _check_logits(model: nn.Module, x: torch.Tensor, data: ImageData) -> None:
    with torch.no_grad():
        was_training = model.training
        model.eval()
        out = model(x[:2])
        model.train(was_training)
    if out.ndim != 2 or out.shape[1] != data.num_classes:
        raise ValueError(
            f"the model must return (batch, {data.num_classes}) logits for {data.name} "
            f"({data.num_classes} classes), got shape {tuple(out.shape)}"
        )


def read_result(out_dir: str | os.PathLike) -> dict | None:
    """A finished run's ``result.json`` as a dict, or None if there is none."""
    path = Path(out_dir) / RESULT
    return json.loads(path.read_text()) if path.is_file() else None
