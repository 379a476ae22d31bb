"""The graphs a compiled decode step runs: one token per row in, next-token logits out.

The kinds, each a module to export, an example input with its dynamic dimensions, and a wrapper
that calls the loaded library with a cache object (``archopt.decode_step`` builds, keeps and
loads them):

- ``static``: the static cache's tensors as inputs, written in place (``generate``'s default
  path). The batch and the number of cache slots are dynamic.
- ``paged``: a paged cache's pools (per layer, written in place), each row's write slot and
  read slots (``archopt.ops.paged_attention.DecodeView``), and the rows whose logits are
  wanted; the serving engine's step. The batch, the read span, the pool's size and the
  number of logit rows are dynamic, so one library serves every batch, context and pool
  growth. A row attends to the slots whose position is at most its own, all rows' tokens
  written first, so consecutive rows of one sequence are a prompt chunk, causal: the engine
  runs prompts through it too, a row a token, only their last rows through the head, and
  a request's speculative drafts likewise. ``paged-float16`` and ``paged-bfloat16``: the same
  over pools kept in that dtype (the engine's ``kv_cache_dtype``).

Both attend with archopt's C++ decode-attention kernels where they build
(``archopt.ops.cpu_kernels``: each row reads only the slots it sees, in place), else with the
torch expressions those kernels are tested against.

The libraries index their inputs with the strides they were compiled for (contiguous) and do
not check them, so the wrappers pass contiguous tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from archopt.ops.kv_cache import StaticCache, StaticDecodeView
from archopt.ops.paged_attention import DecodeView

# Examples are exported with sizes above 1, so that export keeps them dynamic (a size of 1
# would be specialised).
EXAMPLE_BATCH, EXAMPLE_SLOTS = 2, 64
MAX_BATCH = 256


class StaticGraph(nn.Module):
    """logits (B, vocab) of the next token, the static cache's tensors as (mutated) inputs;
    ``kernel``: the attention by archopt's C++ kernel (``StaticDecodeView``)."""

    def __init__(self, model: nn.Module, kernel: bool = False) -> None:
        super().__init__()
        self.model, self.kernel = model, kernel

    def forward(self, tokens, positions, cursor, cache_positions, keys, values):
        view = StaticDecodeView if self.kernel else StaticCache
        kv = view.over(cursor, cache_positions, keys, values)
        return self.model(tokens, positions=positions, cache=kv, last_only=True)[:, -1]

    @staticmethod
    def example(model: nn.Module) -> tuple[tuple, tuple]:
        cfg = model.config
        kv = model.make_cache("static", batch=EXAMPLE_BATCH, reserve=EXAMPLE_SLOTS)
        tokens = torch.zeros(EXAMPLE_BATCH, 1, dtype=torch.long)
        inputs = (tokens, tokens.clone(), kv.cursor, kv.positions, tuple(kv.keys), tuple(kv.values))
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        slots = torch.export.Dim("slots", min=2, max=cfg.max_position_embeddings)
        per_layer = tuple({0: batch, 2: slots} for _ in range(cfg.num_layers))
        return inputs, ({0: batch}, {0: batch}, None, {0: batch, 1: slots}, per_layer, per_layer)


class CompiledStep:
    """``step(tokens, positions, kv)``: next-token logits (B, vocab), advancing the static
    cache ``kv`` in place, through the loaded library."""

    def __init__(self, runner: Any, folder, kind: str = "static") -> None:
        self.runner, self.folder, self.kind = runner, folder, kind

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, kv: StaticCache
    ) -> torch.Tensor:
        # A (B, 1) slice of a wider tensor would be read wrongly: contiguous copies.
        inputs = [tokens.contiguous(), positions.contiguous(), kv.cursor, kv.positions]
        return self.runner.run([*inputs, *kv.keys, *kv.values])[0]


