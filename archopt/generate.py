"""Autoregressive decoding: the decode plan (eager or a compiled step), prefill, one-token
steps, streams of tokens and of text. Sampling lives in ``archopt.sampling``, perplexity in
``archopt.perplexity``.

``cache="none"`` is the lecture's loop: every step re-runs the whole sequence, so step t costs
O(t) matmul work and O(t^2) attention, and the run is quadratic in length. With a KV cache
(``dense``, ``static``, see ``archopt.ops.kv_cache``) a step runs only the new token against
the cached keys and values. Both paths give the same tokens.

Batches of prompts of different lengths are left-padded; each row gets its own positions
(padding at -1, never attended), so a row decodes exactly as it would alone.
"""

from __future__ import annotations

import contextlib
import numbers
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from archopt.background_build import build_in_background, building, can_build_in_background
from archopt.choices import COMPILE_MODES
from archopt.cuda_graph_step import CUDAGraphStep
from archopt.decode_step import MAX_BATCH, CompiledStep, cached_step, compile_step, step_folder
from archopt.ops.kv_cache import KVCache
from archopt.sampling import check_sampling, check_seed, sample

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# A first compile (about 60-90 s on 2 cores) pays for itself within one process only after
# thousands of tokens (it saves ~15 ms of each ~25 ms eager step on SmolLM2-135M): "auto"
# compiles in the foreground from this many new tokens (times the batch) on.
AUTO_COMPILE_TOKENS = 4096


def compiled_step(model, backend="inductor"):
    """``torch.compile(model)`` for one-token steps on a static cache, built once per model.

    ``backend="inductor-cpp"``: inductor with its C++ wrapper, which calls the step's few
    hundred kernels from C++ instead of Python. On SmolLM2-135M with int4 weights (2 threads)
    that took a step from 14.8 to 11.2 ms, and the first compile from 27 to 69 s (inductor
    caches it on disk for later processes, but tracing runs again in each: prefer "aot").
    """
    key = (backend if isinstance(backend, str) else id(backend),)
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        if backend == "inductor-cpp":
            step = torch.compile(model, dynamic=False, options={"cpp_wrapper": True})
        else:
            step = torch.compile(model, backend=backend, dynamic=False)
        per_model[key] = step
    return per_model[key]


@dataclass
class DecodePlan:
    """How the one-token steps of a generation run: ``step(tokens, positions, kv)`` gives the
    next-token logits (B, vocab), or None for the eager model; ``cache`` is the cache spec the
    step needs; ``how`` says it in words (the command line prints it); ``after``, if set,
    runs once the generation is done (starting the background build of the compiled step then,
    so that it does not compete with this run's decoding for the cores)."""

    cache: str | KVCache | None
    step: Callable | None = None
    how: str = "eager"
    compile_seconds: float = 0.0
    static_shapes: bool = False  # torch.compile'd steps: a fixed cache size (no recompiles)
    after: Callable[[], object] | None = None
    # Threads to decode with, when fewer than torch's: one while a build runs beside this run
    # (with every core busy, OpenMP threads wait on each other at each barrier, 10-40x slower).
    threads: int | None = None

    def finish(self) -> None:
        after, self.after = self.after, None
        if after is not None:
            after()


