"""Requests and the continuous-batching policy: who runs in the next step, with how many tokens.

The policy (vLLM's, simplified): every step decodes one token for each running request that
has finished its prompt, and spends a token budget (``prefill_chunk``) on the prompts still
being read, first come first served, a chunk at a time, so a long prompt never stalls the
running decodes for more than one chunk. Waiting requests join the running batch at any step,
while it has fewer than ``max_batch`` requests and the pool has the blocks for their prompt.
When a decode finds no free block, the request of lowest priority (then the latest to arrive)
is preempted: its blocks are freed and it goes back to the front of the queue with its output
so far appended to its prompt, to be recomputed (its full blocks usually still sit in the
prefix cache, so recomputing them is a lookup).
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from archopt.sampling import check_seed
from archopt.serve.logits import MAX_LOGPROBS


@dataclass
class SamplingParams:
    """Per-request decoding settings (the OpenAI API's, plus top_k and ignore_eos).

    ``logit_bias`` (token id -> -100..100), ``presence_penalty`` and ``frequency_penalty``
    (-2..2) change the logits before the token is chosen; ``logprobs`` (None, or 0 to
    ``MAX_LOGPROBS``) records each token's log-probability and that many alternatives in the
    request's ``logprobs``, ``prompt_logprobs`` each prompt token's after the first in its
    ``prompt_logprobs`` (``archopt.serve.logits``). ``max_tokens`` 0 scores a prompt: it
    needs ``prompt_logprobs``."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        scoring = self.prompt_logprobs is not None and self.max_tokens == 0
        if not _integer(self.max_tokens) or (self.max_tokens < 1 and not scoring):
            raise ValueError(
                f"max_tokens must be an integer >= 1 (0 only to score a prompt, with "
                f"prompt_logprobs), got {self.max_tokens!r}"
            )
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or absent), got {self.top_k!r}")
        if not isinstance(self.stop, list | tuple) or any(
            not isinstance(s, str) or not s for s in self.stop
        ):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        ids = self.stop_token_ids
        if not isinstance(ids, list | tuple) or any(
            not isinstance(t, int) or isinstance(t, bool) for t in ids
        ):
            raise ValueError(f"stop_token_ids must be a list of integers, got {ids!r}")
        check_seed(self.seed)
        bias = self.logit_bias
        if not isinstance(bias, dict) or any(
            not _integer(t) or t < 0 or not _number(b) or not -100 <= b <= 100
            for t, b in bias.items()
        ):
            raise ValueError(
                f"logit_bias must map token ids (integers >= 0) to numbers in [-100, 100], "
                f"got {bias!r}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {value!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not _integer(k) or not 0 <= k <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}")

    @cached_property
    def bias_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``logit_bias`` as (token ids, values), made once for all the request's steps."""
        ids = torch.tensor(list(self.logit_bias), dtype=torch.long)
        return ids, torch.tensor([float(v) for v in self.logit_bias.values()])

    @property
    def changes_logits(self) -> bool:
        """Whether a bias or a penalty applies (``archopt.serve.logits.adjusted``)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)


def _integer(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation. ``tokens`` = prompt + output; the cache holds ``tokens[:computed]``."""

    prompt: list[int]
    params: SamplingParams
    on_output: Callable[[Request, str, bool], None] | None = None  # (request, text delta, done)
    priority: int = 0  # lower runs first; among equals, the earlier arrival
    request_id: str = ""
    seq_id: int = field(default_factory=lambda: next(_ids))
    arrival: float = field(default_factory=time.perf_counter)
    output: list[int] = field(default_factory=list)
    computed: int = 0
    cached: int = 0  # prompt tokens found in the prefix cache at the last admission
    status: str = WAITING
    finish_reason: str | None = None
    text: str = ""  # the output decoded so far (stop strings cut off)
    detokenizer: Any = None  # the engine's IncrementalText of output
    emitted: int = 0  # characters of text handed to on_output
    first_token_time: float | None = None
    finish_time: float | None = None
    preemptions: int = 0
    generator: torch.Generator | None = None
    logprobs: list = field(default_factory=list)  # per token, with params.logprobs (logits.py)
    prompt_logprobs: list = field(default_factory=list)  # prompt tokens 1.., if asked for
    after: Request | None = None  # admitted once this one has read its prompt (``Scheduler``)
    drafter: Any = None  # its speculative drafts' source (``archopt.serve.speculate``)

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("prompt must have at least one token, got an empty prompt")
        if not self.request_id:
            self.request_id = f"req-{self.seq_id}"
        if self.params.temperature > 0:
            seed = self.params.seed
            if seed is None:
                seed = secrets.randbits(62)
            self.generator = torch.Generator().manual_seed(seed)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def last_token(self) -> int:
        """The newest token (what a decode step feeds), without copying ``tokens``."""
        return self.output[-1] if self.output else self.prompt[-1]

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def pending(self) -> int:
        """Tokens not yet in the cache (1 when decoding: the last sampled token)."""
        return self.length - self.computed

    @property
    def key(self) -> tuple[int, float]:
        return (self.priority, self.arrival)