class PagedGraph(nn.Module):
    """logits (R, vocab) of the next token after each of the rows ``logit_rows`` (R,), a
    paged cache's pools as (mutated) inputs; ``kernel``: the attention by archopt's C++
    kernel (``DecodeView``)."""

    def __init__(self, model: nn.Module, kernel: bool = False) -> None:
        super().__init__()
        self.model, self.kernel = model, kernel

    def forward(
        self, tokens, positions, write_slots, read_slots, slot_pos, logit_rows, keys, values
    ):
        view = DecodeView(write_slots, read_slots, slot_pos, keys, values, self.kernel)
        out = self.model(tokens, positions=positions, cache=view, last_only=True, rows=logit_rows)
        return out[:, -1]

    kv_dtype: torch.dtype | None = None  # the pools' dtype; None: the model's

    @classmethod
    def example(cls, model: nn.Module) -> tuple[tuple, tuple]:
        cfg = model.config
        # Three rows, two logit rows: sizes that differ, so export keeps them apart.
        b, span, pool = EXAMPLE_BATCH + 1, EXAMPLE_SLOTS, 4 * EXAMPLE_SLOTS + 1
        dtype, device = cls.kv_dtype or model.embed.weight.dtype, model.embed.weight.device
        shape = (cfg.num_kv_heads, pool, cfg.head_dim)
        keys = tuple(torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers))
        values = tuple(
            torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)
        )
        tokens = torch.zeros(b, 1, dtype=torch.long)
        read = torch.arange(b * span).view(b, span)
        slot_pos = torch.full((pool,), -1, dtype=torch.long)
        logit_rows = torch.arange(EXAMPLE_BATCH)
        inputs = (tokens, tokens.clone(), read[:, 0].clone(), read, slot_pos, logit_rows)
        batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        reads = torch.export.Dim("reads", min=2, max=cfg.max_position_embeddings + 1024)
        slots = torch.export.Dim("pool", min=2, max=2**40)
        outs = torch.export.Dim("logit_rows", min=1, max=MAX_BATCH)
        per_layer = tuple({1: slots} for _ in range(cfg.num_layers))
        dims = ({0: batch}, {0: batch}, {0: batch}, {0: batch, 1: reads}, {0: slots}, {0: outs})
        return (*inputs, keys, values), (*dims, per_layer, per_layer)


class CompiledPagedStep:
    """``step(tokens, positions, cache, logit_rows=None)``: next-token logits (R, vocab) after
    the rows ``logit_rows`` (R row numbers; default: every row) of the B <= ``MAX_BATCH`` rows
    ``cache`` (a ``PagedKVCache``) is bound to, one token each (consecutive rows of one
    sequence: a prompt chunk), written into the pool in place."""

    def __init__(self, runner: Any, folder, kind: str = "paged") -> None:
        self.runner, self.folder, self.kind = runner, folder, kind

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache, logit_rows=None
    ) -> torch.Tensor:
        b = tokens.shape[0]
        rows = list(range(b)) if logit_rows is None else [int(r) for r in logit_rows]
        # The library indexes with these unchecked: a bad one is an error here, not a bad read.
        if not 1 <= b <= MAX_BATCH or not 1 <= len(rows) <= MAX_BATCH:
            raise ValueError(
                f"a compiled step takes 1 to {MAX_BATCH} rows and logit rows, got {b} rows and "
                f"{len(rows)} logit rows"
            )
        if min(rows) < 0 or max(rows) >= b:
            bad = next(r for r in rows if not 0 <= r < b)
            raise ValueError(f"logit rows must be row numbers in [0, {b}), got {bad}")
        write, read = cache.decode_inputs(positions)
        if read.shape[1] < 2:  # the library's read span is at least 2: pad with the trash slot
            read = torch.cat([read, torch.full_like(read, cache.trash_slot)], dim=1)
        keys, values = cache.layer_pools()
        inputs = [tokens.contiguous(), positions.contiguous(), write, read.contiguous()]
        inputs += [cache.slot_pos, torch.tensor(rows, device=tokens.device)]
        return self.runner.run([*inputs, *keys, *values])[0]


class PagedGraphFloat16(PagedGraph):
    """``PagedGraph`` over pools kept in float16 (``Engine(kv_cache_dtype="float16")``)."""

    kv_dtype = torch.float16


class PagedGraphBFloat16(PagedGraph):
    """``PagedGraph`` over pools kept in bfloat16."""

    kv_dtype = torch.bfloat16


@dataclass(frozen=True)
class StepKind:
    """What ``archopt.decode_step`` needs of a kind: its format (part of the key), the module
    it exports (with ``example(model)``), the wrapper of the loaded library, and whether its
    graph calls archopt's C++ kernels where they build (``archopt.ops.cpu_kernels``)."""

    format: str
    graph: type[nn.Module]
    wrapper: type
    kernels: bool = False


KINDS = {
    "static": StepKind("archopt.step/1", StaticGraph, CompiledStep, kernels=True),
    "paged": StepKind("archopt.paged-step/2", PagedGraph, CompiledPagedStep, kernels=True),
    # the paged step over a half-precision KV cache (pools of another dtype than the model's)
    "paged-float16": StepKind(
        "archopt.paged-step-float16/2", PagedGraphFloat16, CompiledPagedStep, kernels=True
    ),
    "paged-bfloat16": StepKind(
        "archopt.paged-step-bfloat16/2", PagedGraphBFloat16, CompiledPagedStep, kernels=True
    ),
}
