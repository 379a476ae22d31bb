"""Longformer over pixels: an image classified as the sequence of its pixels, with local attention.

The task is Long Range Arena's "Image" (Tay et al., 2021, "Long Range Arena", arXiv:2011.04006,
Sec. 3.4): flatten an image into one token per pixel (or per ``patch_size`` x ``patch_size``
patch) and classify it, so the sequence is long and attention must be cheap. The encoder layers
are Longformer's (Beltagy et al., 2020, arXiv:2004.05150; ``models.longformer.LongformerLayer``:
post-norm, GELU, separate global projections) with the three knobs of its attention that a
search can turn: the one-sided ``window``, a ``dilation`` per head (the paper dilates some heads
and not others), and ``num_global`` learned tokens put in front of the pixels, which attend to
every token and are attended by every token (the paper's global attention on ``[CLS]``); the
first one feeds the classifier, as Longformer classifies from ``<s>``. With no global token the
classifier reads the mean of the pixel tokens.

Position embeddings are learned for one image size (``img_size``), as in ViT; the training loop
rebuilds the model for the data's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from archopt.models._registry import register_model, with_overrides
from archopt.models.image import check_image, random_images
from archopt.models.longformer import LongformerConfig, LongformerLayer
from archopt.ops.attention import BACKENDS


@dataclass
class PixelLongformerConfig:
    img_size: int = 32
    patch_size: int = 1  # pixels per token side: 1 = one token per pixel
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: float = 2.0
    window: int = 16  # one-sided: a token sees 2w+1 tokens
    dilation: int | Sequence[int] = 1  # one for every head, or one per head
    num_global: int = 1  # learned global tokens in front of the pixels; 0: mean pooling
    num_classes: int = 1000
    in_chans: int = 3
    layer_norm_eps: float = 1e-5
    backend: str = "auto"  # local attention backend

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "hidden_size", "num_layers", "num_heads", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size must be a multiple of patch_size ({self.patch_size}), got "
                f"{self.img_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size must be divisible by num_heads ({self.num_heads}), got "
                f"{self.hidden_size}"
            )
        if isinstance(self.dilation, Sequence) and not isinstance(self.dilation, str):
            self.dilation = tuple(self.dilation)
            if len(self.dilation) != self.num_heads:
                raise ValueError(
                    f"dilation must be an int or one int per head ({self.num_heads}), got "
                    f"{len(self.dilation)} values"
                )
        values = self.dilation if isinstance(self.dilation, tuple) else (self.dilation,)
        if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in values):
            raise ValueError(f"every dilation must be a positive int, got {self.dilation!r}")
        if isinstance(self.num_global, bool) or not isinstance(self.num_global, int):
            raise ValueError(f"num_global must be an int >= 0, got {self.num_global!r}")
        if self.num_global < 0:
            raise ValueError(f"num_global must be an int >= 0, got {self.num_global}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.num_classes < 0 or self.in_chans < 1:
            raise ValueError(
                f"num_classes must be >= 0 and in_chans >= 1, got {self.num_classes} and "
                f"{self.in_chans}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def num_tokens(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def encoder_config(self) -> LongformerConfig:
        """The Longformer layers' config: the per-head dilation is repeated for every layer."""
        return LongformerConfig(
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=round(self.hidden_size * self.mlp_ratio),
            window=self.window,
            dilation=[self.dilation] * self.num_layers,
            layer_norm_eps=self.layer_norm_eps,
            backend=self.backend,
        )


class PixelLongformer(nn.Module):
    def __init__(self, config: PixelLongformerConfig) -> None:
        super().__init__()
        self.config = c = config
        self.default_resolution = c.img_size
        p = c.patch_size
        self.embed = nn.Conv2d(c.in_chans, c.hidden_size, p, p)  # one token per p x p patch
        self.pos_embed = nn.Parameter(torch.randn(1, c.num_tokens, c.hidden_size) * 0.02)
        self.global_tokens = nn.Parameter(torch.randn(1, c.num_global, c.hidden_size) * 0.02)
        self.embed_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        enc = c.encoder_config()
        self.layers = nn.ModuleList(LongformerLayer(enc, i) for i in range(c.num_layers))
        self.num_features = c.hidden_size
        self.classifier = (
            nn.Linear(c.hidden_size, c.num_classes) if c.num_classes else nn.Identity()
        )

    def example_inputs(self, batch: int = 1, resolution: int | None = None) -> tuple[torch.Tensor]:
        return random_images(batch, self.config.in_chans, resolution or self.config.img_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        check_image(x, c.in_chans)
        if x.shape[-2:] != (c.img_size, c.img_size):
            raise ValueError(
                f"expected {c.img_size}x{c.img_size} images (the position embeddings' size; "
                f"rebuild with img_size={x.shape[-1]}), got {x.shape[-2]}x{x.shape[-1]}"
            )
        b = x.shape[0]
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, N, C)
        h = torch.cat((self.global_tokens.expand(b, -1, -1), h), dim=1)  # (B, G + N, C)
        h = self.embed_norm(h)
        global_mask = None
        if c.num_global:
            global_mask = torch.zeros(b, h.shape[1], dtype=torch.bool, device=h.device)
            global_mask[:, : c.num_global] = True
        for layer in self.layers:
            h = layer(h, global_mask, None)
        # The first global token summarizes the image (Longformer's <s>); else the mean.
        return h[:, 0] if c.num_global else h.mean(1)  # (B, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


@register_model(default_input=(3, 32, 32))
def pixel_longformer(**overrides) -> PixelLongformer:
    """Longformer layers over an image's pixels (LRA Image); window, per-head dilation, globals."""
    return PixelLongformer(with_overrides(PixelLongformerConfig(), overrides))


__all__ = ["PixelLongformer", "PixelLongformerConfig"]
