"""The built-in search spaces (MobileNet, MobileViT, Longformer attention over pixels) and
``get_space``: a space by name, from a JSON file, a dict, or as it is."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from archopt.search.space import SearchSpace

_WIDTHS = [0.25, 0.5, 0.75, 1.0]
_MOBILENET_BLOCKS = ["conv", "ds", "ir"]
# One epoch at batch 16 (90 steps on the digits): every network of these spaces learns
# something in it (measured: 0.3-0.8 top-1), where 20 steps at batch 64 left most at chance.
_SGD = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "warmup_epochs": 0.25}


def _mnv1(label: str, width: float, res: int) -> dict:
    return {
        "label": label,
        "model": "mobilenet_v1_100",
        "overrides": {"width_mult": width},
        "resolution": res,
    }


MOBILENET = SearchSpace(
    name="mobilenet",
    model="stagenet",
    description="MobileNet v1's five stages (stem s2, then 64, 128, 256, 512, 1024 channels at "
    "width 1): per stage the block (full conv, depthwise separable, inverted residual), width "
    "multiplier, kernel size, expansion and depth; the stem width; the input resolution",
    resolution=(32, 40, 48),
    fixed={"act": "relu6"},
    stem_channels=(8, 16, 32),
    stages=(
        {
            "block": _MOBILENET_BLOCKS,
            "channels": 64,
            "width": _WIDTHS,
            "depth": [1, 2],
            "stride": 1,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4, 6],
        },
        {
            "block": _MOBILENET_BLOCKS,
            "channels": 128,
            "width": _WIDTHS,
            "depth": [1, 2, 3],
            "stride": 2,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4, 6],
        },
        {
            "block": _MOBILENET_BLOCKS,
            "channels": 256,
            "width": _WIDTHS,
            "depth": [1, 2, 3],
            "stride": 2,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4, 6],
        },
        {
            "block": _MOBILENET_BLOCKS,
            "channels": 512,
            "width": _WIDTHS,
            "depth": [2, 4, 6],
            "stride": 2,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4, 6],
        },
        {
            "block": _MOBILENET_BLOCKS,
            "channels": 1024,
            "width": _WIDTHS,
            "depth": [1, 2],
            "stride": 2,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4, 6],
        },
    ),
    recipe=_SGD,
    hand_designed=(
        *(_mnv1(f"MobileNet v1 {a}-48", a, 48) for a in (1.0, 0.75, 0.5, 0.25)),
        *(_mnv1(f"MobileNet v1 1.0-{r}", 1.0, r) for r in (40, 32)),
    ),
)

_MOBILEVIT_HAND = tuple(
    {"label": f"MobileViT-{v.upper()}", "model": f"mobilevit_{v}", "resolution": 64}
    for v in ("xxs", "xs", "s")
)

MOBILEVIT = SearchSpace(
    name="mobilevit",
    model="stagenet",
    description="MobileViT's five stages (stem 16, then 32, 64, 96, 128, 160 channels as in "
    "MobileViT-S): stages 1-2 inverted residual or depthwise separable, stages 3-5 inverted "
    "residuals or a MobileViT block; per stage width, depth (transformer layers in a MobileViT "
    "block), expansion, kernel size and transformer width; the input resolution",
    resolution=(32, 48, 64),
    fixed={"act": "silu"},
    stem_channels=16,
    head_ratio=4.0,
    stages=(
        {
            "block": ["ir", "ds"],
            "channels": 32,
            "width": [0.5, 0.75, 1.0],
            "depth": [1, 2],
            "stride": 1,
            "expand_ratio": [2, 4],
        },
        {
            "block": ["ir", "ds"],
            "channels": 64,
            "width": [0.5, 0.75, 1.0],
            "depth": [1, 2, 3],
            "stride": 2,
            "expand_ratio": [2, 4],
        },
        {
            "block": ["ir", "mvit"],
            "channels": 96,
            "width": [0.5, 0.75, 1.0],
            "depth": [1, 2, 3],
            "stride": 2,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4],
            "dim": [64, 96, 144],
        },
        {
            "block": ["ir", "mvit"],
            "channels": 128,
            "width": [0.5, 0.75, 1.0],
            "depth": [1, 2, 4],
            "stride": 2,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4],
            "dim": [80, 120, 192],
        },
        {
            "block": ["ir", "mvit"],
            "channels": 160,
            "width": [0.5, 0.75, 1.0],
            "depth": [1, 2, 3],
            "stride": 2,
            "kernel_size": [3, 5],
            "expand_ratio": [2, 4],
            "dim": [96, 144, 240],
        },
    ),
    recipe=_SGD,
    hand_designed=_MOBILEVIT_HAND,
)


def _longformer(label: str, window: int, **kw) -> dict:
    overrides = {"window": window, "num_global": 1, "num_layers": 2, "hidden_size": 64, **kw}
    return {"label": label, "model": "pixel_longformer", "overrides": overrides, "resolution": 8}


ATTENTION = SearchSpace(
    name="attention",
    model="pixel_longformer",
    description="Longformer layers over the pixels of an 8x8 image (64 tokens, Long Range "
    "Arena's Image task): the one-sided window, a dilation per head, the number of global "
    "tokens, the number of layers and their width",
    resolution=(8,),
    fixed={"num_heads": 4, "patch_size": 1, "mlp_ratio": 2.0},
    fields={
        "window": [1, 2, 4, 8, 16, 32],
        "num_global": [0, 1, 2, 4],
        "num_layers": [1, 2, 3],
        "hidden_size": [32, 64, 96],
    },
    per_head={"dilation": [1, 2, 4]},
    recipe={"epochs": 6, "batch_size": 64, "optimizer": "adamw", "lr": 3e-3},
    hand_designed=(
        _longformer("Longformer w=2", 2),
        _longformer("Longformer w=8", 8),
        _longformer("full attention", 64),
    ),
)

SPACES: dict[str, SearchSpace] = {s.name: s for s in (MOBILENET, MOBILEVIT, ATTENTION)}


def get_space(space: str | Mapping | SearchSpace) -> SearchSpace:
    """A built-in space by name, a space from a JSON file path, a dict, or a space as it is."""
    if isinstance(space, SearchSpace):
        space.validate()
        return space
    if isinstance(space, Mapping):
        return SearchSpace.from_dict(space)
    if not isinstance(space, str) or not space.strip():
        raise ValueError(
            f"space must be one of {sorted(SPACES)} or a path to a JSON file, got {space!r}"
        )
    if space in SPACES:
        return SPACES[space]
    path = Path(space).expanduser()
    if space.endswith(".json") or path.exists():
        if not path.is_file():
            raise ValueError(f"space file {str(path)!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"space file {str(path)!r} is not valid JSON: {e}") from None
        if isinstance(data, Mapping):
            data = {"name": path.stem, **data}
        return SearchSpace.from_dict(data)
    raise ValueError(
        f"space must be one of {sorted(SPACES)} or a path to a JSON file, got {space!r}"
    )


__all__ = ["ATTENTION", "MOBILENET", "MOBILEVIT", "SPACES", "get_space"]
