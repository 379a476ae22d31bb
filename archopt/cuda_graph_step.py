"""The one-token decode step on a GPU, captured once as a CUDA graph and replayed per token.

A decode step of a small model on a GPU is a few hundred short kernels, and launching them from
Python costs more than running them. On a static cache every step has the same shapes and the
same tensors (the write cursor and the mask are tensors, see ``StaticCache``), so the step is
recorded once with ``torch.cuda.CUDAGraph`` and each later token replays the recording: the
same kernels on the same buffers, so the same logits as the eager step, bit for bit.

The graph is tied to one cache's tensors: ``generate`` makes a new ``CUDAGraphStep`` for each
call. What the caller checks before a step (token ids in range, the cache's capacity) is
checked once, eagerly, before the capture; inside it those host-side checks are skipped
(``archopt.ops.capture.in_graph``).
"""

from __future__ import annotations

import torch

from archopt.ops.kv_cache import StaticCache


class CUDAGraphStep:
    """``step(tokens, positions, kv)`` -> next-token logits (B, vocab), like a compiled step.

    The first call checks the inputs by running the step eagerly (on a side stream, as CUDA
    graphs ask, then rewinds the cache's cursor: that run writes the slot the graph will write
    again), records the graph, and replays it; later calls copy their inputs into the graph's
    buffers and replay."""

    def __init__(self, model) -> None:
        self.model = model
        self.graph: torch.cuda.CUDAGraph | None = None
        self.kv: StaticCache | None = None

    def _run(self, kv):
        return self.model(self.tokens, positions=self.positions, cache=kv, last_only=True)[:, -1]

    def _capture(self, tokens, positions, kv) -> None:
        if not isinstance(kv, StaticCache) or kv.device.type != "cuda":
            raise ValueError(f"a CUDA graph step needs a static cache on a GPU, got {kv!r}")
        self.tokens, self.positions, self.kv = tokens.clone(), positions.clone(), kv
        cursor = kv.cursor.clone()
        side = torch.cuda.Stream(device=kv.device)
        side.wait_stream(torch.cuda.current_stream(kv.device))
        with torch.cuda.stream(side):
            self._run(kv)  # checks the inputs, and lets cuBLAS set up outside the capture
        torch.cuda.current_stream(kv.device).wait_stream(side)
        kv.cursor.copy_(cursor)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._run(kv)
        self.graph = graph

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv) -> torch.Tensor:
        if self.graph is None:
            self._capture(tokens, positions, kv)
        elif kv is not self.kv or tokens.shape != self.tokens.shape:
            raise ValueError("a CUDA graph step replays on the cache and batch it was captured for")
        else:
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
        self.graph.replay()
        return self.logits.clone()  # the graph's output buffer is rewritten by the next replay
