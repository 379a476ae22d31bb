"""Rotary position embeddings (Su et al., 2021, arXiv:2104.09864), rotate-half layout.

The rotate-half layout pairs dimension i with i + d/2, as Hugging Face's Llama does (Meta's
original code pairs adjacent dimensions; GGUF files store Q/K rows permuted for that layout,
and the GGUF loader undoes it). Frequencies follow ``rope_theta`` and, optionally, the
``linear`` or ``llama3`` scaling of the rope_scaling config.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from archopt.ops.capture import in_graph

ROPE_TYPES = ("default", "linear", "llama3", "freq_factors")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) in fp32, with ``scaling`` applied."""
    if head_dim % 2:
        raise ValueError(f"rotary embeddings need an even head_dim, got {head_dim}")
    # On the CPU even under a meta-device context (a loader's skeleton): meta arithmetic goes
    # through torch._refs, whose first use imports torch._dynamo (~3 s).
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    if kind == "freq_factors":  # llama.cpp's rope_freqs tensor: one divisor per frequency
        factors = torch.as_tensor(scaling["factors"], dtype=torch.float32, device="cpu")
        if factors.shape != inv_freq.shape:
            raise ValueError(
                f"rope freq_factors must have head_dim / 2 = {inv_freq.numel()} values, "
                f"got {factors.numel()}"
            )
        return inv_freq / factors
    raise ValueError(f"rope_scaling type must be one of {ROPE_TYPES}, got {kind!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band in
    # between interpolated smoothly (Meta's reference, as in Hugging Face's rope utils).
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin for integer positions, from a table that grows on demand (never recomputed).

    Table rows equal the on-the-fly product ``position * inv_freq`` exactly: each entry is a
    single fp32 multiply either way.
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        self._args = (head_dim, theta, scaling)
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self.register_buffer("cos_table", torch.empty(0, head_dim), persistent=False)
        self.register_buffer("sin_table", torch.empty(0, head_dim), persistent=False)

    def _apply(self, fn, recurse=True):
        # Frequencies and tables stay fp32 when the model is cast: in bf16 the angle at
        # position 1000 would be off by whole radians. Only the device follows the cast.
        super()._apply(fn, recurse)
        device = self.inv_freq.device
        self.inv_freq = rope_inv_freq(*self._args).to(device)
        self.cos_table = torch.empty(0, self._args[0], device=device)
        self.sin_table = torch.empty(0, self._args[0], device=device)
        return self

    def _grow(self, length: int) -> None:
        length = max(length, 2 * self.cos_table.shape[0], 256)
        positions = torch.arange(length, device=self.inv_freq.device).float()
        freqs = positions[:, None] * self.inv_freq[None, :]  # (length, head_dim / 2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (length, head_dim)
        # sin with rotate-half's sign folded in: rotate_half(x) * sin == roll(x) * signed_sin,
        # bit for bit (negating before or after a multiply rounds the same).
        sin = emb.sin()
        half = sin.shape[-1] // 2
        self.cos_table = emb.cos()
        self.sin_table = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)

    def reserve(self, length: int) -> None:
        """Make the table cover positions 0..length-1."""
        if length > self.cos_table.shape[0]:
            self._grow(length)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """cos and signed sin, (B, T, 1, head_dim), for ``positions`` (B, T); -1 (padding) -> 0.

        The sin's first half is negated, as ``apply_rope`` expects.
        """
        positions = positions.clamp(min=0)
        if not in_graph():  # compiled and captured steps: call reserve() beforehand
            self.reserve(int(positions.max()) + 1 if positions.numel() else 0)
        cos = self.cos_table[positions].to(dtype).unsqueeze(2)
        sin = self.sin_table[positions].to(dtype).unsqueeze(2)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1): the reference form, as in Hugging Face's Llama."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, T, H, head_dim): ``x * cos + rotate_half(x) * sin``, with the sign of
    rotate_half folded into ``signed_sin`` so the swap is one roll (two fewer ops per call)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin
