"""A request's own work on its row of logits: the OpenAI API's logit bias and presence and
frequency penalties before the token is chosen, and the log-probabilities it asked to see.

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


def token_logprobs(row: torch.Tensor, token: int, top: int) -> tuple[int, float, list]:
    """(token, its log-probability, the ``top`` most likely tokens as (id, log-probability),
    most likely first) under ``row`` (vocab,), the model's logits."""
    logp = torch.log_softmax(row.float(), dim=-1)
    alternatives = []
    if top > 0:
        values, ids = logp.topk(top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return token, float(logp[token]), alternatives


__all__ = ["MAX_LOGPROBS", "adjusted", "token_logprobs"]
