"""Autoregressive decoding: prefill, one-token steps, sampling, streaming.

``cache="none"`` is the lecture's loop: every step re-runs the whole sequence, so step t costs
O(t) matmul work and O(t^2) attention, and the run is quadratic in length. With a KV cache
(``dense``, ``static``, see ``archopt.ops.kv_cache``) a step runs only the new token against
the cached keys and values. Both paths give the same tokens.

Batches of prompts of different lengths are left-padded; each row gets its own positions
(padding at -1, never attended), so a row decodes exactly as it would alone.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence

import torch

from archopt.ops.kv_cache import KVCache, StaticCache

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# Modes a command line offers for compiled steps; "inductor-cpp" adds inductor's C++ wrapper.
COMPILE_MODES = ("inductor", "inductor-cpp")


def compiled_step(model, backend="inductor"):
    """``torch.compile(model)`` for one-token steps on a static cache, built once per model.

    ``backend="inductor-cpp"``: inductor with its C++ wrapper, which calls the step's few
    hundred kernels from C++ instead of Python. On SmolLM2-135M with int4 weights (2 threads)
    that took a step from 14.8 to 11.2 ms, and the first compile from 27 to 69 s (inductor
    caches it on disk for later processes).
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


def _as_batch(input_ids, attention_mask, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) as (B, T) tensors; ragged lists are left-padded with ``pad_id``."""
    if isinstance(input_ids, torch.Tensor):
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


def sample(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next tokens (B,) from logits (B, vocab): greedy at temperature 0, else top-k/top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


@torch.inference_mode()
def stream(
    model,
    input_ids,
    max_new_tokens: int,
    *,
    cache: str | KVCache | None = "dense",
    attention_mask=None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: int | Sequence[int] | None = None,
    compile: bool | str = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (B,) as it is produced.

    Rows that have produced a ``stop`` token yield the pad id from then on; the iterator ends
    when every row has stopped or after ``max_new_tokens`` steps. ``compile`` (True, a
    torch.compile backend name, or ``"inductor-cpp"``: see ``compiled_step``) runs the
    one-token steps through one compiled graph; it needs the static cache, whose shapes never
    change, so the graph is never recompiled.
    """
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    ids, mask = _as_batch(input_ids, attention_mask, pad_id)
    device = model.embed.weight.device
    ids, mask = ids.to(device), mask.to(device)
    b, t = ids.shape
    reserve = t + max_new_tokens
    if compile:  # a static cache's size is a compiled shape: round it so runs share graphs
        reserve = min(-(-reserve // 256) * 256, cfg.max_position_embeddings)
    kv = model.make_cache(cache, batch=b, reserve=reserve) if cache is not None else None
    capacity = cfg.max_position_embeddings if kv is None else kv.capacity
    if t + max_new_tokens > capacity - (kv.length if kv is not None else 0):
        raise ValueError(
            f"prompt ({t} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
            f"{capacity}-token capacity: generate fewer tokens, or use a bounded cache "
            "('sliding:W' keeps the last W tokens, 'sink:S:W' keeps the first S plus the last W)"
        )
    step = model
    if compile:
        if not isinstance(kv, StaticCache):
            raise ValueError(
                f"compile=True needs cache='static' (fixed shapes, no recompiles), got {cache!r}"
            )
        step = compiled_step(model, "inductor" if compile is True else compile)
        model.rope.reserve(kv.length + t + max_new_tokens)
    stop_ids = torch.as_tensor([stop] if isinstance(stop, int) else list(stop or []), device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    positions = torch.where(mask, mask.long().cumsum(dim=1) - 1, -1)  # (B, T), pads at -1
    if kv is not None and kv.length:
        positions = torch.where(mask, positions + kv.length, -1)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    tokens, token_pos = ids, positions
    for i in range(max_new_tokens):
        run = model if i == 0 else step  # the prompt runs eagerly: its length varies
        logits = run(tokens, positions=token_pos, cache=kv, last_only=True)[:, -1]
        nxt = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        nxt = torch.where(done, pad_id, nxt)
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


def generate(model, input_ids, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """Prompt plus generated tokens (B, T + n), left-padded as the prompt was.

    Keyword arguments as ``stream``: ``cache`` ("none", "dense", "static" or a ``KVCache``),
    ``attention_mask``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``.
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
    model, prompt: str, max_new_tokens: int, *, chat: bool = False, **kwargs
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces while tokens are produced.

    Stops at the model's end-of-sequence tokens unless ``stop`` is given. A piece is emitted
    once its bytes decode completely, so multi-byte characters are never split.
    """
    tok = model.tokenizer
    ids = encode_prompt(model, prompt, chat=chat)
    kwargs.setdefault("stop", model.config.eos_ids or None)
    stop = kwargs["stop"]
    stop_ids = {stop} if isinstance(stop, int) else set(stop or ())
    new: list[int] = []
    shown = ""
    for nxt in stream(model, ids, max_new_tokens, **kwargs):
        token = int(nxt[0])
        if token in stop_ids:
            break
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > len(shown):
            yield text[len(shown) :]
            shown = text


def reference_text(tokens: int | None = None, tokenizer=None) -> str:
    """A fixed English text that ships with Python (the standard library's help topics).

    Perplexity is measured on it so that every run, on every machine, scores the same words.
    """
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in ("assert", "assignment", "if", "while", "for", "try"))
    if tokens is not None and tokenizer is not None:
        text = tokenizer.decode(tokenizer.encode(text)[:tokens])
    return text


@torch.inference_mode()
def perplexity(model, ids, *, cache: str | KVCache | None = "dense", chunk: int = 64) -> float:
    """exp(mean negative log-likelihood) of ``ids`` (1D), fed in ``chunk``-token steps through
    ``cache`` so that the cache's approximations (int8, a window) shape what is scored."""
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
    n = ids.shape[1]
    if n < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n}")
    kv = model.make_cache(cache, reserve=n) if cache is not None else None
    nll, count = 0.0, 0
    for start in range(0, n - 1, chunk):
        end = min(start + chunk, n - 1)
        if kv is None:  # no cache: the whole prefix every time
            logits = model(ids[:, :end])[:, start:end]
        else:
            logits = model(ids[:, start:end], cache=kv)
        targets = ids[:, start + 1 : end + 1]
        nll += torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="sum"
        ).item()
        count += targets.numel()
    return float(torch.tensor(nll / count).exp())
