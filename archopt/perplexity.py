"""Scoring a language model: the perplexity of a token sequence, fed in chunks through a KV
cache so that the cache's approximations (int8, a window) shape the score, and the fixed
reference text (it ships with Python) that every run scores.
"""

from __future__ import annotations

import torch

from archopt.ops.kv_cache import KVCache


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
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
        raise ValueError(
            f"perplexity scores one sequence: ids must be (length,) or (1, length), got shape "
            f"{tuple(ids.shape)} (score the rows one by one)"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer >= 1, got {chunk!r}")
    ids = ids.reshape(1, -1)
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


__all__ = ["perplexity", "reference_text"]
