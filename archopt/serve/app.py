"""An OpenAI-compatible HTTP server over the engine: starlette for the routes, uvicorn to serve.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events ending in ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health`` (503 while
the model loads, then 200) and ``GET /metrics`` (Prometheus text; JSON with
``Accept: application/json``). Errors are OpenAI's ``{"error": {...}}`` bodies: 400 for a
malformed request, 401 for a wrong API key, 503 when the queue is full or the model is not
loaded yet. The engine steps in its own thread; a stream whose client goes away aborts its
request, which frees its blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from typing import Any

from archopt.serve.engine import Engine
from archopt.serve.scheduler import QueueFull, Request, SamplingParams


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code
        self.type = {401: "authentication_error", 503: "service_unavailable"}.get(
            status, "invalid_request_error"
        )


def _error_response(err: APIError):
    from starlette.responses import JSONResponse

    body = {"error": {"message": err.message, "type": err.type, "param": err.param}}
    body["error"]["code"] = err.code
    return JSONResponse(body, status_code=err.status)


class ServerState:
    """The model and engine behind the app, loaded in a background thread."""

    def __init__(self, load, *, model_name: str, engine_kwargs: dict, api_key: str | None):
        self._load = load
        self.model_name = model_name
        self.engine_kwargs = engine_kwargs
        self.api_key = api_key
        self.engine: Engine | None = None
        self.load_error: str | None = None
        self.created = int(time.time())
        self.ready = threading.Event()

    def load(self) -> None:
        try:
            model = self._load if hasattr(self._load, "config") else self._load()
            self.engine = Engine(model, **self.engine_kwargs)
            self.engine.start()
        except Exception as e:  # reported by /health; the server stays up to say so
            self.load_error = f"{type(e).__name__}: {e}"
        finally:
            self.ready.set()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


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


def _sampling(body: dict, prompt_len: int, capacity: int, default_max: int | None):
    room = capacity - prompt_len
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _number(body, key, default_max, kind=int, low=1)
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
    n = _number(body, "n", 1, kind=int, low=1)
    if n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {n}", param="n")
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
    top_k = body.get("top_k")
    if top_k is not None and top_k != -1:
        top_k = _number(body, "top_k", None, kind=int, low=1)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, low=0, high=2),
        top_p=_number(body, "top_p", 1.0, low=0, high=1, low_open=True),
        top_k=None if top_k in (None, -1) else top_k,
        seed=_number(body, "seed", None, kind=int),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=bool(body.get("ignore_eos", False)),
    )


def _chat_prompt(tokenizer, messages) -> list[int]:
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


def _completion_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send the prompt as token ids")
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return [int(t) for t in tokenizer.encode(prompt)]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    raise APIError(
        400,
        f"prompt must be a non-empty string or list of token ids (one prompt), got {prompt!r}",
        param="prompt",
    )


def create_app(
    model,
    *,
    model_name: str = "archopt",
    api_key: str | None = None,
    **engine_kwargs: Any,
):
    """The ASGI app. ``model``: a loaded ``Llama``, or a no-argument function that loads one
    (run in a background thread at start-up, while /health answers 503)."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    state = ServerState(model, model_name=model_name, engine_kwargs=engine_kwargs, api_key=api_key)

    def engine_or_error() -> Engine:
        if state.engine is None:
            why = state.load_error or "the model is still loading"
            raise APIError(503, f"the server is not ready: {why}")
        return state.engine

    def check_key(request) -> None:
        if state.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:] if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), state.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body must be valid JSON: {e}") from None
        if not isinstance(body, dict):
            got = type(body).__name__
            raise APIError(400, f"the request body must be a JSON object, got {got}")
        model = body.get("model")
        if model is not None and model != state.model_name:
            raise APIError(
                400,
                f"model must be {state.model_name!r} (the one this server runs), got {model!r}",
                param="model",
                code="model_not_found",
            )
        return body

    def handled(fn):
        async def route(request):
            try:
                return await fn(request)
            except APIError as e:
                return _error_response(e)

        return route

    async def health(request):
        if state.engine is not None:
            return JSONResponse({"status": "ok", "model": state.model_name})
        status = "error" if state.load_error else "loading"
        return JSONResponse({"status": status, "error": state.load_error}, status_code=503)

    async def models(request):
        check_key(request)
        card = {"id": state.model_name, "object": "model", "created": state.created}
        return JSONResponse({"object": "list", "data": [{**card, "owned_by": "archopt"}]})

    async def metrics(request):
        m = engine_or_error().metrics()
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(m)
        lines = []
        for k, v in m.items():
            kind = "counter" if k.endswith("_total") else "gauge"
            lines += [f"# TYPE archopt_{k} {kind}", f"archopt_{k} {v}"]
        return PlainTextResponse("\n".join(lines) + "\n")

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def generate(request, *, chat: bool):
        check_key(request)
        body = await read_body(request)
        engine = engine_or_error()
        if chat:
            if "messages" not in body:
                raise APIError(400, "messages is required", param="messages")
            prompt = _chat_prompt(engine.tokenizer, body["messages"])
        else:
            if "prompt" not in body:
                raise APIError(400, "prompt is required", param="prompt")
            prompt = _completion_prompt(engine.tokenizer, body["prompt"])
        if len(prompt) >= engine.capacity:
            raise APIError(
                400,
                f"the prompt has {len(prompt)} tokens, and this model's context holds "
                f"{engine.capacity}: shorten it",
                param="messages" if chat else "prompt",
                code="context_length_exceeded",
            )
        try:
            params = _sampling(body, len(prompt), engine.capacity, None if chat else 16)
            engine.check_prompt(prompt)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        stream = bool(body.get("stream", False))
        options = body.get("stream_options") or {}
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_output(req, delta, done):  # engine thread -> event loop
            loop.call_soon_threadsafe(queue.put_nowait, (delta, done))

        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        req = Request(prompt, params, on_output=on_output, request_id=rid)
        try:
            engine.submit(req)
        except QueueFull as e:
            raise APIError(503, str(e), code="queue_full") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        created = int(time.time())
        head = {"id": rid, "created": created, "model": state.model_name}

        def usage() -> dict:
            n = len(req.output)
            return {"prompt_tokens": len(prompt), "completion_tokens": n,
                    "total_tokens": len(prompt) + n}  # fmt: skip

        if not stream:
            try:
                done = False
                while not done:
                    _, done = await queue.get()
            finally:
                if req.finish_reason is None:
                    engine.abort(rid)
            if req.finish_reason == "error":
                raise APIError(500, f"generation failed: {engine.error}")
            if chat:
                message = {"role": "assistant", "content": req.text}
                choice = {"index": 0, "message": message, "finish_reason": req.finish_reason}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": req.text, "logprobs": None,
                          "finish_reason": req.finish_reason}  # fmt: skip
                obj = "text_completion"
            return JSONResponse({**head, "object": obj, "choices": [choice], "usage": usage()})

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, *, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else {}
                if delta:
                    d["content"] = delta
                choice = {"index": 0, "delta": d, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None,
                          "finish_reason": finish}  # fmt: skip
            data = {**head, "object": obj, "choices": [choice]}
            if include_usage:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                if chat:
                    yield chunk(None, None, role=True)
                while True:
                    delta, done = await queue.get()
                    if delta:
                        yield chunk(delta, None)
                    if done:
                        break
                yield chunk(None, req.finish_reason)
                if include_usage:
                    data = {**head, "object": obj, "choices": [], "usage": usage()}
                    yield f"data: {json.dumps(data)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away mid-stream: its blocks go back now
                if req.finish_reason is None:
                    engine.abort(rid)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    async def on_startup():
        threading.Thread(target=state.load, name="archopt-load", daemon=True).start()

    async def on_shutdown():
        state.stop()

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        await on_startup()
        yield
        await on_shutdown()

    routes = [
        Route("/health", handled(health), methods=["GET"]),
        Route("/metrics", handled(metrics), methods=["GET"]),
        Route("/v1/models", handled(models), methods=["GET"]),
        Route("/v1/completions", handled(completions), methods=["POST"]),
        Route("/v1/chat/completions", handled(chat_completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.archopt = state
    return app


def serve(
    model: str = "smollm2-135m",
    *,
    weights: str = "auto",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    log_level: str = "info",
    **engine_kwargs: Any,
) -> None:
    """Load ``model`` (a name, an HF folder or a GGUF file, through ``load_llm``) and serve it
    until interrupted. Binds to loopback unless ``host`` says otherwise."""
    import uvicorn

    from archopt.loading.llm import check_weights, load_llm, resolve_llm

    check_weights(weights)
    resolve_llm(model)  # a bad name fails here, before the server starts

    def load():
        return load_llm(model, weights=weights)

    name = model if not str(model).endswith((".gguf", "/")) else str(model).rsplit("/", 1)[-1]
    app = create_app(load, model_name=name, api_key=api_key, **engine_kwargs)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
