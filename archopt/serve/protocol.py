"""The OpenAI API's requests, as the server reads them: parsed and checked into the engine's
terms (the body, the API key, the prompts of a chat or a completion, each choice's sampling
parameters), and errors as OpenAI's ``{"error": {...}}`` bodies. ``responses.py`` shapes what
the server answers. Nothing of starlette's but the one JSON response of an error, imported
when one is sent.
"""

from __future__ import annotations

import dataclasses
import json
import secrets

from archopt.serve.logits import MAX_LOGPROBS
from archopt.serve.scheduler import SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code
        self.type = {401: "authentication_error", 503: "service_unavailable"}.get(
            status, "invalid_request_error"
        )


def error_response(err: APIError):
    from starlette.responses import JSONResponse

    body = {"error": {"message": err.message, "type": err.type, "param": err.param}}
    body["error"]["code"] = err.code
    return JSONResponse(body, status_code=err.status)


# -- request parsing --------------------------------------------------------------------------
def _number(body: dict, key: str, default, *, kind=float, low=None, high=None, low_open=False):
    value = body.get(key, default)
    if value is None:
        return default
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = f"{'>' if low_open else '>='} {low}" if low is not None else ""
        if high is not None:
            bounds += f"{' and ' if bounds else ''}<= {high}"
        what = "an integer" if kind is int else "a number"
        raise APIError(400, f"{key} must be {what} {bounds}, got {value!r}".strip(), param=key)
    return value


# Parameters of OpenAI's API this server does not implement, with the values that mean "not
# used": any other value is refused rather than ignored (ignoring a suffix or a tool would
# return something the client did not ask for).
UNSUPPORTED = {
    "suffix": (None, ""),
    "best_of": (None, 1),
    "tools": (None, []),
    "functions": (None, []),
}


def _is_unused(value, unused: tuple) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):  # False is "not used", True never: 0 == False must not pass
        return value is False and any(u is False for u in unused)
    if isinstance(value, int | float):
        return any(value == u for u in unused if isinstance(u, int | float) and u is not False)
    return any(type(value) is type(u) and value == u for u in unused)


def check_unsupported(body: dict) -> None:
    """400 for a parameter of OpenAI's API this server does not implement, set to a value
    that would change the result (``UNSUPPORTED``)."""
    for key, unused in UNSUPPORTED.items():
        value = body.get(key)
        if not _is_unused(value, unused):
            raise APIError(400, f"{key} is not supported by this server, got {value!r}", param=key)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise APIError(
            400,
            f"response_format must be {{'type': 'text'}} on this server, got {fmt!r}",
            param="response_format",
        )


