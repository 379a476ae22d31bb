"""A request's own work on its row of logits: the OpenAI API's logit bias and presence and
frequency penalties before the token is chosen, the choice (greedy or sampled by its own
settings), and the log-probabilities it asked to see.

The adjustments follow OpenAI's definition: for each token j, with c[j] the times it is in the
output so far, ``logit[j] + bias[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty``
(the prompt does not count, as in vLLM). Log-probabilities are those of the model's own
distribution, before bias, penalties and temperature (vLLM's default, ``raw_logprobs``), so
they do not change with the sampling settings. Only requests that ask pay for any of this: the
engine calls these for them alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from archopt.sampling import greedy, sample

MAX_LOGPROBS = 20  # alternatives a token may list (vLLM's default limit; OpenAI's is 20 for chat)


def adjusted(row: torch.Tensor, params, output: Sequence[int]) -> torch.Tensor:
    """``row`` (1, vocab) with ``params``' logit bias and penalties applied, as a new tensor."""
    row = row.float().clone()
    if params.logit_bias:
        row[0].index_add_(0, *params.bias_tensors)
    if output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output), minlength=row.shape[-1])[: row.shape[-1]]
        penalty = counts * params.frequency_penalty + (counts > 0) * params.presence_penalty
        row[0] -= penalty.float()
    return row


def choose(row: torch.Tensor, params, output: Sequence[int], generator) -> int:
    """The token a request takes from its ``row`` (1, vocab) of logits by its own settings:
    bias and penalties applied, then greedy or sampled (temperature, top-k, top-p, its
    ``generator``)."""
    if params.changes_logits:
        row = adjusted(row, params, output)
    if params.temperature == 0:
        return int(greedy(row)[0])
    kw = {"top_k": params.top_k, "top_p": params.top_p, "generator": generator}
    return int(sample(row, temperature=params.temperature, **kw)[0])


def token_logprobs(row: torch.Tensor, token: int, top: int) -> tuple[int, float, list]:
    """(token, its log-probability, the ``top`` most likely tokens as (id, log-probability),
    most likely first) under ``row`` (vocab,), the model's logits."""
    logp = torch.log_softmax(row.float(), dim=-1)
    alternatives = []
    if top > 0:
        values, ids = logp.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return token, float(logp[token]), alternatives


def owed(req, start: int, n: int) -> range:
    """The positions among ``start .. start + n - 1`` whose logits give a prompt token's
    log-probability that ``req`` asked for (``prompt_logprobs``) and has not got yet: entry i
    of ``req.prompt_logprobs`` is prompt token i + 1's, from the logits at position i."""
    if req.params.prompt_logprobs is None:
        return range(0)
    return range(max(start, len(req.prompt_logprobs)), min(start + n, len(req.prompt) - 1))


def record_prompt_logprob(req, position: int, row: torch.Tensor) -> None:
    """The log-probability of prompt token ``position + 1`` under ``row``, the logits at
    ``position``, appended to ``req.prompt_logprobs`` (in order: owed's positions)."""
    assert position == len(req.prompt_logprobs), (position, len(req.prompt_logprobs))
    token = req.prompt[position + 1]
    req.prompt_logprobs.append(token_logprobs(row, token, req.params.prompt_logprobs))


__all__ = ["MAX_LOGPROBS", "adjusted", "choose", "owed", "record_prompt_logprob", "token_logprobs"]
