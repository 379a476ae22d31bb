"""What a run trains: a registered model sized for the data (or the caller's, checked), and
its optimizer."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from archopt.train.config import TrainConfig
from archopt.train.data import ImageData


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decaying biases and norm scales only shrinks what normalization rescales anyway.
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW, no weight decay on biases and normalization weights."""
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
        unknown = str(e).split(": expected", 1)[0]  # the fields refused, not the ones offered
        if "num_classes" in unknown and "unknown" in unknown:
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


def check_logits(model: nn.Module, x: torch.Tensor, data: ImageData) -> None:
    """Raise ValueError unless ``model`` maps the batch ``x`` to (batch, classes) logits."""
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
