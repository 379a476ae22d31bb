"""The serving engine: a model, a paged KV cache and the scheduler, stepped in one thread.

A step runs the decoding requests (one token each: the weights are read once for B tokens,
where batching wins, decoding being memory-bound) and this step's prompt chunks: through the
compiled step in one call, a token a row (only the rows that sample go through the head), or
eager as two forwards. Every request samples with its own settings and random generator, so
its tokens do not depend on who else is in the batch. Outputs go to each request's
``on_output`` as text deltas; stop tokens, stop strings and ``max_tokens`` end a request, and
its blocks go back to the pool (full ones into the prefix cache).

Steps run through a compiled step when one is at hand (``compile``, default
``"auto"``): the paged step of ``archopt.decode_step``, one AOTInductor library for every
batch size, context and pool size, kept in the cache folder, so only the first process on a
machine builds it (in the background, at low priority, while this one runs eager; the engine
switches to it when the build finishes). A model loaded with ``weights="auto"`` before
archopt's CPU kernels were built is served in the format it got, and the same background
process then builds the kernels and the step of the format the next start's ``auto`` loads
(``gguf-act8`` for a GGUF on an AVX512-VNNI CPU); the engine keeps to one thread until that
process ends.

Threads: ``start()`` runs the step loop in a background thread; ``submit`` and ``abort`` may
be called from any thread (the HTTP server's event loop). ``generate`` runs requests to the
end in the calling thread, for tests and scripts.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from archopt.choices import SPECULATE, SPECULATE_BATCH
from archopt.ops.paged_kv import PagedKVCache
from archopt.sampling import greedy
from archopt.serve.compiled_step import StepSource, kv_cache_kind
from archopt.serve.detokenize import IncrementalText, cut_at_stop, sendable
from archopt.serve.logits import choose, owed, record_prompt_logprob, token_logprobs
from archopt.serve.scheduler import FINISHED, QueueFull, Request, SamplingParams, Scheduler
from archopt.serve.speculate import draft, verify
from archopt.step_graphs import MAX_BATCH

if TYPE_CHECKING:
    from archopt.decode_step import CompiledPagedStep

__all__ = ["Engine", "QueueFull", "Request", "SamplingParams"]


class Engine:
    """Continuous batching over a ``PagedKVCache`` for an archopt ``Llama``.

    ``max_blocks``: the pool's limit in blocks (default: ``max_batch`` sequences of the
    model's full context); the pool starts at ``num_blocks`` (default: 256 tokens per batch
    slot) and grows by doubling when no block is free or cached, so the memory held follows
    the tokens in use (``metrics()``: ``kv_pool_bytes``).

    ``compile``: how steps run (``archopt.choices.SERVE_COMPILE_MODES``, or a
    ``CompiledPagedStep`` made by ``archopt.decode_step.compile_step(model, kind="paged")``);
    ``compile_how`` says what was chosen. ``attention``: the eager plan (prompt chunks, and
    decoding when not compiled).
    ``speculate``: drafts a plain greedy request verifies in a compiled step, found by n-gram
    lookup in its own tokens (``archopt.serve.speculate``: the same tokens, fewer steps),
    while at most ``speculate_batch`` requests decode; 0 turns it off. ``kv_cache_dtype``
    (``KV_CACHE_DTYPES``): "auto" keeps keys and values in the model's dtype; "float16" or
    "bfloat16" halve the pool and what attention reads (the values rounded as written; the
    compiled step of that kind is built once, as the default one is).
    """

    def __init__(
        self,
        model,
        *,
        tokenizer=None,
        max_batch: int = 8,
        block_size: int = 16,
        num_blocks: int | None = None,
        max_blocks: int | None = None,
        prefill_chunk: int = 256,
        max_queue: int = 256,
        prefix_cache: bool = True,
        attention: str = "auto",
        compile: str | CompiledPagedStep = "auto",
        speculate: int = SPECULATE,
        speculate_batch: int = SPECULATE_BATCH,
        kv_cache_dtype: str = "auto",
        progress: bool = False,
    ) -> None:
        for name, value in (("speculate", speculate), ("speculate_batch", speculate_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        self.speculate, self.speculate_batch = speculate, speculate_batch
        kv_dtype, kind = kv_cache_kind(model, kv_cache_dtype)
        self.drafted = self.accepted = 0  # speculative drafts run and confirmed
        cfg = model.config
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.capacity = cfg.max_position_embeddings
        per_seq = -(-self.capacity // block_size)
        if max_blocks is None:
            max_blocks = max_batch * per_seq
        if num_blocks is None:
            num_blocks = min(max_batch * -(-256 // block_size), max_blocks)
        self.cache = PagedKVCache(
            num_layers=cfg.num_layers,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            capacity=self.capacity,
            block_size=block_size,
            num_blocks=num_blocks,
            max_blocks=max_blocks,
            dtype=kv_dtype,
            device=model.embed.weight.device,
            prefix_cache=prefix_cache,
            attention=attention,
        )
        self.scheduler = Scheduler(
            self.cache, max_batch=max_batch, max_queue=max_queue, prefill_chunk=prefill_chunk
        )
        self.eos_ids = set(cfg.eos_ids)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos is not None:
            self.eos_ids.add(int(eos))
        self.pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        self._cond = threading.Condition()
        self._inbox: collections.deque[Request] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._by_id: dict[str, Request] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self.steps = self.generated_tokens = self.prompt_tokens = self.finished = 0
        self.error: str | None = None
        self.threads = torch.get_num_threads()  # what steps run with (but see step())
        self._steps = StepSource(model, compile, progress, kind)
        self.compiled = self._steps.step  # the compiled paged step, when there is one
        self.compile_how = self._steps.how  # what was chosen, in words

    # -- submitting ------------------------------------------------------------------------
    def check_prompt(self, prompt: Sequence[int]) -> None:
        """ValueError unless ``prompt`` fits: non-empty, under the context, ids in the vocab."""
        if not prompt:
            raise ValueError("prompt must have at least one token, got an empty prompt")
        if len(prompt) >= self.capacity:
            raise ValueError(
                f"the prompt has {len(prompt)} tokens, and this model's context holds "
                f"{self.capacity} (prompt and completion together): shorten the prompt"
            )
        vocab = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token ids must be in [0, {vocab}), got {bad[0]}")

    def check_params(self, params: SamplingParams) -> None:
        """ValueError unless ``params``' logit bias names tokens of the vocabulary."""
        vocab = self.model.config.vocab_size
        bad = [t for t in params.logit_bias if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"logit_bias: token ids must be in [0, {vocab}), got {bad[0]}")

    def submit(self, req: Request) -> Request:
        """Queue ``req`` (thread-safe); QueueFull when the bounded queue has no room."""
        return self.submit_all([req])[0]

    def submit_all(self, reqs: Sequence[Request]) -> list[Request]:
        """Queue every one of ``reqs`` or none (thread-safe): the choices of one request."""
        for req in reqs:
            self.check_prompt(req.prompt)
            self.check_params(req.params)
        ids = [r.request_id for r in reqs]
        if len(reqs) > self.scheduler.max_queue:  # never fits: the caller's error, not a wait
            raise ValueError(
                f"{len(reqs)} requests at once are more than this server's queue holds "
                f"({self.scheduler.max_queue})"
            )
        with self._cond:
            queued = len(self._inbox) + len(self.scheduler.waiting)
            if queued + len(reqs) > self.scheduler.max_queue:
                raise QueueFull(
                    f"the server's queue is full ({self.scheduler.max_queue} requests "
                    "waiting): retry later"
                )
            taken = [i for i in ids if i in self._by_id] + [i for i in ids if ids.count(i) > 1]
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already in use")
            for req in reqs:
                self._by_id[req.request_id] = req
                self._inbox.append(req)
            self._cond.notify()
        return list(reqs)

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks at the next step boundary (thread-safe)."""
        with self._cond:
            self._aborts.append(request_id)
            self._cond.notify()

    # -- one step --------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> int:
        """Admit, run one decode batch and one prefill batch, sample, retire. Returns the
        number of tokens sampled."""
        with self._cond:
            inbox, aborts = list(self._inbox), list(self._aborts)
            self._inbox.clear()
            self._aborts.clear()
        for req in inbox:
            self.scheduler.add(req)
        for rid in aborts:
            req = self._by_id.get(rid)
            if req is not None and req.status != FINISHED:
                self._finish(req, "abort")
        plan = self.scheduler.schedule()
        for req in plan.failed:
            self._finish(req, "error")
        sampled = 0
        if self._steps.busy and self._steps.poll():  # a background build's step landed
            self.compiled, self.compile_how = self._steps.step, self._steps.how
        # While a build runs beside us, one thread: with every core busy, OpenMP threads wait
        # on each other at every barrier (measured: 32 tokens took 31 s at 2 threads, not 0.3).
        threads = 1 if self._steps.busy else self.threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if plan.decode or plan.prefill:
            run = self._compiled_rows if self.compiled is not None else self._eager_rows
            reqs, logits, chosen = run(plan.decode, plan.prefill)
            if reqs:
                sampled += self._sample_and_emit(reqs, logits, chosen)
            for req, _ in plan.prefill:  # a prompt scored, nothing to generate: done
                if not req.params.max_tokens and req.pending == 0 and req.status != FINISHED:
                    self._finish(req, "length")
        self.prompt_tokens += sum(n for _, n in plan.prefill)
        self.steps += 1
        self.generated_tokens += sampled
        now = time.perf_counter()
        self._recent.append((now, sampled))
        while self._recent and now - self._recent[0][0] > 10:
            self._recent.popleft()
        return sampled

    def _compiled_rows(
        self, decode: list[Request], prefill: list[tuple[Request, int]]
    ) -> tuple[list[Request], torch.Tensor, list[int] | None]:
        """The step through the compiled library, a token a row: each decoding request's
        last token, then each prompt chunk as consecutive rows of its sequence (causal within
        it), in calls of at most ``MAX_BATCH`` rows. Returns the requests that sample now (the
        decoding ones, then those whose prompt this step ends), their logits (R, vocab) and,
        after drafts, their greedy tokens (else None). Every row's sums are its own, so a
        request's tokens do not depend on who shares its step, nor on where a call's rows are
        cut. The prompt rows whose log-probabilities a
        request asked for (``owed``) give logits too, recorded here."""
        seqs, tokens, positions, wanted, scored = [], [], [], [], []
        drafts = self._drafts(decode)
        for req in decode:
            run = [req.last_token, *drafts.get(req, ())]  # a draft's row verifies it
            wanted += [(len(tokens) + j, req) for j in range(len(run))]
            seqs += [req.seq_id] * len(run)
            tokens += run
            positions += range(req.computed, req.computed + len(run))
        chunks = []
        for req, n in prefill:
            chunk = req.tokens[req.computed : req.computed + n]
            chunks.append((req, chunk))
            scored += [(len(tokens) + p - req.computed, req, p) for p in owed(req, req.computed, n)]
            seqs += [req.seq_id] * n
            tokens += chunk
            positions += range(req.computed, req.computed + n)
            if req.pending == n and req.params.max_tokens:  # the prompt's last token: its
                wanted.append((len(tokens) - 1, req))  # logits give the first output
        rows_out = [i for i, _ in wanted]  # ascending, as the rows were laid out
        if scored:
            rows_out = sorted({*rows_out, *(i for i, _, _ in scored)})
        device = self.model.embed.weight.device
        pieces = []
        for lo in range(0, len(tokens), MAX_BATCH):
            hi = min(lo + MAX_BATCH, len(tokens))
            rows = [i - lo for i in rows_out if lo <= i < hi]
            self.cache.bind(seqs[lo:hi])
            logits = self.compiled(
                torch.tensor(tokens[lo:hi], device=device).view(-1, 1),
                torch.tensor(positions[lo:hi], device=device).view(-1, 1),
                self.cache,
                rows or [0],
            )
            if rows:
                pieces.append(logits)
        for req in decode:
            if req not in drafts:
                req.computed += 1
                self.cache.commit(req.seq_id, [req.last_token])
        for req, chunk in chunks:
            req.computed += len(chunk)
            self.cache.commit(req.seq_id, chunk)
        if not rows_out:
            return [], torch.empty(0), None
        logits = (pieces[0] if len(pieces) == 1 else torch.cat(pieces)).float()  # one: no copy
        if scored:  # prompt log-probabilities asked for: those rows out, the sampling ones kept
            at = {row: k for k, row in enumerate(rows_out)}
            for row, req, p in scored:
                record_prompt_logprob(req, p, logits[at[row]])
            logits = logits[[at[row] for row, _ in wanted]]
        reqs = [req for _, req in wanted]
        if not drafts:
            return reqs, logits, None
        chosen = greedy(logits).tolist()  # every row's, the drafts' too: what verifies them
        keep = self._verify(drafts, reqs, chosen)
        return [reqs[i] for i in keep], logits[keep], [chosen[i] for i in keep]

    def _drafts(self, decode: list[Request]) -> dict[Request, list[int]]:
        if not self.speculate or len(decode) > self.speculate_batch:
            return {}
        return draft(decode, self.cache, self.speculate, self.capacity)

    def _verify(self, drafts, reqs: list[Request], chosen: list[int]) -> list[int]:
        keep, drafted, taken = verify(drafts, reqs, chosen, self.cache)
        self.drafted += drafted
        self.accepted += taken
        return keep

    def _eager_rows(
        self, decode: list[Request], prefill: list[tuple[Request, int]]
    ) -> tuple[list[Request], torch.Tensor, None]:
        """``_compiled_rows``' result from the eager model: a forward over the decoding
        requests, one over the prompt chunks."""
        reqs, logits = [], []
        if decode:
            reqs += decode
            logits.append(self._forward([(r, [r.last_token]) for r in decode]))
        if prefill:
            starts = [r.computed for r, _ in prefill]
            full = any(owed(r, r.computed, n) for r, n in prefill)  # every column's logits
            rows = [(r, r.tokens[r.computed : r.computed + n]) for r, n in prefill]
            chunks = self._forward(rows, full=full)
            if full:  # left-padded: position p of a chunk of n from start is column p - start - n
                for b, ((r, n), start) in enumerate(zip(prefill, starts)):
                    for p in owed(r, start, n):
                        record_prompt_logprob(r, p, chunks[b, p - start - n])
                chunks = chunks[:, -1]
            done = [i for i, (r, _) in enumerate(prefill) if r.pending == 0 and r.params.max_tokens]
            reqs += [prefill[i][0] for i in done]
            logits.append(chunks[done])
        return reqs, torch.cat(logits), None

    def _forward(self, rows: list[tuple[Request, list[int]]], full: bool = False) -> torch.Tensor:
        """Logits (rows, vocab) at each row's last token (``full``: (rows, width, vocab), every
        column); rows left-padded to one width."""
        width = max(len(t) for _, t in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        pos = torch.full((len(rows), width), -1, dtype=torch.long)
        for i, (req, toks) in enumerate(rows):
            n = len(toks)
            ids[i, width - n :] = torch.tensor(toks)
            pos[i, width - n :] = torch.arange(req.computed, req.computed + n)
        device = self.model.embed.weight.device
        self.cache.bind([r.seq_id for r, _ in rows])
        logits = self.model(
            ids.to(device), positions=pos.to(device), cache=self.cache, last_only=not full
        )
        for req, toks in rows:
            req.computed += len(toks)
            self.cache.commit(req.seq_id, toks)
        return logits.float() if full else logits[:, -1].float()

    def _sample_and_emit(
        self, reqs: list[Request], logits: torch.Tensor, chosen: list[int] | None = None
    ) -> int:
        # The plain greedy rows' tokens (a drafting step has them); the others choose below.
        tokens = list(chosen) if chosen is not None else greedy(logits).tolist()
        emitted = 0
        for i, req in enumerate(reqs):
            if req.status == FINISHED:  # a speculating request's stop came at an earlier row
                continue
            emitted += 1
            p = req.params
            if p.changes_logits or p.temperature > 0:
                tokens[i] = choose(logits[i : i + 1], p, req.output, req.generator)
            if p.logprobs is not None:
                req.logprobs.append(token_logprobs(logits[i], tokens[i], p.logprobs))
            self._append(req, tokens[i])
        return emitted

    def _append(self, req: Request, token: int) -> None:
        now = time.perf_counter()
        if req.first_token_time is None:
            req.first_token_time = now
        req.output.append(token)
        p = req.params
        finish = None
        last = len(req.output) >= p.max_tokens or req.length >= self.capacity
        if token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_ids):
            finish = "stop"
        elif self.tokenizer is not None:  # O(new tokens) per token, not the whole output
            req.detokenizer = req.detokenizer or IncrementalText(self.tokenizer)
            text = (req.detokenizer.flush if last else req.detokenizer.add)(req.output)
            req.text, hit = cut_at_stop(text, p.stop, req.emitted)
            finish = "stop" if hit else None
        if finish is None and last:
            finish = "length"
        if finish is not None:
            self._finish(req, finish)
        else:
            self._emit(req, done=False)

    def _emit(self, req: Request, *, done: bool) -> None:
        delta = sendable(req.text, req.params.stop, req.emitted, done)
        req.emitted += len(delta)
        if req.on_output is not None and (delta or done):
            req.on_output(req, delta, done)

    def _finish(self, req: Request, reason: str) -> None:
        self.scheduler.retire(req)
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        self.finished += 1
        self._by_id.pop(req.request_id, None)
        self._emit(req, done=True)

    # -- running ---------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[Request]:
        """Run ``prompts`` to the end in this thread (all submitted at once); the finished
        requests, in order (``output``: token ids, ``text``, ``finish_reason``)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        reqs = [self.submit(Request(list(p), sp)) for p, sp in zip(prompts, params)]
        while any(r.status != FINISHED for r in reqs):
            self.step()
        return reqs

    def start(self) -> None:
        """Run the step loop in a background thread until ``stop()``."""
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="archopt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._stopping or self._inbox or self._aborts or self.scheduler.has_work()
                ):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a failed step fails its requests, not the server
                self.error = f"{type(e).__name__}: {e}"
                for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self._finish(req, "error")

    def metrics(self) -> dict[str, float]:
        now = time.perf_counter()
        window = [(t, n) for t, n in self._recent if now - t <= 10]
        span = now - window[0][0] if len(window) > 1 else 0.0
        rate = sum(n for _, n in window[1:]) / span if span > 0 else 0.0
        return {
            "queue_length": len(self.scheduler.waiting) + len(self._inbox),
            "running_sequences": len(self.scheduler.running),
            **self.cache.stats(),
            "kv_pool_bytes": self.cache.nbytes,
            "tokens_per_second": rate,
            "generated_tokens_total": self.generated_tokens,
            "prompt_tokens_total": self.prompt_tokens,
            "prefix_cached_tokens_total": self.scheduler.cached_tokens,
            "preemptions_total": self.scheduler.preemptions,
            "requests_finished_total": self.finished,
            "steps_total": self.steps,
            "compiled_decode": int(self.compiled is not None),
            "spec_draft_tokens_total": self.drafted,
            "spec_accepted_tokens_total": self.accepted,
        }
