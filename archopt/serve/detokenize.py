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
character (``sendable``). ``token_bytes`` gives one token's own bytes (for log-probabilities:
a token may hold part of a character).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import cache

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


@cache
def _byte_level() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the character that stands for each byte, inverted.
    Printable bytes stand for themselves, the others for 256 + their rank among them."""
    kept = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for, from its vocabulary entry: a byte token ``<0xHH>``
    (SentencePiece's byte fallback), an entry in the byte-level alphabet (GPT-2, SmolLM,
    Llama 3) or a SentencePiece piece (``▁`` for a space); else its decoded text."""
    to_piece = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = to_piece([token_id])[0] if to_piece is not None else None
    if not isinstance(piece, str) or not piece:
        return tokenizer.decode([token_id]).encode()
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        with contextlib.suppress(ValueError):
            return bytes([int(piece[3:5], 16)])
    table = _byte_level()
    if all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    if "▁" in piece:
        return piece.replace("▁", " ").encode()
    return tokenizer.decode([token_id]).encode()
