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


__all__ = [
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
