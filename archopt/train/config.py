"""What decides a training run (``TrainConfig``, checked when built) and what it returns
(``TrainResult``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

OPTIMIZERS = ("sgd", "adamw")
BF16_MODES = ("auto", "on", "off")
DEFAULT_LR = {"sgd": 0.1, "adamw": 2e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.05}


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

    @classmethod
    def from_options(cls, options: Mapping[str, Any], **more: Any) -> TrainConfig:
        """A config from the entries of ``options`` that name its fields (others, such as a
        command line's own options, are ignored), and ``more``."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}, **more)


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
