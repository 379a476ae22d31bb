"""A training run's session: the data, the model (on its device, wrapped for DDP where there
are several processes), its optimizer, the schedule's lengths and where the run stands, either
restored from the run's checkpoint or fresh, with the bf16 decision taken once for every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from archopt.train.build import build_model, check_logits, make_optimizer
from archopt.train.config import TrainConfig
from archopt.train.data import ImageData, load_data, normalize
from archopt.train.evaluate import iter_batches
from archopt.train.resume import restore_run
from archopt.train.runtime import choose_bf16
from archopt.train.schedule import epoch_batches


@dataclass
class Session:
    """A run in progress: what it trains, how, and where it stands."""

    cfg: TrainConfig
    data: ImageData
    model: nn.Module
    train_module: nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    use_bf16: bool
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    start_epoch: int = 0
    time_before: float = 0.0  # training time of earlier sessions of the run
    history: list[dict] = field(default_factory=list)


def prepare_session(
    cfg: TrainConfig,
    model_arg: str | nn.Module,
    data_arg: str | ImageData,
    saved: dict | None,
    out_dir: Path | None,
    device: torch.device,
    rank: int,
    world: int,
) -> Session:
    """The data, the model and its optimizer, restored from the checkpoint when ``saved``,
    else with a fresh bf16 decision (one for every rank)."""
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
    optimizer = make_optimizer(model, cfg)

    batches0 = epoch_batches(
        len(data.train), cfg.batch_size, seed=cfg.seed, epoch=0, rank=rank, world_size=world
    )
    steps_per_epoch = len(batches0)
    total_steps = steps_per_epoch * cfg.epochs
    s = Session(
        cfg=cfg,
        data=data,
        model=model,
        train_module=model,
        optimizer=optimizer,
        device=device,
        rank=rank,
        world=world,
        use_bf16=False,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup_steps=min(total_steps, round(cfg.warmup_epochs * steps_per_epoch)),
    )
    if saved is not None:
        state = restore_run(out_dir, model, optimizer, is_main=rank == 0)
        s.history, s.start_epoch = state["history"], state["epoch"]
        s.time_before, s.use_bf16 = state["time_s"], state["bf16"]
    else:
        x, y = next(iter_batches(data.train, batches0[:1], cfg.num_workers))
        x, y = normalize(x.to(device), data.mean, data.std), y.to(device)
        check_logits(model, x, data)
        s.use_bf16 = choose_bf16(cfg.bf16, model, x, y)
        if world > 1:  # one timing decides for every rank
            flag = [s.use_bf16]
            dist.broadcast_object_list(flag, src=0)
            s.use_bf16 = bool(flag[0])
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        s.train_module = DistributedDataParallel(model, device_ids=ids)
    return s


__all__ = ["Session", "prepare_session"]