def _logit_bias(body: dict) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    out = {}
    for key, value in bias.items() if isinstance(bias, dict) else [(None, None)]:
        try:
            token = int(key)
        except (TypeError, ValueError):
            token = -1
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if token < 0 or not number or not -100 <= value <= 100:
            raise APIError(
                400,
                "logit_bias must map token ids to numbers in [-100, 100], got "
                f"{json.dumps(bias)[:200] if isinstance(bias, dict) else repr(bias)[:200]}",
                param="logit_bias",
            )
        out[token] = float(value)
    return out


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives each token lists (None: no log-probabilities). Chat asks with
    ``logprobs: true`` and ``top_logprobs: k``; a completion with ``logprobs: k``."""
    top = f"0 to {MAX_LOGPROBS}"
    if chat:
        wanted = body.get("logprobs")
        if wanted is not None and not isinstance(wanted, bool):
            raise APIError(400, f"logprobs must be true or false, got {wanted!r}", param="logprobs")
        k = _number(body, "top_logprobs", None, kind=int, low=0, high=MAX_LOGPROBS)
        if k is not None and not wanted:
            msg = f"top_logprobs ({k}) needs logprobs: true"
            raise APIError(400, msg, param="top_logprobs")
        return (k or 0) if wanted else None
    if body.get("top_logprobs") not in (None, 0):
        msg = f"top_logprobs is for chat completions; a completion takes logprobs ({top})"
        raise APIError(400, msg, param="top_logprobs")
    if isinstance(body.get("logprobs"), bool):
        msg = f"logprobs of a completion is how many alternatives ({top}), got {body['logprobs']}"
        raise APIError(400, msg, param="logprobs")
    return _number(body, "logprobs", None, kind=int, low=0, high=MAX_LOGPROBS)


MAX_CHOICES = 128  # OpenAI's limit on n


def choices(body: dict, params: SamplingParams) -> list[SamplingParams]:
    """The settings of each of the request's ``n`` choices: choice i samples with seed + i (so
    choice 0 is the request with n = 1, and the others differ from it), or each with a seed of
    its own when none is given. Only the first scores the prompt for ``echo`` (the others read
    it from the prefix cache), unless there is nothing else to do (``max_tokens`` 0)."""
    n = _number(body, "n", 1, kind=int, low=1, high=MAX_CHOICES)
    out = [params] * n
    if params.seed is not None:
        seeds = [params.seed + i - (2**64 if params.seed + i >= 2**64 else 0) for i in range(n)]
        out = [dataclasses.replace(params, seed=s) for s in seeds]
    if params.prompt_logprobs is not None and params.max_tokens:
        out[1:] = [dataclasses.replace(p, prompt_logprobs=None) for p in out[1:]]
    return out


def echoes(body: dict, chat: bool) -> bool:
    """Whether a completion returns its prompt before its text (``echo``; not for chat)."""
    echo = body.get("echo")
    if echo is not None and not isinstance(echo, bool):
        raise APIError(400, f"echo must be true or false, got {echo!r}", param="echo")
    if echo and chat:
        raise APIError(400, "echo is for completions, not chat completions", param="echo")
    return bool(echo)


def sampling_params(
    body: dict, prompt_len: int, capacity: int, default_max: int | None, *, chat: bool = True
):
    check_unsupported(body)
    echo = echoes(body, chat)
    room = capacity - prompt_len
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max, kind=int, low=0 if echo else 1)
    if max_tokens is None:
        max_tokens = room
    if max_tokens > room:
        raise APIError(
            400,
            f"this model's context holds {capacity} tokens, and the prompt has {prompt_len}: "
            f"{key} must be at most {room}, got {max_tokens}",
            param=key,
            code="context_length_exceeded",
        )
    stop = body.get("stop")
    if stop is None:
        stop = []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        msg = f"stop must be a string or a list of strings, got {stop!r}"
        raise APIError(400, msg, param="stop")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) for t in stop_ids):
        raise APIError(400, f"stop_token_ids must be a list of integers, got {stop_ids!r}")
    logprobs = _logprobs(body, chat)
    scored = None  # echo's prompt log-probabilities (a prompt echoed alone is scored too)
    if echo:
        scored = logprobs if logprobs is not None else 0 if max_tokens == 0 else None
    top_k = body.get("top_k")
    if top_k is not None and top_k != -1:
        top_k = _number(body, "top_k", None, kind=int, low=1)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0, high=2),
        top_p=_number(body, "top_p", 1.0, low=0, high=1, low_open=True),
        top_k=None if top_k in (None, -1) else top_k,
        seed=_number(body, "seed", None, kind=int, low=-(2**63), high=2**64 - 1),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.get("ignore_eos", False)),
        logit_bias=_logit_bias(body),
        presence_penalty=_number(body, "presence_penalty", 0.0, low=-2, high=2),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, low=-2, high=2),
        logprobs=logprobs,
        prompt_logprobs=scored,
    )


def chat_prompt(tokenizer, messages) -> list[int]:
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of messages", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise APIError(
                400,
                f"messages[{i}] must be an object with a role of system, user or assistant, "
                f"got {m!r}",
                param="messages",
            )
        content = m.get("content")
        if isinstance(content, list):  # content parts: the text ones, joined
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts) or len(parts) != len(content):
                raise APIError(400, f"messages[{i}].content: only text parts are supported")
            content = "".join(parts)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string, got {content!r}")
        clean.append({"role": m["role"], "content": content})
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template: use /v1/completions")
    ids = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    return [int(t) for t in ids]


def completion_prompts(tokenizer, prompt) -> list[list[int]]:
    """A completion's prompts as token ids: a string, a list of token ids, or a batch (a list
    of either)."""

    def one(p) -> list[int] | None:
        if isinstance(p, str) and p:
            if tokenizer is None:
                raise APIError(400, "this model has no tokenizer: send the prompt as token ids")
            return [int(t) for t in tokenizer.encode(p)]
        if (
            isinstance(p, list)
            and p
            and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
        ):
            return list(p)
        return None

    single = one(prompt)
    if single is not None:
        return [single]
    batch = [one(p) for p in prompt] if isinstance(prompt, list) and prompt else [None]
    if any(b is None for b in batch):
        raise APIError(
            400,
            "prompt must be a non-empty string or list of token ids, or a list of them, got "
            f"{repr(prompt)[:200]}",
            param="prompt",
        )
    return batch


def tokenizer_info(tokenizer) -> dict:
    """``GET /tokenizer_info`` (vLLM's): the special tokens and the chat template, what a
    client needs to tokenize through the server (lm-evaluation-harness's remote tokenizer)."""
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    names = ("eos_token", "bos_token", "pad_token", "unk_token", "chat_template")
    return {name: getattr(tokenizer, name, None) for name in names}


def tokenize(body: dict, tokenizer, capacity: int) -> dict:
    """``POST /tokenize`` (vLLM's): a ``prompt``'s token ids (``add_special_tokens``, default
    true), or a chat's (``messages``, with its template)."""
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    if "messages" in body:
        ids = chat_prompt(tokenizer, body["messages"])
    else:
        prompt, special = body.get("prompt"), body.get("add_special_tokens", True)
        if not isinstance(prompt, str):
            raise APIError(400, f"prompt must be a string, got {prompt!r}"[:300], param="prompt")
        if not isinstance(special, bool):
            msg = f"add_special_tokens must be true or false, got {special!r}"
            raise APIError(400, msg, param="add_special_tokens")
        ids = [int(t) for t in tokenizer.encode(prompt, add_special_tokens=special)]
    return {"count": len(ids), "max_model_len": capacity, "tokens": ids}


def detokenize(body: dict, tokenizer, vocab: int) -> dict:
    """``POST /detokenize`` (vLLM's): the text of ``tokens``."""
    if tokenizer is None:
        raise APIError(400, "this model has no tokenizer")
    ids = body.get("tokens")
    ok = isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids)
    if not ok or not all(0 <= t < vocab for t in ids):
        msg = f"tokens must be a list of token ids in [0, {vocab}), got {ids!r}"[:300]
        raise APIError(400, msg, param="tokens")
    return {"prompt": tokenizer.decode(ids)}


def parse_body(raw: bytes, model_name: str) -> dict:
    """A request's JSON body: an object, naming this server's model if it names one."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body must be valid JSON: {e}") from None
    if not isinstance(body, dict):
        got = type(body).__name__
        raise APIError(400, f"the request body must be a JSON object, got {got}")
    model = body.get("model")
    if model is not None and model != model_name:
        raise APIError(
            400,
            f"model must be {model_name!r} (the one this server runs), got {model!r}",
            param="model",
            code="model_not_found",
        )
    return body


def check_api_key(authorization: str, api_key: str | None) -> None:
    """401 unless ``authorization`` is ``Bearer <api_key>`` (anything goes without a key)."""
    if api_key is None:
        return
    given = authorization[7:] if authorization.lower().startswith("bearer ") else ""
    if not secrets.compare_digest(given.encode(), api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")


def parse_generation(body: dict, engine, *, chat: bool):
    """([(prompt ids, the SamplingParams of each of its choices), ...], echo, stream,
    include_usage) of a completion request for ``engine`` (its tokenizer, capacity and prompt
    check): one prompt for chat, one or a batch for a completion."""
    if chat:
        if "messages" not in body:
            raise APIError(400, "messages is required", param="messages")
        prompts = [chat_prompt(engine.tokenizer, body["messages"])]
    else:
        if "prompt" not in body:
            raise APIError(400, "prompt is required", param="prompt")
        prompts = completion_prompts(engine.tokenizer, body["prompt"])
    jobs = []
    for prompt in prompts:
        if len(prompt) >= engine.capacity:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens, and this model's context holds "
                f"{engine.capacity}: shorten it",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        try:
            default_max = None if chat else 16
            params = sampling_params(body, len(prompt), engine.capacity, default_max, chat=chat)
            engine.check_prompt(prompt)
            engine.check_params(params)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        jobs.append((prompt, choices(body, params)))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, f"stream must be true or false, got {stream!r}", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        msg = f"stream_options must be an object, got {options!r}"
        raise APIError(400, msg, param="stream_options")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        msg = f"stream_options.include_usage must be true or false, got {include_usage!r}"
        raise APIError(400, msg, param="stream_options")
    return jobs, echoes(body, chat), bool(stream), bool(include_usage)


__all__ = [
    "APIError",
    "chat_prompt",
    "check_api_key",
    "check_unsupported",
    "choices",
    "completion_prompts",
    "detokenize",
    "error_response",
    "parse_body",
    "parse_generation",
    "sampling_params",
    "tokenize",
    "tokenizer_info",
]