@dataclass
class StepPlan:
    decode: list[Request]
    prefill: list[tuple[Request, int]]  # (request, tokens to run this step)
    preempted: list[Request]
    failed: list[Request] = field(default_factory=list)  # can never fit in the pool


class Scheduler:
    """The waiting queue and the running batch over a ``PagedKVCache``."""

    def __init__(self, cache, *, max_batch: int = 8, max_queue: int = 256, prefill_chunk=256):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1 token, got {prefill_chunk}")
        self.cache = cache
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.preemptions = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache

    def add(self, req: Request) -> None:
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _blocks_for(self, req: Request, cached: int) -> int:
        bs = self.cache.block_size
        return -(-(req.length + 1) // bs) - cached // bs

    @staticmethod
    def _held(req: Request) -> bool:
        """Whether ``req`` waits for the request it comes ``after`` to read its prompt (the
        other choices of one request: they then find its full blocks in the prefix cache)."""
        first = req.after
        return first is not None and first.status != FINISHED and first.computed < len(first.prompt)

    def _admit(self) -> None:
        self.waiting.sort(key=lambda r: r.key)
        i = 0
        while i < len(self.waiting) and len(self.running) < self.max_batch:
            req = self.waiting[i]
            if self._held(req):
                i += 1
                continue
            # A prompt whose log-probabilities are owed is read whole: cached tokens give none.
            owes = (
                req.params.prompt_logprobs is not None
                and len(req.prompt_logprobs) < len(req.prompt) - 1
            )
            cached = self.cache.add_sequence(req.seq_id, None if owes else req.tokens)
            if self._blocks_for(req, cached) > self.cache.allocator.num_free and self.running:
                self.cache.free(req.seq_id)  # wait for blocks (unless nothing else runs)
                break
            self.waiting.pop(i)
            req.status, req.computed, req.cached = RUNNING, cached, cached
            self.cached_tokens += cached
            self.running.append(req)

    def preempt(self, req: Request) -> None:
        """Free ``req``'s blocks and queue it again to be recomputed, output included."""
        self.cache.free(req.seq_id)
        self.running.remove(req)
        req.status, req.computed = WAITING, 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.insert(0, req)

    def retire(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
            self.cache.free(req.seq_id)
        elif req in self.waiting:
            self.waiting.remove(req)
        req.status = FINISHED

    def schedule(self) -> StepPlan:
        self._admit()
        preempted: list[Request] = []
        decode: list[Request] = []
        for req in sorted((r for r in self.running if r.pending == 1), key=lambda r: r.key):
            if req.status != RUNNING:
                continue  # preempted below while making room
            while not self.cache.ensure(req.seq_id, 1):
                victim = max(self.running, key=lambda r: r.key)
                self.preempt(victim)
                preempted.append(victim)
                if victim in decode:
                    decode.remove(victim)
                if victim is req:
                    break
            if req.status == RUNNING:
                decode.append(req)
        prefill: list[tuple[Request, int]] = []
        failed: list[Request] = []
        budget = self.prefill_chunk
        for req in sorted((r for r in self.running if r.pending > 1), key=lambda r: r.key):
            # A request's chunks are the same alone or batched (whole chunks from its start),
            # so its prompt runs through the same sums either way; the first always runs.
            n = min(req.pending, self.prefill_chunk)
            if prefill and n > budget:
                break
            if not self.cache.ensure(req.seq_id, n):
                if not decode and not prefill and len(self.running) == 1:
                    failed.append(req)  # alone and still too big: it never fits
                break  # blocks free up as requests finish
            prefill.append((req, n))
            budget -= n
        return StepPlan(decode, prefill, preempted, failed)


class QueueFull(RuntimeError):
    """The bounded queue has no room: the caller should retry later (HTTP 503)."""
