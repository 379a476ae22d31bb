"""A request's output text, decoded as its tokens come, in time proportional to the new tokens.

Decoding the whole output again at every token costs O(n) per token, O(n^2) per request: 4 ms
per token at 4096 tokens of output on SmolLM2's tokenizer, more than a decode step. The way
vLLM does it instead: keep two offsets into the tokens, ``prefix`` and ``read``; decode
``tokens[prefix:read]`` and ``tokens[prefix:]``, and the text the new tokens add is where the
second extends the first. Both decodes start at the same token, so a tokenizer whose output
depends on where decoding starts (a SentencePiece leading space) treats them alike. While the
new text ends in U+FFFD (a character whose bytes have not all come yet) nothing is added, and
the offsets stay. ``flush`` adds what is left as a whole decode would (U+FFFD included).
The reference is decoding the whole output (tests compare them at every token).

Stop strings end the text where the first of them starts (``cut_at_stop``); while a request
runs, what it sends holds back the tail that may be the start of one, and an incomplete
character (``sendable``).
"""

from __future__ import annotations

from collections.abc import Sequence

INCOMPLETE = "\ufffd"


class IncrementalText:
    """``text``: the decoded output so far, complete characters only until ``flush``."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.prefix = self.read = 0
        self.text = ""
        self._before = ""  # decode of tokens[prefix:read]: changes only when they move

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, tokens: Sequence[int], after: str) -> None:
        self.text += after[len(self._before) :]
        self.prefix, self.read = self.read, len(tokens)
        self._before = self._decode(tokens[self.prefix : self.read])

    def add(self, tokens: Sequence[int]) -> str:
        """``tokens``: the whole output so far (the last ones new). Returns ``text``."""
        after = self._decode(tokens[self.prefix :])
        if len(after) > len(self._before) and not after.endswith(INCOMPLETE):
            self._advance(tokens, after)
        return self.text

    def flush(self, tokens: Sequence[int]) -> str:
        """The text with whatever is still pending, as decoding the whole output gives it."""
        after = self._decode(tokens[self.prefix :])
        if len(after) > len(self._before):
            self._advance(tokens, after)
        return self.text


def cut_at_stop(text: str, stop: Sequence[str], emitted: int) -> tuple[str, bool]:
    """``text`` cut where the first stop string starts, and whether one was found. Only text
    that can hold a new match is searched: from the longest stop's length before ``emitted``
    (what was sent never held one)."""
    if not stop:
        return text, False
    start = max(emitted - max(len(s) for s in stop), 0)
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def sendable(text: str, stop: Sequence[str], emitted: int, done: bool) -> str:
    """The text past ``emitted`` that can be sent now: all of it when the request is done;
    before that, less the tail that may be the start of a stop string and an incomplete
    character."""
    end = len(text)
    if not done:
        if stop:
            end -= max(len(s) for s in stop) - 1
        while end > emitted and text[end - 1] == INCOMPLETE:
            end -= 1
    return text[emitted:end] if end > emitted else ""
