"""An OpenAI-compatible HTTP server over the engine: starlette for the routes, uvicorn to serve.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (streamed as server-sent
events ending in ``data: [DONE]``, or whole), ``GET /v1/models``, ``GET /health`` (503 while
the model loads, then 200), ``GET /metrics`` (Prometheus text; JSON with
``Accept: application/json``), and vLLM's ``GET /tokenizer_info``, ``POST /tokenize`` and
``POST /detokenize`` (a client may tokenize through the server). Errors are OpenAI's
``{"error": {...}}`` bodies: 400 for a malformed request, 401 for a wrong API key, 503 when
the queue is full or the model is not loaded yet. The engine steps in its own thread; a
stream whose client goes away aborts its request, which frees its blocks at the next step
boundary.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import threading
import time
from typing import Any

from archopt.serve.engine import Engine
from archopt.serve.protocol import (
    APIError,
    check_api_key,
    detokenize,
    error_response,
    parse_body,
    parse_generation,
    tokenize,
    tokenizer_info,
)
from archopt.serve.responses import Answer, metrics_text
from archopt.serve.scheduler import QueueFull, Request

MAX_BODY_BYTES = 8 * 2**20  # a full context of token ids is well under 1 MiB


class Mailbox:
    """Engine thread to event loop: outputs are appended under a lock and handed to their
    streams' queues in one wake-up of the loop, one ``call_soon_threadsafe`` for all that
    arrived before the loop ran, not one per token per stream (each is a write to the loop's
    wake-up pipe and, on a 2-core machine, a thread descheduled beside the engine's)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item) -> None:
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:  # a delivery is already on its way
                return
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


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
        self.on_load_error = None  # called (from the loading thread) when the load fails
        self.mailbox: Mailbox | None = None  # made on the serving loop at the first request

    def load(self) -> None:
        try:
            model = self._load if hasattr(self._load, "config") else self._load()
            self.engine = Engine(model, **self.engine_kwargs)
            self.engine.start()
        except Exception as e:  # reported by /health, and to on_load_error
            self.load_error = f"{type(e).__name__}: {e}"
            if self.on_load_error is not None:
                self.on_load_error()
        finally:
            self.ready.set()

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


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

    check_key_setting(api_key)
    state = ServerState(model, model_name=model_name, engine_kwargs=engine_kwargs, api_key=api_key)

    def engine_or_error() -> Engine:
        if state.engine is None:
            why = state.load_error or "the model is still loading"
            raise APIError(503, f"the server is not ready: {why}")
        return state.engine

    def check_key(request) -> None:
        check_api_key(request.headers.get("authorization", ""), state.api_key)

    async def read_body(request) -> dict:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            msg = f"the request body has {declared} bytes, more than {MAX_BODY_BYTES}"
            raise APIError(413, msg)
        chunks, size = [], 0
        async for part in request.stream():  # read in pieces: memory stays bounded
            size += len(part)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
            chunks.append(part)
        return parse_body(b"".join(chunks), state.model_name)

    def handled(fn):
        async def route(request):
            try:
                return await fn(request)
            except APIError as e:
                return error_response(e)

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

    async def tokenizer_card(request):
        check_key(request)
        return JSONResponse(tokenizer_info(engine_or_error().tokenizer))

    async def tokenize_text(request):
        check_key(request)
        body = await read_body(request)
        engine = engine_or_error()
        return JSONResponse(tokenize(body, engine.tokenizer, engine.capacity))

    async def detokenize_ids(request):
        check_key(request)
        body = await read_body(request)
        engine = engine_or_error()
        vocab = engine.model.config.vocab_size
        return JSONResponse(detokenize(body, engine.tokenizer, vocab))

    async def metrics(request):
        m = engine_or_error().metrics()
        if "application/json" in request.headers.get("accept", ""):
            return JSONResponse(m)
        return PlainTextResponse(metrics_text(m))

    async def completions(request):
        return await generate(request, chat=False)

    async def chat_completions(request):
        return await generate(request, chat=True)

    async def generate(request, *, chat: bool):
        check_key(request)
        body = await read_body(request)
        engine = engine_or_error()
        jobs, echo, stream, include_usage = parse_generation(body, engine, chat=chat)
        if echo and engine.tokenizer is None:
            raise APIError(400, "echo needs the model's tokenizer to write the prompt")
        if state.mailbox is None:
            state.mailbox = Mailbox(asyncio.get_running_loop())
        mailbox, queue = state.mailbox, asyncio.Queue()

        def on_output(index: int):  # engine thread -> event loop: the choice, its new text,
            def put(req, delta, done):  # whether it is done, and its tokens' logprobs so far
                mailbox.put(queue, (index, delta, done, len(req.logprobs)))

            return put

        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        reqs: list[Request] = []  # a prompt's n choices, prompt after prompt
        leaders: list[Request] = []  # each choice's first of its prompt (which scores it)
        total = sum(len(choices) for _, choices in jobs)
        for prompt, choices in jobs:  # a prompt's other choices start from its first one's
            first = None  # prompt, in the prefix cache
            for p in choices:
                i = len(reqs)
                sub = rid if total == 1 else f"{rid}-{i}"
                req = Request(prompt, p, on_output=on_output(i), request_id=sub, after=first)
                first = first or req
                reqs.append(req)
                leaders.append(first)
        try:
            engine.submit_all(reqs)
        except QueueFull as e:
            raise APIError(503, str(e), code="queue_full") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        head = {"id": rid, "created": int(time.time()), "model": state.model_name}
        answer = Answer(head, reqs, leaders, engine.tokenizer, chat=chat, echo=echo,
                        include_usage=include_usage)  # fmt: skip

        def abort_unfinished() -> None:  # the client went away: the blocks go back now
            for r in reqs:
                if r.finish_reason is None:
                    engine.abort(r.request_id)

        if not stream:
            try:
                left = len(reqs)
                while left:
                    left -= (await queue.get())[2]
            finally:
                abort_unfinished()
            if any(r.finish_reason == "error" for r in reqs):
                raise APIError(500, f"generation failed: {engine.error}")
            return JSONResponse(answer.whole())

        async def events():
            try:
                for c in answer.opening():
                    yield c
                left = len(reqs)
                while left:
                    items = [await queue.get()]
                    while not queue.empty():  # the engine ran ahead of this stream: one
                        items.append(queue.get_nowait())  # chunk a choice for what is here
                    merged: dict[int, list] = {}  # choice -> [text, done, logprobs so far]
                    for i, delta, done, upto in items:
                        m = merged.setdefault(i, ["", False, 0])
                        m[0], m[1], m[2] = m[0] + delta, m[1] or done, upto
                    for i, (text, done, upto) in merged.items():
                        for c in answer.chunks(i, text, done, upto):
                            yield c
                        left -= done
                for c in answer.closing():
                    yield c
            finally:
                abort_unfinished()

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
        Route("/tokenizer_info", handled(tokenizer_card), methods=["GET"]),
        Route("/tokenize", handled(tokenize_text), methods=["POST"]),
        Route("/detokenize", handled(detokenize_ids), methods=["POST"]),
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
    until interrupted. Binds to loopback unless ``host`` says otherwise.

    The address is taken before anything loads, so one that cannot be had is a ValueError at
    once; the model loads while the server answers 503, and if it cannot be loaded the
    server stops and the load's error is raised as a ValueError (nothing to serve)."""
    import uvicorn

    from archopt.choices import check_weights
    from archopt.loading.llm import load_llm, resolve_llm

    check_weights(weights)
    resolve_llm(model)  # a bad name fails here, before the server starts
    check_key_setting(api_key)
    sock = listen(host, port)

    def load():
        return load_llm(model, weights=weights)

    name = model if not str(model).endswith((".gguf", "/")) else str(model).rsplit("/", 1)[-1]
    app = create_app(load, model_name=name, api_key=api_key, **engine_kwargs)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level))
    state: ServerState = app.state.archopt
    state.on_load_error = lambda: setattr(server, "should_exit", True)
    bound = sock.getsockname()[1]
    where = f"[{host}]" if ":" in host else host
    print(f"archopt: serving {name} on http://{where}:{bound}/v1 (the model loads first; "
          "GET /health says when it is ready)", file=sys.stderr, flush=True)  # fmt: skip
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.load_error is not None:
        raise ValueError(f"could not load the model {model!r}: {state.load_error}")


def check_key_setting(api_key) -> None:
    """A ValueError unless ``api_key`` is None (no key) or a non-empty string: an empty one (an
    unset variable in ``--api-key "$KEY"``) must not leave the server open."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise ValueError(f"api_key must be a non-empty string, or None for no key, got {api_key!r}")


def listen(host: str, port: int):
    """A listening TCP socket on ``host``:``port`` (0: any free port), or a ValueError that
    names the address and why it cannot be had."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e}") from None
    return sock
