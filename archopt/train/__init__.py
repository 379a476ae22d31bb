"""Training from scratch: local data, the training loop (one process or torchrun), checkpoints.

``train(TrainConfig(...))`` (or ``train(model, data, epochs=...)``) is the entry point;
``archopt train`` builds the ``TrainConfig`` from its options and calls it. What lives where:

- ``config``: ``TrainConfig`` (what decides a run, checked) and ``TrainResult``;
- ``loop``: ``train`` and one epoch (``run_epoch``); ``session``: a run's preparation (data,
  model, optimizer, restored or fresh);
- ``resume``: a run's folder: may it continue, what each epoch and the end write;
- ``build``: the model sized for the data, and its optimizer; ``evaluate``: validation;
- ``data``: the data spec, ``load_data`` and batch transforms; ``sources``: digits, CIFAR-10,
  image folders (``files`` reads them) into the splits of ``images``; ``schedule``: seeds,
  batches, learning rate;
- ``runtime``: processes (DDP), bf16 decision; ``checkpoint``: safetensors files;
- ``study``: train and measure several models for a Pareto front (``archopt pareto``).

Imports stay below: ops, models, loading, measure, pareto; never bench, tour or the CLI.
"""

from archopt.io import atomic_write
from archopt.train.checkpoint import (
    load_checkpoint,
    load_weights,
    read_checkpoint_state,
    save_checkpoint,
    save_weights,
)
from archopt.train.config import TrainConfig, TrainResult
from archopt.train.data import DataSpec, ImageData, load_data, parse_data_spec
from archopt.train.evaluate import evaluate
from archopt.train.loop import train
from archopt.train.resume import read_result
from archopt.train.schedule import lr_at

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
