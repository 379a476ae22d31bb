"""The OpenAI API's responses, as the server sends them: a whole completion's body, the
server-sent events of a streamed one (a chunk a choice's new text, then its finish reason, then
the usage), the ``logprobs`` objects of chat and of completions (an echoed prompt's included),
and the metrics as Prometheus text. ``protocol.py`` parses the requests they answer.
"""

from __future__ import annotations

import json
import math

from archopt.serve.detokenize import token_bytes
from archopt.serve.scheduler import Request


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token(tokenizer, token_id: int) -> tuple[str, bytes]:
    """A token as OpenAI lists it: its text, or ``bytes:\\xHH...`` when it holds part of a
    character; and its bytes."""
    if tokenizer is None:
        return f"token_id:{token_id}", b""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{c:02x}" for c in raw), raw


def _logprob(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no infinity (vLLM's stand-in)


def logprobs_body(entries: list, tokenizer, *, chat: bool, offset: int = 0) -> dict:
    """OpenAI's ``logprobs`` of a choice for ``entries`` (a request's, ``(token, logprob,
    [(alternative, logprob), ...])`` each): chat's ``{"content": [...]}``, or a completion's
    lists, with each token's offset in the text counted from ``offset``."""
    if chat:
        content = []
        for token, lp, top in entries:
            text, raw = _token(tokenizer, token)
            alternatives = []
            for t, v in top:
                t_text, t_raw = _token(tokenizer, t)
                alternatives.append({"token": t_text, "logprob": _logprob(v), "bytes": list(t_raw)})
            content.append(
                {"token": text, "logprob": _logprob(lp), "bytes": list(raw),
                 "top_logprobs": alternatives}
            )  # fmt: skip
        return {"content": content, "refusal": None}
    tokens, logprobs, tops, offsets = [], [], [], []
    for token, lp, top in entries:
        text = _token(tokenizer, token)[0]
        tokens.append(text)
        logprobs.append(_logprob(lp))
        offsets.append(offset)
        offset += len(text)
        listed: dict[str, float] = {}  # a text two tokens share keeps the likelier one's
        for t, v in [*top, (token, lp)]:  # the chosen token is always listed
            listed.setdefault(_token(tokenizer, t)[0], _logprob(v))
        tops.append(listed)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def prompt_logprobs_body(prompt: list[int], entries: list, tokenizer) -> dict:
    """A completion's ``logprobs`` for its echoed prompt: every prompt token, the first one
    without a log-probability (nothing comes before it), then ``entries`` (the request's
    ``prompt_logprobs``: prompt tokens 1.. as far as they were scored)."""
    first = _token(tokenizer, prompt[0])[0]
    rest = logprobs_body(entries, tokenizer, chat=False, offset=len(first))
    return {"tokens": [first, *rest["tokens"]], "token_logprobs": [None, *rest["token_logprobs"]],
            "top_logprobs": [None, *rest["top_logprobs"]],
            "text_offset": [0, *rest["text_offset"]]}  # fmt: skip


def joined(a: dict, b: dict) -> dict:
    """Two completion ``logprobs`` objects, one after the other."""
    return {key: a[key] + b[key] for key in a}


def whole_response(
    head: dict,
    reqs: list[Request],
    counts: dict,
    *,
    chat: bool,
    logprobs: list | None = None,
    texts: list[str] | None = None,
) -> dict:
    """The body of a finished, unstreamed completion: ``head`` (id, created, model), a choice
    for each of ``reqs`` (``logprobs``: theirs, from ``logprobs_body``; ``texts``: theirs, if
    not their requests' text) and ``counts`` (the usage)."""
    out = []
    for i, req in enumerate(reqs):
        lp = logprobs[i] if logprobs else None
        text = req.text if texts is None else texts[i]
        if chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": i, "message": message, "logprobs": lp,
                      "finish_reason": req.finish_reason}  # fmt: skip
        else:
            choice = {"index": i, "text": text, "logprobs": lp,
                      "finish_reason": req.finish_reason}  # fmt: skip
        out.append(choice)
    obj = "chat.completion" if chat else "text_completion"
    return {**head, "object": obj, "choices": out, "usage": counts}


def _chunk_object(chat: bool) -> str:
    return "chat.completion.chunk" if chat else "text_completion"


def event(data: dict | str) -> str:
    """One server-sent event: ``data: <json>`` (or the text as it is, for ``[DONE]``)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def chunk(
    head: dict,
    delta: str | None,
    finish: str | None,
    *,
    chat: bool,
    include_usage: bool,
    role: bool = False,
    logprobs: dict | None = None,
    index: int = 0,
) -> str:
    """One streamed chunk of choice ``index`` as an event: new text (with the ``logprobs`` of
    its tokens), or the finish reason (or, for chat, the opening ``role`` chunk)."""
    if chat:
        d = {"role": "assistant", "content": ""} if role else {}
        if delta:
            d["content"] = delta
        choice = {"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": index, "text": delta or "", "logprobs": logprobs,
                  "finish_reason": finish}  # fmt: skip
    data = {**head, "object": _chunk_object(chat), "choices": [choice]}
    if include_usage:
        data["usage"] = None
    return event(data)


def usage_chunk(head: dict, counts: dict, *, chat: bool) -> str:
    """The last chunk before ``[DONE]`` when the client asked for usage: no choices."""
    return event({**head, "object": _chunk_object(chat), "choices": [], "usage": counts})


def metrics_text(metrics: dict) -> str:
    """The engine's metrics in Prometheus' text format."""
    lines = []
    for k, v in metrics.items():
        kind = "counter" if k.endswith("_total") else "gauge"
        lines += [f"# TYPE archopt_{k} {kind}", f"archopt_{k} {v}"]
    return "\n".join(lines) + "\n"


class Answer:
    """The answer to one request, whole or streamed: a choice for each of ``reqs`` (a prompt's
    choices, prompt after prompt), ``leaders[i]`` the first choice of choice i's prompt (the
    one that read it and, for ``echo``, scored it). Keeps what a stream has sent of each."""

    def __init__(self, head: dict, reqs: list, leaders: list, tokenizer, *, chat: bool,
                 echo: bool, include_usage: bool) -> None:  # fmt: skip
        self.head, self.reqs, self.leaders, self.tokenizer = head, reqs, leaders, tokenizer
        self.chat, self.echo, self.include_usage = chat, echo, include_usage
        self.logprobs = reqs[0].params.logprobs is not None
        self.prompt_texts = {id(r): tokenizer.decode(r.prompt) for r in leaders} if echo else {}
        self.sent = [0] * len(reqs)  # of each choice: log-probability entries streamed
        self.offset = [0] * len(reqs)  # and the text offset they reach (completions)
        self.shown: set[int] = set()  # choices whose echoed prompt went out

    def usage(self) -> dict:
        prompts = sum(len(r.prompt) for r in {id(r): r for r in self.leaders}.values())
        return usage(prompts, sum(len(r.output) for r in self.reqs))

    def _echoed(self, i: int) -> tuple[str, dict | None]:
        """Choice i's prompt as ``echo`` returns it: its text and its tokens' logprobs."""
        first = self.leaders[i]
        lp = None
        if self.logprobs:
            lp = prompt_logprobs_body(first.prompt, first.prompt_logprobs, self.tokenizer)
        return self.prompt_texts[id(first)], lp

    def whole(self) -> dict:
        """The body of the finished, unstreamed answer."""
        texts = [r.text for r in self.reqs]
        logprobs = None
        if self.logprobs:
            logprobs = [
                logprobs_body(r.logprobs, self.tokenizer, chat=self.chat) for r in self.reqs
            ]
        for i, r in enumerate(self.reqs if self.echo else ()):
            prompt_text, prompt_lp = self._echoed(i)
            texts[i] = prompt_text + r.text
            if self.logprobs:
                after = logprobs_body(
                    r.logprobs, self.tokenizer, chat=False, offset=len(prompt_text)
                )
                logprobs[i] = joined(prompt_lp, after)
        return whole_response(
            self.head, self.reqs, self.usage(), chat=self.chat, logprobs=logprobs, texts=texts
        )

    def _chunk(self, i: int, text: str | None, finish: str | None, *, upto: int = 0,
               role: bool = False, logprobs: dict | None = None) -> str:  # fmt: skip
        if self.logprobs and upto > self.sent[i]:  # the log-probabilities of the new tokens
            entries = self.reqs[i].logprobs[self.sent[i] : upto]
            logprobs = logprobs_body(entries, self.tokenizer, chat=self.chat, offset=self.offset[i])
            self.sent[i] = upto
            if not self.chat:
                self.offset[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return chunk(self.head, text, finish, chat=self.chat, include_usage=self.include_usage,
                     role=role, logprobs=logprobs, index=i)  # fmt: skip

    def opening(self) -> list[str]:
        """A chat stream's first chunks: each choice's role."""
        if not self.chat:
            return []
        return [self._chunk(i, None, None, role=True) for i in range(len(self.reqs))]

    def chunks(self, i: int, text: str, done: bool, upto: int) -> list[str]:
        """Choice i's chunks for its new ``text`` (its tokens' logprobs up to entry ``upto``):
        first its echoed prompt, if not sent yet, then the text, then, when ``done``, its
        finish reason."""
        out = []
        if self.echo and i not in self.shown:
            self.shown.add(i)
            prompt_text, prompt_lp = self._echoed(i)
            self.offset[i] = len(prompt_text)
            out.append(self._chunk(i, prompt_text, None, logprobs=prompt_lp))
        if text:
            out.append(self._chunk(i, text, None, upto=upto))
        if done:
            req = self.reqs[i]
            out.append(self._chunk(i, None, req.finish_reason, upto=len(req.logprobs)))
        return out

    def closing(self) -> list[str]:
        """A stream's last chunks: the usage when asked for, then ``[DONE]``."""
        last = [usage_chunk(self.head, self.usage(), chat=self.chat)] if self.include_usage else []
        return [*last, event("[DONE]")]


__all__ = [
    "Answer",
    "chunk",
    "event",
    "joined",
    "logprobs_body",
    "metrics_text",
    "prompt_logprobs_body",
    "usage",
    "usage_chunk",
    "whole_response",
]