def plan_decode(
    model,
    *,
    cache: str | KVCache | None = "auto",
    compile: bool | str | CompiledStep | DecodePlan = "auto",
    new_tokens: int = 0,
    progress: bool = False,
) -> DecodePlan:
    """Choose the decode path for ``model`` (see ``COMPILE_MODES``); ``new_tokens`` (times the
    batch) decides whether "auto" may compile now. Checks the combination before any work."""
    if isinstance(compile, DecodePlan):  # planned already (the command line times it)
        return compile
    if isinstance(compile, CompiledStep):
        return DecodePlan(_static_cache(cache, "a compiled step"), compile, "aot (given)")
    if compile is True:
        compile = "aot"
    elif compile is False:
        compile = "off"
    if not isinstance(compile, str) or not compile:
        raise ValueError(
            f"compile must be True, False, one of {COMPILE_MODES} or a torch.compile backend "
            f"name, got {compile!r}"
        )
    if cache == "auto" and compile == "off":
        return DecodePlan("dense")
    if compile == "off":
        return DecodePlan(cache)
    if compile != "auto":
        _static_cache(cache, f"compile={compile!r}")  # before any compiling
    where = model.embed.weight.device
    on_cpu = where.type == "cpu"
    if compile == "auto" and where.type == "cuda" and cache in ("auto", "static"):
        compile = "cuda-graph"
    if compile == "cuda-graph":
        if where.type != "cuda":
            raise ValueError(f"compile='cuda-graph' runs on a CUDA GPU, got a model on {where}")
        return DecodePlan("static", CUDAGraphStep(model), "cuda graph (recorded at the 1st step)")
    if compile == "auto":
        if cache not in ("auto", "static") or not on_cpu:
            return DecodePlan("dense" if cache == "auto" else cache)
        step = cached_step(model)
        if step is not None:
            return DecodePlan("static", step, "aot (compiled step from cache)")
        if new_tokens < AUTO_COMPILE_TOKENS:
            eager = "dense" if cache == "auto" else cache
            if building_elsewhere(model):
                how = "eager on one thread (the compiled step is still being built)"
                return DecodePlan(eager, how=how, threads=1)
            if can_build_in_background(model):
                how = "eager (the compiled step will be built in the background for later runs)"
                return DecodePlan(eager, how=how, after=lambda: build_in_background(model))
            return DecodePlan(eager)
        compile = "aot"
    if compile == "aot":
        if not on_cpu:
            raise ValueError(f"compile='aot' runs on the CPU, got a model on {where}")
        start = time.perf_counter()
        had = cached_step(model)
        step = had or compile_step(model, progress=progress)
        seconds = 0.0 if had else time.perf_counter() - start
        how = "aot (compiled step from cache)" if had else f"aot (compiled now in {seconds:.0f} s)"
        return DecodePlan("static", step, how, seconds)
    if compile not in COMPILE_MODES:
        import torch._dynamo

        if compile not in torch._dynamo.list_backends(exclude_tags=()):
            raise ValueError(
                f"compile must be True, False, one of {COMPILE_MODES} or a torch.compile "
                f"backend name ({', '.join(torch._dynamo.list_backends())}), got {compile!r}"
            )
    compiled = compiled_step(model, compile)

    def run(tokens, positions, kv):
        return compiled(tokens, positions=positions, cache=kv, last_only=True)[:, -1]

    return DecodePlan("static", run, f"torch.compile ({compile})", static_shapes=True)


def _static_cache(cache, what: str) -> str:
    if cache not in ("auto", "static"):
        raise ValueError(
            f"{what} needs cache='static' (or 'auto', which picks it): fixed shapes, written in "
            f"place; got {cache!r}"
        )
    return "static"


def building_elsewhere(model) -> bool:
    folder = step_folder(model)
    return folder is not None and building(folder)


