"""The load side of ``archopt bench serve``: server subprocesses on loopback and streams of
OpenAI-compatible requests, timed at the client (time to first token, inter-token latency,
aggregate tokens/s), and the prefix-reuse probe. Every request loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import statistics
import subprocess
import time
from urllib.parse import urlsplit

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a steam engine works.",
    "Describe the history of the city of Rome.",
    "Write a long letter to a friend about a journey by train.",
    "Explain how computers store numbers, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write an essay about the importance of sleep.",
    "Tell the story of a chess tournament.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on loopback; ``up()`` waits for its health check."""

    def __init__(self, name: str, cmd: list[str], port: int, *, health: str, env=None):
        self.name, self.cmd, self.port, self.health = name, cmd, port, health
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.start_s = 0.0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self, timeout: float = 300) -> Server:
        import tempfile

        import httpx

        t0 = time.perf_counter()
        # A file, not a pipe: a pipe nobody reads fills up and stalls a chatty server.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed in down())
        self.proc = subprocess.Popen(
            self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode(errors="replace")[-2000:]
                code = self.proc.returncode
                how = f"exited ({code})"
                if code < 0:
                    how = f"was killed by {signal.Signals(-code).name}"
                raise RuntimeError(f"{self.name} {how} while starting: {err}")
            try:
                if httpx.get(self.base + self.health, timeout=2).status_code == 200:
                    self.start_s = time.perf_counter() - t0
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.down()
        raise RuntimeError(f"{self.name} did not become healthy in {timeout} s")

    def down(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None) is not None:
            self.log.close()
            self.log = None


async def _body(reader, headers: dict):
    """The response body's pieces as they arrive: chunked, sized, or up to the end."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while size := int((await reader.readline()).split(b";")[0].strip() or b"0", 16):
            yield await reader.readexactly(size)
            await reader.readline()
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def stream_one(base: str, body: dict, path: str, out: dict) -> None:
    """One streamed request over a plain asyncio connection; records the send time, each
    text chunk's arrival time, the text and the token count. The client is this lean (no
    HTTP library, every stream on one event loop) because on a 2-core machine its CPU is
    taken from the server it measures: httpx in a thread per stream cost 2.5x the CPU."""
    url = urlsplit(base)
    out["times"], out["text"], out["tokens"] = [], [], None
    out["t0"] = time.perf_counter()
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        payload = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()).strip():
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()
        rest = b""
        async for data in _body(reader, headers):
            rest += data
            if status != 200:
                continue
            *lines, rest = rest.split(b"\n")
            now = time.perf_counter()
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    out["tokens"] = event["usage"].get("completion_tokens")
                for choice in event.get("choices") or []:
                    piece = choice.get("text")
                    if piece is None:
                        piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        out["times"].append(now)
                        out["text"].append(piece)
        if status != 200:
            out["error"] = f"HTTP {status}: {rest[:300]!r}"
    finally:
        writer.close()
    out["t_end"] = time.perf_counter()


def model_id(base: str) -> str:
    import httpx

    return httpx.get(base + "/v1/models", timeout=10).json()["data"][0]["id"]


def run_streams(base: str, bodies: list[dict], path: str, timeout: float = 600) -> dict:
    name = model_id(base)
    bodies = [{**b, "model": name} for b in bodies]
    outs = [{} for _ in bodies]

    async def all_streams():
        streams = (stream_one(base, b, path, o) for b, o in zip(bodies, outs))
        await asyncio.wait_for(asyncio.gather(*streams), timeout)

    try:
        asyncio.run(all_streams())
    except (TimeoutError, asyncio.TimeoutError):  # one exception from Python 3.11
        raise RuntimeError(f"{len(bodies)} streams did not finish in {timeout} s") from None
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(errors[0])
    start = min(o["t0"] for o in outs)
    end = max(o["t_end"] for o in outs)
    tokens = [o["tokens"] if o["tokens"] is not None else len(o["times"]) for o in outs]
    ttft = [(o["times"][0] - o["t0"]) * 1e3 for o in outs if o["times"]]
    itl = [(b - a) * 1e3 for o in outs for a, b in zip(o["times"], o["times"][1:])]
    return {
        "streams": len(bodies),
        "tokens": sum(tokens),
        "seconds": end - start,
        "tokens_per_s": sum(tokens) / (end - start),
        "ttft_p50_ms": _q(ttft, 0.5),
        "ttft_p99_ms": _q(ttft, 0.99),
        "itl_p50_ms": _q(itl, 0.5),
        "itl_p99_ms": _q(itl, 0.99),
        "texts": ["".join(o["text"]) for o in outs],
    }


def _q(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)] if q < 1 else xs[-1]


def completion_bodies(n: int, new_tokens: int, *, eos_id: int, how: str) -> list[dict]:
    """``n`` greedy completions that run ``new_tokens`` tokens (end-of-sequence suppressed in
    the way the server understands: ``ignore_eos``, or a logit bias)."""
    bodies = []
    for i in range(n):
        b = {
            "model": "m",
            "prompt": PROMPTS[i % len(PROMPTS)],
            "max_tokens": new_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if how == "ignore_eos":
            b["ignore_eos"] = True
        else:
            b["logit_bias"] = {str(eos_id): -100}
        bodies.append(b)
    return bodies


def prefix_reuse(base: str, system: str, *, requests: int = 8, how: str, eos_id: int) -> dict:
    """TTFT of ``requests`` chat requests (one at a time) sharing the ``system`` prompt."""
    ttfts = []
    for i in range(requests):
        body = {"model": "m", "max_tokens": 8, "temperature": 0, "stream": True,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]}  # fmt: skip
        if how == "ignore_eos":
            body["ignore_eos"] = True
        r = run_streams(base, [body], "/v1/chat/completions")
        ttfts.append(r["ttft_p50_ms"])
    cold, warm = ttfts[0], statistics.median(ttfts[1:])
    return {"cold_ttft_ms": cold, "cached_ttft_ms": warm, "ratio": warm / cold, "all": ttfts}
