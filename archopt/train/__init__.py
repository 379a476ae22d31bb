"""Training from scratch: local data, the training loop (one process or torchrun), checkpoints.

``train(model, data, epochs=...)`` is the entry point; ``archopt train`` wraps it.
"""

from archopt.io import atomic_write
from archopt.train.checkpoint import (
    load_checkpoint,
    load_weights,
    read_checkpoint_state,
    save_checkpoint,
    save_weights,
)
from archopt.train.data import DataSpec, ImageData, load_data, parse_data_spec
from archopt.train.loop import TrainConfig, TrainResult, evaluate, lr_at, read_result, train

__all__ = [
    "DataSpec",
    "ImageData",
    "TrainConfig",
    "TrainResult",
    "atomic_write",
    "evaluate",
    "load_checkpoint",
    "load_data",
    "load_weights",
    "lr_at",
    "parse_data_spec",
    "read_checkpoint_state",
    "read_result",
    "save_checkpoint",
    "save_weights",
    "train",
]