def _is_int(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def _as_batch(input_ids, attention_mask, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) as (B, T) tensors; ragged lists are left-padded with ``pad_id``."""
    if isinstance(input_ids, torch.Tensor):
        dt = input_ids.dtype
        if dt.is_floating_point or dt.is_complex or dt == torch.bool:
            raise ValueError(f"input_ids must be integer token ids, got a {dt} tensor")
        ids = input_ids if input_ids.dim() == 2 else input_ids.reshape(1, -1)
        if input_ids.dim() not in (1, 2):
            raise ValueError(f"input_ids must be (length,) or (batch, length), got {ids.shape}")
        mask = (
            torch.ones_like(ids, dtype=torch.bool)
            if attention_mask is None
            else torch.as_tensor(attention_mask, device=ids.device).bool()
        )
        if mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, "
                f"got {tuple(mask.shape)}"
            )
    else:
        rows = [input_ids] if input_ids and isinstance(input_ids[0], int) else list(input_ids)
        if not rows:
            raise ValueError("input_ids is empty: expected at least one prompt")
        for r in rows:  # a float would be truncated to an id without a word: refuse it
            bad = next((t for t in r if not _is_int(t)), None)
            if bad is not None:
                raise ValueError(f"input_ids must be integer token ids, got {bad!r}")
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, r in enumerate(rows):
            if len(r):
                ids[i, width - len(r) :] = torch.as_tensor(r, dtype=torch.long)
                mask[i, width - len(r) :] = True
    if ids.shape[1] == 0 or not bool(mask.any(dim=1).all()):
        raise ValueError("every prompt must have at least one token, got an empty prompt")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("prompts must be left-padded: padding after a real token was found")
    return ids, mask


@torch.inference_mode()
def stream(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    cache: str | KVCache | None = "auto",
    attention_mask=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: int | Sequence[int] | str | None = "eos",
    compile: bool | str | CompiledStep | DecodePlan = "auto",
    progress: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) as it is produced.

    ``stop``: token ids that end a row, ``"eos"`` (the default) for the model's end-of-sequence
    tokens, as Hugging Face's ``generate`` does, or None / ``()`` to run the full length. Rows
    that have stopped yield the pad id from then on; the iterator ends when every row has
    stopped or after ``max_new_tokens`` steps.

    ``compile`` and ``cache`` (see ``plan_decode`` and ``COMPILE_MODES``): by default the
    one-token steps run the step compiled ahead of time when one is on disk, on a static cache
    (its shapes never change, so nothing recompiles); otherwise eagerly on a dense cache. Every
    path gives the tokens of the eager model (the compiled step matches it to fp32 rounding).
    ``progress``: say on stderr when a first compile runs.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = _as_batch(input_ids, attention_mask, pad_id)
    device = model.embed.weight.device
    ids, mask = ids.to(device), mask.to(device)
    b, t = ids.shape
    plan = plan_decode(
        model, cache=cache, compile=compile, new_tokens=b * max_new_tokens, progress=progress
    )
    if isinstance(plan.step, CompiledStep) and b > MAX_BATCH:
        plan = DecodePlan("dense")  # past the compiled step's batch range
    reserve = t + max_new_tokens
    if plan.static_shapes:  # a torch.compile'd step's cache size is a compiled shape: round it
        reserve = min(-(-reserve // 256) * 256, cfg.max_position_embeddings)
    kv = model.make_cache(plan.cache, batch=b, reserve=reserve) if plan.cache is not None else None
    capacity = cfg.max_position_embeddings if kv is None else kv.capacity
    if t + max_new_tokens > capacity - (kv.length if kv is not None else 0):
        raise ValueError(
            f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"{capacity}-token capacity: generate fewer tokens, or use a bounded cache "
            "('sliding:W' keeps the last W tokens, 'sink:S:W' keeps the first S plus the last W)"
        )
    if plan.step is not None:
        model.rope.reserve(kv.length + t + max_new_tokens)
    stop_ids = torch.as_tensor(_stop_ids(model, stop), dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        check_seed(seed)
        generator = torch.Generator(device=device).manual_seed(int(seed))
    positions = torch.where(mask, mask.long().cumsum(dim=1) - 1, -1)  # (B, T), pads at -1
    if kv is not None and kv.length:
        positions = torch.where(mask, positions + kv.length, -1)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    with _fewer_threads(plan.threads):
        yield from _decode(model, plan, kv, ids, positions, done, max_new_tokens, stop_ids,
                           pad_id, sampling)  # fmt: skip
    plan.finish()  # only after a whole run: a failed or abandoned one starts nothing


@contextlib.contextmanager
def _fewer_threads(n: int | None):
    """torch's thread count lowered to ``n`` inside (never raised), restored after."""
    old = torch.get_num_threads()
    if n is None or n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _decode(model, plan, kv, tokens, token_pos, done, max_new_tokens, stop_ids, pad_id, sampling):
    for i in range(max_new_tokens):
        if i == 0 or plan.step is None:  # the prompt runs eagerly: its length varies
            logits = model(tokens, positions=token_pos, cache=kv, last_only=True)[:, -1]
        else:
            logits = plan.step(tokens, token_pos, kv)
        nxt = torch.where(done, pad_id, sample(logits, **sampling))
        yield nxt
        if stop_ids.numel():
            done |= torch.isin(nxt, stop_ids)
            if bool(done.all()):
                return
        next_pos = token_pos[:, -1:] + 1  # (B, 1)
        if kv is None:  # the lecture's loop: the whole sequence again
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            token_pos = torch.cat([token_pos, next_pos], dim=1)
        else:
            tokens, token_pos = nxt[:, None], next_pos


def _stop_ids(model, stop) -> list[int]:
    if isinstance(stop, str):
        if stop != "eos":
            raise ValueError(f"stop must be token ids, 'eos' or None, got {stop!r}")
        return list(model.config.eos_ids)
    if stop is None:
        return []
    ids = [stop] if isinstance(stop, numbers.Integral) else stop
    if not isinstance(ids, Sequence | torch.Tensor) or not all(_is_int(s) for s in list(ids)):
        raise ValueError(f"stop must be token ids, 'eos' or None, got {stop!r}")
    return [int(s) for s in ids]


def generate(model, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Prompt plus generated tokens (B, T + n), left-padded as the prompt was.

    Keyword arguments as ``stream``: ``cache`` ("auto", "none", "dense", "static", ... or a
    ``KVCache``), ``compile``, ``attention_mask``, ``temperature``, ``top_k``, ``top_p``,
    ``seed``, ``stop`` (default: the model's end-of-sequence tokens; when every row has stopped
    the result is shorter than T + max_new_tokens, rows stopped earlier padded with the pad id).
    """
    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, _ = _as_batch(input_ids, kwargs.get("attention_mask"), pad_id)
    new = list(stream(model, input_ids, max_new_tokens, **kwargs))
    return torch.cat([ids.to(new[0].device), torch.stack(new, dim=1)], dim=1)


def encode_prompt(model, prompt: str, *, chat: bool = False) -> list[int]:
    """Token ids for ``prompt`` with the model's tokenizer (its chat template if ``chat``)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        why = model.config.extra.get("tokenizer_missing", "the checkpoint carries none")
        raise ValueError(f"text generation needs a tokenizer, and this model has none: {why}")
    if not chat:
        return list(tok.encode(prompt))
    if not getattr(tok, "chat_template", None):
        raise ValueError("chat=True needs a chat template, and this tokenizer has none")
    messages = [{"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    return [int(i) for i in ids]


def stream_text(
    model,
    prompt: str,
    max_new_tokens: int,
    *,
    chat: bool = False,
    stats: dict | None = None,
    **kwargs,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces while tokens are produced.

    Stops at the model's end-of-sequence tokens unless ``stop`` says otherwise. A piece is
    emitted once its bytes decode completely, so multi-byte characters are never split.
    ``stats``, if given, is filled as tokens arrive: ``prompt_tokens``, ``new_tokens``,
    ``first_token_s`` and ``last_token_s`` (seconds since the call).
    """
    start = time.perf_counter()
    tok = model.tokenizer
    ids = encode_prompt(model, prompt, chat=chat)
    stop_ids = set(_stop_ids(model, kwargs.get("stop", "eos")))
    stats = {} if stats is None else stats
    stats.update(prompt_tokens=len(ids), new_tokens=0)
    new: list[int] = []
    shown = ""
    for nxt in stream(model, ids, max_new_tokens, **kwargs):
        token = int(nxt[0])
        stats["last_token_s"] = time.perf_counter() - start
        stats.setdefault("first_token_s", stats["last_token_s"])
        if token in stop_ids:
            continue  # the stream ends by itself after a stop token (and finishes its plan)
        stats["new_tokens"] += 1
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text


# The public names.
__all__ = [
    "AUTO_COMPILE_TOKENS",
    "COMPILE_MODES",
    "DecodePlan",
    "building_elsewhere",
    "compiled_step",
    "encode_prompt",
    "generate",
    "plan_decode",
    "stream",
    "stream_text",
]
