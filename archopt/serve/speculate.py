"""Speculative decoding by n-gram lookup ("prompt lookup decoding"), exact for greedy requests.

Decoding is memory-bound: a step that reads the weights for one token reads them for a few
more at little extra cost. A greedy request whose last few tokens appeared earlier in its
prompt or output guesses that what followed then follows again (``NgramDrafter``: the
latest earlier occurrence of its last n tokens, n from ``max_n`` down to ``min_n``), and the
engine runs its last token and those drafts as consecutive rows of its sequence in one step,
as it runs a prompt chunk. Row j's logits are the model's next-token logits after draft j, so
the model's own choice after each row is known; the drafts are taken while they equal those
choices (``accepted``), and the request gets the choices up to the first draft that differs:
1 to k + 1 tokens a step, the tokens it gets one step at a time. Exact, not only in
distribution, as batching is: archopt's int8-activation kernels and decode attention give a
row the same sums whatever else is in its call, so with them a verified row's logits are bit
for bit those of the one-row step it replaces (SmolLM2's GGUF, ``gguf-act8``: tested); torch's
fp32 matmuls may sum a row in another order with more rows beside it (the last bit, as in a
batch). The rejected drafts' keys and values are forgotten (``PagedKVCache.rewind``).

Only plain greedy requests speculate (no temperature, bias or penalties: sampled requests
would need rejection sampling); log-probabilities come from each verified row's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from archopt.ops.paged_kv import PagedKVCache
    from archopt.serve.scheduler import Request


class NgramDrafter:
    """Drafts for one request from its own tokens, indexed as they come (the n-grams ending
    at each token are indexed once, so a step's lookup costs O(new tokens), not a scan)."""

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.min_n, self.max_n = min_n, max_n
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest copy ends
        self._indexed = 0  # n-grams ending before this position are in _after

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to ``k`` tokens that followed the latest earlier occurrence of ``tokens``'
        last n tokens (the longest n that has one); [] when none has."""
        end = len(tokens)
        for e in range(self._indexed, end):  # n-grams ending at e (exclusive), before the tail
            for n in range(self.min_n, min(self.max_n, e) + 1):
                self._after[tuple(tokens[e - n : e])] = e
        self._indexed = max(self._indexed, end)
        if k < 1:
            return []
        for n in range(min(self.max_n, end), self.min_n - 1, -1):
            e = self._after.get(tuple(tokens[end - n :]))
            if e is not None and e < end:
                return list(tokens[e : e + k])
        return []


def accepted(drafts: Sequence[int], chosen: Sequence[int]) -> int:
    """How many leading ``drafts`` the model confirms: ``chosen[j]`` is its token after row j
    (row 0 the request's last token, row j + 1 draft j), so draft j stands while it equals
    ``chosen[j]`` and every draft before it stood."""
    a = 0
    while a < len(drafts) and drafts[a] == chosen[a]:
        a += 1
    return a


def draft(
    decode: list[Request], cache: PagedKVCache, most: int, capacity: int
) -> dict[Request, list[int]]:
    """Each plain greedy decoding request's drafts, at most ``most``, within its
    ``max_tokens`` and the context of ``capacity`` tokens. A request's drafts take only
    blocks that are free (no cached prefix evicted, no pool grown for a guess)."""
    out: dict[Request, list[int]] = {}
    for req in decode:
        p = req.params
        if p.temperature > 0 or p.changes_logits:
            continue
        k = min(most, p.max_tokens - len(req.output) - 1, capacity - 2 - req.computed)
        req.drafter = req.drafter or NgramDrafter()
        run = req.drafter.propose(req.tokens, k)
        if run and cache.ensure(req.seq_id, 1 + len(run), unused_only=True):
            out[req] = run
    return out


def verify(
    drafts: dict[Request, list[int]], reqs: list[Request], chosen: list[int], cache: PagedKVCache
) -> tuple[list[int], int, int]:
    """After a step that ran ``drafts``: ``reqs`` has an entry per logits row (a speculating
    request's rows consecutive: its last token's, then its drafts'), ``chosen`` the model's
    greedy token after each. Each speculating request keeps its drafts while they equal those
    choices, is rewound past the others and commits the rest. Returns the rows whose tokens
    are emitted (a request's last token's and each kept draft's), and the drafts run and kept."""
    keep: list[int] = []
    i = drafted = taken = 0
    while i < len(reqs):
        req = reqs[i]
        run = drafts.get(req)
        if run is None:
            keep.append(i)
            i += 1
            continue
        a = accepted(run, chosen[i : i + len(run)])
        keep += range(i, i + 1 + a)
        i += 1 + len(run)
        cache.rewind(req.seq_id, req.computed + 1 + a)
        cache.commit(req.seq_id, [req.last_token, *run[:a]])
        req.computed += 1 + a
        drafted, taken = drafted + len(run), taken + a
    return keep, drafted, taken
