"""What the subcommands share: printing a result, ``--set`` overrides, an image model from the
command's arguments."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def emit(data, as_json: bool, text: str) -> None:
    print(json.dumps(data, indent=2, default=float) if as_json else text)


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def model_from_args(name: str, args) -> tuple[torch.nn.Module, tuple[int, ...]]:
    from math import prod

    from archopt.io import check_fits
    from archopt.registry import create_model, list_models, model_info

    overrides = parse_overrides(args.set or [])
    if getattr(args, "width_mult", None) is not None:
        overrides["width_mult"] = args.width_mult
    info = model_info(name)
    if info.task != "image":
        raise ValueError(
            f"{args.command} takes an image model, got {name!r}, "
            f"{ {'lm': 'a language', 'encoder': 'a sequence encoder'}[info.task] } model "
            f"(image models: {', '.join(list_models(task='image'))})"
        )
    model = create_model(name, **overrides).eval()
    res = args.resolution or getattr(model, "default_resolution", 224)
    in_chans = getattr(getattr(model, "config", None), "in_chans", 3)
    shape = (getattr(args, "batch_size", 1), in_chans, res, res)
    # Activations of these nets peak at a few times the input (MobileNet v1: 64 channels at
    # half resolution, 5x a 3-channel input); 32x the input, times the width, bounds them.
    width = float(overrides.get("width_mult", 1.0))
    check_fits(f"a {shape[0]}x{in_chans}x{res}x{res} input", 32 * 4 * prod(shape) * max(width, 1))
    return model, shape
