"""Continuous batching (the engine) and the OpenAI-compatible server.

The engine runs a random-weight llama-tiny with a byte tokenizer; the server is started
in-process on a free loopback port and spoken to with the official ``openai`` client, plus raw
HTTP for the error cases. Every test checks that no block is left referenced.
"""

import contextlib
import json
import random
import socket
import threading
import time

import pytest
import torch

from archopt.generate import generate
from archopt.registry import create_model
from archopt.serve import Engine, QueueFull, Request, SamplingParams

EOS = 256


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255; 256 is end-of-sequence."""

    eos_token_id = EOS
    chat_template = "role: content lines"

    def encode(self, text, add_special_tokens=True):
        return list(text.encode())

    def decode(self, ids, skip_special_tokens=False):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.encode(text)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = create_model("llama-tiny", eos_token_id=EOS).eval()
    model.tokenizer = ByteTokenizer()
    return model


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def assert_no_leaks(engine: Engine) -> None:
    s = engine.cache.stats()
    assert s["blocks_used"] == 0 and s["sequences"] == 0, s
    assert not engine.scheduler.running and not engine.scheduler.waiting


def alone(model, prompt, n):
    return generate(model, [prompt], n, cache="dense")[0, len(prompt) :].tolist()


def test_greedy_batched_equals_alone_with_mixed_sampling_and_shared_prefixes(tiny):
    shared = list(range(60, 100))
    prompts = [[*shared, 1, 2], list(range(3, 40)), [*shared, 5], [7], shared + list(range(9))]
    want = [alone(tiny, p, 12) for p in prompts]
    engine = Engine(tiny, max_batch=4, block_size=4, prefill_chunk=24)
    sampled = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=3)
    params = [GREEDY, sampled, GREEDY, GREEDY, sampled]
    reqs = engine.generate(prompts, params)
    for r, w in zip(reqs, want):
        if r.params.temperature == 0:
            assert r.output == w
    assert engine.scheduler.cached_tokens > 0  # the later shared prompts hit the cache
    assert_no_leaks(engine)
    # A seeded sampled request gives the same tokens alone as in the batch.
    again = Engine(tiny, max_batch=4, block_size=4).generate([prompts[1]], sampled)[0]
    assert again.output == reqs[1].output


def test_chunked_prefill_lets_decodes_run_while_a_long_prompt_is_read(tiny):
    engine = Engine(tiny, max_batch=4, block_size=4, prefill_chunk=8)
    short = engine.submit(Request([5, 6, 7], SamplingParams(max_tokens=30, temperature=0)))
    engine.step()
    long = engine.submit(Request(list(range(100, 180)), GREEDY))
    before = len(short.output)
    for _ in range(5):  # 80 prompt tokens in chunks of 8: the short one decodes meanwhile
        engine.step()
    assert len(short.output) == before + 5 and long.output == []
    while engine.scheduler.has_work():
        engine.step()
    assert long.output == alone(tiny, list(range(100, 180)), 12)
    assert_no_leaks(engine)


def test_a_full_pool_preempts_and_recomputes_without_corruption(tiny):
    prompts = [list(range(1, 30)), list(range(5, 12)), list(range(40, 57)), [9, 8, 7]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = [alone(tiny, p, 20) for p in prompts]
    engine = Engine(tiny, max_batch=4, block_size=4, num_blocks=14, max_blocks=14)
    reqs = engine.generate(prompts, params)
    assert engine.scheduler.preemptions > 0
    assert [r.output for r in reqs] == want
    assert_no_leaks(engine)


def test_stops_end_requests_and_are_not_returned(tiny):
    engine = Engine(tiny, max_batch=2, block_size=4)
    prompt = list(b"hello there")
    free = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0]
    assert free.finish_reason == "length" and len(free.output) == 12
    # stop at the 5th generated token (as a token id), and at a string seen in the output
    by_token = SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[free.output[4]])
    r = engine.generate([prompt], by_token)[0]
    first = free.output.index(free.output[4])
    assert r.finish_reason == "stop" and r.output == free.output[: first + 1]
    text = free.text
    if len(text) >= 4:
        stop = text[2:4]
        r = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0, stop=[stop]))
        assert r[0].finish_reason == "stop" and r[0].text == text[: text.find(stop)]
    assert_no_leaks(engine)


@torch.inference_mode()
def next_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's logits for the token after ``ids``, by a full forward without a cache."""
    return model(torch.tensor([ids]))[0, -1].float()


def test_logprobs_are_the_models_own_and_list_its_top_tokens(tiny):
    engine = Engine(tiny, max_batch=4, block_size=4, compile="off")
    prompt = list(b"logprobs, please")
    greedy_k5 = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5)
    hot = SamplingParams(max_tokens=6, temperature=1.5, seed=1, ignore_eos=True, logprobs=0,
                         frequency_penalty=1.0)  # fmt: skip
    plain, sampled, biased = engine.generate(
        [prompt, prompt, prompt],
        [greedy_k5, hot, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)],
    )
    assert biased.logprobs == []  # asked for none, given none
    for req, k in ((plain, 5), (sampled, 0)):
        assert [t for t, _, _ in req.logprobs] == req.output
        for i, (token, lp, top) in enumerate(req.logprobs):
            # the model's distribution, before temperature and penalties
            want = torch.log_softmax(next_logits(tiny, prompt + req.output[:i]), -1)
            assert lp == pytest.approx(float(want[token]), abs=1e-4)
            assert [t for t, _ in top] == want.topk(k).indices.tolist()
            assert [v for _, v in top] == pytest.approx(want.topk(k).values.tolist(), abs=1e-4)
            if req is plain:  # greedy: the chosen token is the most likely
                assert top[0][0] == token
    assert_no_leaks(engine)


@torch.inference_mode()
def prompt_logprobs_by_hand(model, prompt: list[int]) -> torch.Tensor:
    """Row i: the log-probabilities of the token after prompt[: i + 1], one full forward."""
    return torch.log_softmax(model(torch.tensor([prompt]))[0].float(), -1)


def check_prompt_logprobs(req, want: torch.Tensor, k: int, partial: bool = False) -> None:
    assert len(req.prompt_logprobs) == len(req.prompt) - 1 or partial
    for i, (token, lp, top) in enumerate(req.prompt_logprobs):
        assert token == req.prompt[i + 1]
        assert lp == pytest.approx(float(want[i, token]), abs=1e-4)
        assert [t for t, _ in top] == want[i].topk(k).indices.tolist()


@pytest.mark.parametrize("compiled", [False, True])
def test_prompt_logprobs_score_every_prompt_token(tiny, compiled, request):
    """A prompt scored token by token (what ``echo`` with ``logprobs`` returns), read in
    chunks, whole even when its blocks are in the prefix cache; ``max_tokens`` 0 scores and
    generates nothing."""
    prompt = list(range(50, 80))
    want = prompt_logprobs_by_hand(tiny, prompt)
    step = request.getfixturevalue("tiny_step")[0] if compiled else "off"
    engine = Engine(tiny, max_batch=4, block_size=4, prefill_chunk=7, compile=step)
    engine.generate([prompt], GREEDY)  # its blocks now in the prefix cache
    score = SamplingParams(max_tokens=0, prompt_logprobs=2)
    both = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=0)
    scored, generated = engine.generate([prompt, prompt], [score, both])
    check_prompt_logprobs(scored, want, 2)
    check_prompt_logprobs(generated, want, 0)
    assert scored.output == [] and scored.finish_reason == "length"
    assert generated.output == alone(tiny, prompt, 3) and generated.cached == 0
    assert_no_leaks(engine)


def test_logit_bias_and_penalties_follow_openais_formula(tiny):
    """Greedy tokens under a bias and penalties, against the formula by hand:
    logit[j] + bias[j] - count[j] * frequency - (count[j] > 0) * presence, output tokens only."""

    def by_hand(prompt, n, bias=None, presence=0.0, frequency=0.0):
        out = []
        for _ in range(n):
            logits = next_logits(tiny, prompt + out).double()
            for t, b in (bias or {}).items():
                logits[t] += b
            for t in set(out):
                logits[t] -= frequency * out.count(t) + presence
            out.append(int(logits.argmax()))
        return out

    prompt = list(b"the same again and again")
    plain = by_hand(prompt, 12)
    cases = [
        {"logit_bias": {7: 100.0}},  # every token is 7
        {"logit_bias": {plain[0]: -100.0, plain[1]: 5.0}},
        {"frequency_penalty": 2.0},
        {"presence_penalty": 1.5, "frequency_penalty": -0.5},
        {"presence_penalty": -2.0, "logit_bias": {plain[2]: 3.0}},
    ]
    engine = Engine(tiny, max_batch=8, block_size=4, compile="off")
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **c) for c in cases]
    reqs = engine.generate([prompt] * (len(cases) + 1), [*params, GREEDY])  # one batch
    assert reqs[0].output == [7] * 10
    for req, c in zip(reqs, cases):
        want = by_hand(prompt, 10, c.get("logit_bias"), c.get("presence_penalty", 0.0),
                       c.get("frequency_penalty", 0.0))  # fmt: skip
        assert req.output == want, c
    assert reqs[-1].output == plain  # the plain request beside them is untouched
    assert all(r.output != plain[:10] for r in reqs[:-1])  # every setting changed something
    assert_no_leaks(engine)


def test_the_other_choices_wait_for_the_firsts_prompt_and_share_its_blocks(tiny):
    """A request's n choices: the others are admitted once the first has read the prompt, find
    its full blocks in the prefix cache, and sample as requests of their own would."""
    prompt = list(range(100, 141))  # 41 tokens: 10 full blocks of 4
    params = [SamplingParams(max_tokens=8, temperature=1.0, seed=9 + i) for i in range(4)]
    engine = Engine(tiny, max_batch=8, block_size=4, prefill_chunk=8, compile="off")
    reqs = [Request(prompt, params[0])]
    reqs += [Request(prompt, p, after=reqs[0]) for p in params[1:]]
    engine.submit_all(reqs)
    engine.step()  # the first reads 8 prompt tokens; the others wait
    assert [r.status for r in reqs] == ["running", "waiting", "waiting", "waiting"]
    while engine.scheduler.has_work():
        engine.step()
    assert reqs[0].cached == 0 and all(r.cached == 40 for r in reqs[1:])
    for req, p in zip(reqs, params):
        alone_req = Engine(tiny, block_size=4, compile="off").generate([prompt], p)[0]
        assert req.output == alone_req.output
    assert len({tuple(r.output) for r in reqs}) > 1
    assert_no_leaks(engine)
    small = Engine(tiny, max_queue=3, compile="off")
    small.submit(Request([1], GREEDY))
    with pytest.raises(QueueFull):  # all or none
        small.submit_all([Request([1], GREEDY) for _ in range(3)])
    assert len(small._inbox) == 1
    with pytest.raises(ValueError, match="4 requests at once are more than this server's queue"):
        small.submit_all([Request([1], GREEDY) for _ in range(4)])


def test_bounded_queue_and_bad_prompts(tiny):
    engine = Engine(tiny, max_batch=1, max_queue=2)
    engine.submit(Request([1], GREEDY))
    engine.submit(Request([2], GREEDY))
    with pytest.raises(QueueFull):
        engine.submit(Request([3], GREEDY))
    with pytest.raises(ValueError, match="context holds 1024"):
        engine.submit(Request([1] * 1024, GREEDY))
    with pytest.raises(ValueError, match=r"max_tokens must be an integer >= 1 \(0 only to score"):
        SamplingParams(max_tokens=0)
    for kwargs, message in (
        ({"stop": 5}, "stop must be non-empty strings, got 5"),
        ({"stop_token_ids": "a"}, "stop_token_ids must be a list of integers"),
        ({"seed": 2**80, "temperature": 1.0}, r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    ):
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)
    for rid in list(engine._by_id):
        engine.abort(rid)
    engine.step()
    assert_no_leaks(engine)


def check_pool(cache) -> None:
    """The pool's bookkeeping agrees with the block tables: each block's reference count is the
    number of table entries that hold it, and every block is referenced, cached or free, once."""
    a = cache.allocator
    held = [0] * a.num_blocks
    for seq in cache.seqs.values():
        for b in seq.blocks:
            held[b] += 1
    assert a.refs == held
    cached, free = set(a._cached), set(a._free)
    assert len(free) == len(a._free) and not cached & free
    assert all(a.refs[b] == 0 for b in cached | free)
    assert sum(r > 0 for r in a.refs) + len(cached) + len(free) == a.num_blocks
    assert {d: b for b, d in a.digest_of.items()} == a.block_of
    assert cached <= set(a.digest_of)


@pytest.mark.parametrize(
    ("seed", "compiled"), [(s, False) for s in range(12)] + [(s, True) for s in range(12, 16)]
)
def test_random_schedules_keep_greedy_requests_exact_and_the_pool_whole(
    tiny, seed, compiled, request
):
    """Requests arrive, are aborted and stop at random steps, in a pool small enough to evict
    cached prefixes and preempt running requests; prompts share prefixes of random lengths,
    and some come again in whole blocks (all cached: the last token runs again, into a copy of
    its block). Every greedy request gives the tokens it gives alone (an aborted one a prefix of
    them), a seeded sampled one the tokens of the same request alone in a fresh engine, and
    after every step the pool's reference counts match the block tables. The last seeds step
    through the compiled paged step (decodes and prompt rows in one call)."""
    rng = random.Random(seed)

    def unstopped(prompt, n):  # greedy alone, end-of-sequence ignored
        return generate(tiny, [prompt], n, cache="dense", stop=None)[0, len(prompt) :].tolist()

    block = rng.choice([2, 3, 4, 8])
    longest = 48 + 32  # the longest prompt plus the most new tokens
    blocks = -(-longest // block) + rng.randrange(0, 3)  # one long request must fit
    engine = Engine(
        tiny,
        max_batch=rng.choice([1, 3, 4, 8]),
        block_size=block,
        num_blocks=blocks,
        max_blocks=blocks,
        prefill_chunk=rng.choice([1, 5, 16, 64]),
        compile=request.getfixturevalue("tiny_step")[0] if compiled else "off",
    )
    stems = [[rng.randrange(256) for _ in range(rng.randrange(1, 33))] for _ in range(3)]
    subs = []  # (request, kind)
    aborted: set[str] = set()
    for step in range(2000):
        if len(subs) < 14 and rng.random() < 0.6:
            stem = rng.choice(stems)[: rng.randrange(0, 33)]
            prompt = (stem + [rng.randrange(256) for _ in range(rng.randrange(0, 16))])[:48]
            prompt = prompt or [rng.randrange(256)]
            if subs and rng.random() < 0.25:  # a prompt again, in whole blocks: all cached
                again = rng.choice(subs)[0].prompt
                prompt = list(again[: len(again) // block * block] or again)
            n = rng.randrange(1, 33)
            kind = rng.choice(["greedy", "greedy", "stop", "sampled", "scored"])
            if kind == "scored":  # its prompt's log-probabilities, and maybe nothing more
                n = rng.randrange(0, 3)
                params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True,
                                        prompt_logprobs=1)  # fmt: skip
            elif kind == "sampled":
                params = SamplingParams(max_tokens=n, temperature=0.8, top_p=0.9, seed=step)
            elif kind == "stop":  # at a token of its own greedy output (or end-of-sequence)
                stop = rng.choice(unstopped(prompt, n))
                params = SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[stop])
            else:
                params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
            subs.append((engine.submit(Request(prompt, params, request_id=f"r{len(subs)}")), kind))
        live = [r for r, _ in subs if r.finish_reason is None]
        if live and rng.random() < 0.02:
            victim = rng.choice(live)
            engine.abort(victim.request_id)
            aborted.add(victim.request_id)
        engine.step()
        check_pool(engine.cache)
        if len(subs) == 14 and all(r.finish_reason is not None for r, _ in subs):
            break
    else:
        pytest.fail("the requests did not finish in 2000 steps")
    assert_no_leaks(engine)
    for req, kind in subs:
        p = req.params
        if req.request_id in aborted and req.finish_reason == "abort":
            if kind == "scored":  # the prompt's log-probabilities it got, in order
                check_prompt_logprobs(req, prompt_logprobs_by_hand(tiny, req.prompt), 1, True)
            if kind != "sampled" and p.max_tokens:
                assert req.output == unstopped(req.prompt, p.max_tokens)[: len(req.output)]
            continue
        if kind == "sampled":
            again = Engine(tiny, block_size=block, compile="off").generate([req.prompt], p)[0]
            assert req.output == again.output
            continue
        if kind == "scored":
            check_prompt_logprobs(req, prompt_logprobs_by_hand(tiny, req.prompt), 1)
            if not p.max_tokens:
                assert req.output == []
                continue
        want = unstopped(req.prompt, p.max_tokens)
        if kind == "stop":  # up to its stop token or end-of-sequence, whichever comes first
            ends = [i for i, t in enumerate(want) if t in (*p.stop_token_ids, EOS)]
            want = want[: ends[0] + 1] if ends else want
        assert req.output == want, (req.request_id, kind)


# -- the HTTP server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny):
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from archopt.serve.app import create_app

    gate = threading.Event()

    def load():  # /health says 503 until the test lets loading finish
        gate.wait(30)
        return tiny

    app = create_app(load, model_name="tiny", api_key="sk-test", max_batch=4, block_size=4)
    with running(app) as base:
        yield {"base": base, "gate": gate, "app": app}


@contextlib.contextmanager
def running(app):
    """``app`` served by uvicorn in a thread on a free loopback port; its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


def test_serve_says_at_once_when_its_address_cannot_be_had():
    from archopt.serve.app import listen, serve

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"cannot listen on 127\.0\.0\.1:{port}: .*in use"):
            listen("127.0.0.1", port)
    with pytest.raises(ValueError, match=r"cannot listen on 999\.1\.1\.1:8000: "):
        serve("smollm2-135m", host="999.1.1.1", port=8000)  # before any model loads
    for key in ("", "  "):  # an unset variable in --api-key "$KEY" must not open the server
        with pytest.raises(ValueError, match="api_key must be a non-empty string"):
            serve("smollm2-135m", api_key=key, port=0)
    sock = listen("127.0.0.1", 0)  # 0: any free port, on loopback
    assert sock.getsockname()[0] == "127.0.0.1" and sock.getsockname()[1] > 0
    sock.close()


def test_serve_stops_with_the_error_when_the_model_cannot_load(tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("starlette")
    from archopt.serve.app import serve

    bad = tmp_path / "bad.gguf"  # the right magic, then nonsense counts
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 16)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"could not load the model .*bad\.gguf.*not a valid GGUF"):
        serve(str(bad), port=0, log_level="warning")
    assert time.perf_counter() - t0 < 30  # stopped by itself, not left serving 503s


@pytest.fixture(scope="module")
def ready(server):
    import httpx

    assert httpx.get(server["base"] + "/health").status_code == 503  # still loading
    server["gate"].set()
    deadline = time.time() + 30
    while httpx.get(server["base"] + "/health").status_code != 200:
        assert time.time() < deadline
        time.sleep(0.02)
    return server


@pytest.fixture
def client(ready):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=ready["base"] + "/v1", api_key="sk-test", max_retries=0)


def engine_of(server) -> Engine:
    return server["app"].state.archopt.engine


def wait_no_leaks(server) -> None:
    engine = engine_of(server)
    deadline = time.time() + 10
    while engine.cache.stats()["blocks_used"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.cache.stats()["blocks_used"] == 0


MSG = [{"role": "user", "content": "Say something."}]


def test_chat_whole_and_streamed_agree_and_follow_the_protocol(client, ready):
    whole = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=10,
                                           temperature=0)  # fmt: skip
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens <= 10 and whole.choices[0].finish_reason
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is [c for c in chunks if c.choices][-1]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    wait_no_leaks(ready)


def test_completions_whole_and_streamed(client, ready):
    import httpx

    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.usage.prompt_tokens == 3
    body = {"model": "tiny", "prompt": "abc", "max_tokens": 6, "temperature": 0, "stream": True}
    headers = {"Authorization": "Bearer sk-test"}
    r = httpx.post(ready["base"] + "/v1/completions", json=body, headers=headers)
    lines = [x for x in r.text.split("\n\n") if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    events = [json.loads(x[6:]) for x in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(e["choices"][0]["text"] for e in events) == whole.choices[0].text
    assert [m.id for m in client.models.list()] == ["tiny"]
    wait_no_leaks(ready)


def test_logprobs_over_http_whole_and_streamed_agree(client, ready):
    """Chat's ``logprobs``/``top_logprobs`` and a completion's ``logprobs`` through the
    official client: one entry a token, alternatives most likely first (the greedy token
    among them, first), a stream's pieces adding up to the whole response's, and a bias
    that the tokens obey."""
    kw = {"model": "tiny", "max_tokens": 8, "temperature": 0}
    whole = client.chat.completions.create(messages=MSG, logprobs=True, top_logprobs=3, **kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    for entry in content:
        values = [t.logprob for t in entry.top_logprobs]
        assert len(values) == 3 and values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == values[0] <= 0
        assert bytes(entry.bytes).decode(errors="replace") == entry.token or entry.token.startswith(
            "bytes:"
        )
    stream = client.chat.completions.create(
        messages=MSG, logprobs=True, top_logprobs=3, stream=True, **kw
    )
    pieces = [e for c in stream if c.choices and c.choices[0].logprobs
              for e in c.choices[0].logprobs.content]  # fmt: skip
    # the same tokens; values to rounding (the second run reads the prompt from the prefix cache)
    assert [e.token for e in pieces] == [e.token for e in content]
    assert [e.logprob for e in pieces] == pytest.approx([e.logprob for e in content], abs=1e-5)
    plain = client.chat.completions.create(messages=MSG, **kw)
    assert plain.choices[0].logprobs is None

    comp = client.completions.create(prompt="abc", logprobs=2, **kw)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == comp.usage.completion_tokens
    for i, (tok, top) in enumerate(zip(lp.tokens, lp.top_logprobs)):
        assert tok in top and top[tok] == lp.token_logprobs[i] == max(top.values())
        if i:
            assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
    chunks = list(client.completions.create(prompt="abc", logprobs=2, stream=True, **kw))
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [
        o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset
    ]
    assert streamed == lp.tokens and offsets == lp.text_offset

    biased = client.completions.create(prompt="abc", logit_bias={"120": 100}, **kw)
    assert biased.choices[0].text == "x" * 8
    wait_no_leaks(ready)


def test_n_choices_over_http_whole_and_streamed(client, ready):
    """n choices: indexed 0..n-1, choice i the request with n = 1 and seed + i, each streamed
    under its index with its own role chunk and finish reason; usage counts them all."""
    kw = {"model": "tiny", "messages": MSG, "max_tokens": 6, "temperature": 1.0, "seed": 5}
    whole = client.chat.completions.create(n=3, **kw)
    texts = [c.message.content for c in whole.choices]
    assert [c.index for c in whole.choices] == [0, 1, 2]
    for i in range(3):
        one = client.chat.completions.create(**{**kw, "seed": 5 + i})
        assert one.choices[0].message.content == texts[i]
    assert whole.usage.completion_tokens == sum(
        client.chat.completions.create(**{**kw, "seed": 5 + i}).usage.completion_tokens
        for i in range(3)
    )
    streamed, roles, finishes = ["", "", ""], [0, 0, 0], [0, 0, 0]
    for c in client.chat.completions.create(n=3, stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] += ch.delta.content or ""
            roles[ch.index] += ch.delta.role == "assistant"
            finishes[ch.index] += ch.finish_reason is not None
    assert streamed == texts and roles == [1, 1, 1] and finishes == [1, 1, 1]
    same = client.completions.create(model="tiny", prompt="abc", max_tokens=5, temperature=0, n=2)
    assert same.choices[0].text == same.choices[1].text  # greedy choices agree
    wait_no_leaks(ready)


def test_echo_returns_the_prompt_scored_token_by_token(client, ready, tiny):
    """``echo`` with ``logprobs``: the prompt's text before the completion's, its tokens with
    their log-probabilities (the first one none), as a full forward gives them; max_tokens 0
    scores the prompt alone (what evaluation harnesses ask for); streamed, the prompt comes
    first, the same."""
    prompt = "The quick brown fox"
    ids = list(prompt.encode())
    want = prompt_logprobs_by_hand(tiny, ids)
    kw = {"model": "tiny", "prompt": prompt, "temperature": 0, "echo": True, "logprobs": 1}
    scored = client.completions.create(max_tokens=0, **kw)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert lp.tokens == list(prompt) and lp.text_offset == list(range(len(prompt)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(
        [float(want[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4
    )
    more = client.completions.create(max_tokens=4, **kw)
    plain = client.completions.create(**{**kw, "echo": False, "max_tokens": 4})
    assert more.choices[0].text == prompt + plain.choices[0].text
    lp2 = more.choices[0].logprobs
    assert lp2.tokens == lp.tokens + plain.choices[0].logprobs.tokens
    assert lp2.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:] + plain.choices[0].logprobs.token_logprobs, abs=1e-4
    )
    assert lp2.text_offset[len(prompt)] == len(prompt)
    chunks = list(client.completions.create(max_tokens=4, stream=True, **kw))
    assert chunks[0].choices[0].text == prompt
    assert "".join(c.choices[0].text for c in chunks) == more.choices[0].text
    streamed = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    assert streamed == lp2.tokens
    echoed = client.completions.create(**{**kw, "logprobs": None, "max_tokens": 4, "n": 2})
    assert [c.text for c in echoed.choices] == [prompt + plain.choices[0].text] * 2
    assert all(c.logprobs is None for c in echoed.choices)
    wait_no_leaks(ready)


def test_loglikelihood_requests_as_evaluation_harnesses_send_them(ready, tiny):
    """lm-evaluation-harness's ``local-completions`` asks for a continuation's log-likelihood
    with a batch of token-id prompts (context + continuation), ``echo``, ``logprobs: 1`` and
    ``max_tokens: 1``, and sums ``token_logprobs[ctxlen:-1]``; greedy when each is its top."""
    import httpx

    contexts = [list(b"The sky is"), list(b"One two")]
    continuations = [list(b" blue"), list(b" three")]
    prompts = [c + x for c, x in zip(contexts, continuations)]
    body = {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}  # fmt: skip
    r = httpx.post(ready["base"] + "/v1/completions", json=body,
                   headers={"Authorization": "Bearer sk-test"})  # fmt: skip
    out = sorted(r.json()["choices"], key=lambda c: c["index"])
    for choice, ctx, cont in zip(out, contexts, continuations):
        lps = choice["logprobs"]["token_logprobs"][len(ctx) : -1]
        tops = choice["logprobs"]["top_logprobs"][len(ctx) : -1]
        want = prompt_logprobs_by_hand(tiny, ctx + cont)
        by_hand = [float(want[len(ctx) - 1 + j, t]) for j, t in enumerate(cont)]
        assert sum(lps) == pytest.approx(sum(by_hand), abs=1e-3)
        greedy = all(lp == max(top.values()) for lp, top in zip(lps, tops))
        rows = range(len(ctx) - 1, len(ctx) - 1 + len(cont))
        assert greedy == all(int(want[i].argmax()) == t for i, t in zip(rows, cont))
    wait_no_leaks(ready)


def test_tokenizer_endpoints_as_a_remote_tokenizer_uses_them(ready):
    """vLLM's /tokenizer_info, /tokenize and /detokenize, as lm-evaluation-harness's remote
    tokenizer calls them (behind the API key), and their bad input."""
    import httpx

    base, auth = ready["base"], {"Authorization": "Bearer sk-test"}
    info = httpx.get(base + "/tokenizer_info", headers=auth).json()
    assert "eos_token" in info and info["chat_template"] == "role: content lines"
    r = httpx.post(base + "/tokenize", json={"prompt": "hé", "add_special_tokens": False},
                   headers=auth).json()  # fmt: skip
    assert r["tokens"] == list("hé".encode()) and r["count"] == 3 and r["max_model_len"] == 1024
    chat = httpx.post(base + "/tokenize", json={"messages": MSG}, headers=auth).json()
    assert chat["tokens"] == list(b"user: Say something.\nassistant:")
    back = httpx.post(base + "/detokenize", json={"tokens": r["tokens"]}, headers=auth).json()
    assert back == {"prompt": "hé"}
    for path, body, needle in [
        ("/tokenize", {"prompt": 5}, "prompt must be a string"),
        ("/tokenize", {"prompt": "a", "add_special_tokens": "no"}, "add_special_tokens must"),
        ("/detokenize", {"tokens": [1, 512]}, "token ids in [0, 512)"),
        ("/detokenize", {"tokens": "abc"}, "tokens must be a list"),
    ]:
        bad = httpx.post(base + path, json=body, headers=auth)
        assert bad.status_code == 400 and needle in bad.json()["error"]["message"]
    assert httpx.get(base + "/tokenizer_info").status_code == 401


def test_a_batch_of_prompts_gives_each_its_choices_in_order(client, ready):
    kw = {"model": "tiny", "max_tokens": 5, "temperature": 0}
    prompts = ["abc", [104, 105, 106, 107]]
    whole = client.completions.create(prompt=prompts, n=2, **kw)
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert [c.text for c in whole.choices] == [a.choices[0].text for a in alone for _ in range(2)]
    assert whole.usage.prompt_tokens == 3 + 4
    assert whole.usage.completion_tokens == 2 * sum(a.usage.completion_tokens for a in alone)
    streamed = ["", "", "", ""]
    for c in client.completions.create(prompt=prompts, n=2, stream=True, **kw):
        for ch in c.choices:
            streamed[ch.index] += ch.text
    assert streamed == [c.text for c in whole.choices]
    wait_no_leaks(ready)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "valid JSON"),
        ({"model": "tiny"}, 400, "messages is required"),
        ({"model": "tiny", "messages": MSG, "max_tokens": 0}, 400, "max_tokens must be"),
        ({"model": "gpt-9", "messages": MSG}, 400, "model must be 'tiny'"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 1100}]}, 400,
         "context holds 1024"),
        ({"model": "tiny", "messages": "hi"}, 400, "non-empty list"),
        # what the server does not implement is refused, never ignored
        ({"model": "tiny", "messages": MSG, "tools": [{"type": "function"}]}, 400,
         "tools is not supported"),
        ({"model": "tiny", "prompt": "a", "suffix": "b"}, 400, "suffix is not supported"),
        ({"model": "tiny", "prompt": "a", "echo": 1}, 400, "echo must be true or false"),
        ({"model": "tiny", "messages": MSG, "echo": True}, 400, "echo is for completions"),
        ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400,
         "max_tokens must be an integer >= 1"),
        # the sampling parameters' ranges
        ({"model": "tiny", "messages": MSG, "logprobs": 3}, 400, "logprobs must be true or false"),
        ({"model": "tiny", "messages": MSG, "top_logprobs": 2}, 400, "needs logprobs: true"),
        ({"model": "tiny", "messages": MSG, "logprobs": True, "top_logprobs": 21}, 400,
         "top_logprobs must be an integer >= 0 and <= 20"),
        ({"model": "tiny", "prompt": "a", "logprobs": True}, 400, "how many alternatives"),
        ({"model": "tiny", "prompt": "a", "top_logprobs": 2}, 400, "for chat completions"),
        ({"model": "tiny", "messages": MSG, "presence_penalty": 2.5}, 400,
         "presence_penalty must be a number >= -2 and <= 2"),
        ({"model": "tiny", "messages": MSG, "frequency_penalty": "1"}, 400,
         "frequency_penalty must be a number"),
        ({"model": "tiny", "messages": MSG, "logit_bias": {"x": 1}}, 400, "logit_bias must map"),
        ({"model": "tiny", "messages": MSG, "logit_bias": {"3": 101}}, 400, "logit_bias must map"),
        ({"model": "tiny", "messages": MSG, "logit_bias": [3]}, 400, "logit_bias must map"),
        ({"model": "tiny", "messages": MSG, "n": 0}, 400, "n must be an integer >= 1 and <= 128"),
        ({"model": "tiny", "prompt": []}, 400, "prompt must be a non-empty string"),
        ({"model": "tiny", "prompt": ["a", 3]}, 400, "prompt must be a non-empty string"),
        ({"model": "tiny", "prompt": [["a"]]}, 400, "or a list of them, got [['a']]"),
        ({"model": "tiny", "prompt": ["a", ""]}, 400, "prompt must be a non-empty string"),
        ({"model": "tiny", "prompt": ["a", "b", "c"], "n": 128, "max_tokens": 1}, 400,
         "384 requests at once are more than this server's queue holds (256)"),
        ({"model": "tiny", "messages": MSG, "n": 129}, 400, "n must be an integer >= 1"),
        ({"model": "tiny", "messages": MSG, "logit_bias": {"99999": 1}}, 400,
         "logit_bias: token ids must be in [0, 512), got 99999"),
        ({"model": "tiny", "messages": MSG, "response_format": {"type": "json_object"}}, 400,
         "response_format must be"),
        ({"model": "tiny", "messages": MSG, "stream": "yes"}, 400, "stream must be true or false"),
        ({"model": "tiny", "messages": MSG, "stream_options": "yes"}, 400,
         "stream_options must be an object"),
        ({"model": "tiny", "messages": MSG, "seed": 2**80}, 400, "seed must be an integer"),
        (b'{"model": "tiny", "messages": "' + b"x" * (9 * 2**20) + b'"}', 413,
         "more than 8388608"),
    ],
)  # fmt: skip
def test_malformed_requests_get_openai_errors(ready, body, status, needle):
    import httpx

    headers = {"Authorization": "Bearer sk-test"}
    completion = isinstance(body, dict) and "prompt" in body
    url = ready["base"] + ("/v1/completions" if completion else "/v1/chat/completions")
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers=headers)
    else:
        r = httpx.post(url, json=body, headers=headers)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_parameters_at_their_unused_values_are_accepted(client):
    # what an OpenAI client may send by default: zero penalties, no logprobs, an empty bias
    r = client.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=2, temperature=0, presence_penalty=0.0,
        frequency_penalty=0, logprobs=False, logit_bias={}, response_format={"type": "text"},
    )  # fmt: skip
    assert r.choices[0].finish_reason in ("stop", "length")


def test_wrong_api_key_is_401(ready):
    import httpx

    r = httpx.post(ready["base"] + "/v1/chat/completions", json={"messages": MSG},
                   headers={"Authorization": "Bearer nope"})  # fmt: skip
    assert r.status_code == 401 and "error" in r.json()
    assert httpx.get(ready["base"] + "/v1/models").status_code == 401


@pytest.mark.parametrize("n", [1, 3])
def test_client_gone_mid_stream_frees_its_blocks(ready, n):
    """A client that goes away mid-stream: every choice of its request stops, its blocks go
    back."""
    import httpx

    body = {"model": "tiny", "messages": MSG, "max_tokens": 900, "stream": True,
            "temperature": 0, "ignore_eos": True, "n": n}  # fmt: skip
    headers = {"Authorization": "Bearer sk-test"}
    engine = engine_of(ready)
    before = engine.metrics()["generated_tokens_total"]
    with httpx.stream("POST", ready["base"] + "/v1/chat/completions", json=body,
                      headers=headers) as r:  # fmt: skip
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6 * n)]
        assert got[0].startswith("data: ") and engine.cache.stats()["blocks_used"] > 0
    wait_no_leaks(ready)
    assert engine.metrics()["generated_tokens_total"] - before < 900  # aborted, not finished
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_metrics_report_the_pool_and_the_queue(ready):
    import httpx

    text = httpx.get(ready["base"] + "/metrics").text
    for name in ("queue_length", "running_sequences", "blocks_used", "blocks_cached",
                 "tokens_per_second"):  # fmt: skip
        assert f"archopt_{name} " in text
    m = httpx.get(ready["base"] + "/metrics", headers={"Accept": "application/json"}).json()
    assert m["blocks_used"] == 0


def test_smollm2_gguf_greedy_batched_equals_alone():
    """The GGUF's own blocks run with bf16 activations, where any change in the order of a sum
    flips near ties; the engine's batch plans keep every request's sums as they are alone."""
    from archopt.loading.llm import load_llm, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = load_llm("smollm2-135m")
    texts = ["Write a long story about a lighthouse keeper.", "Describe the history of Rome.",
             "Explain in detail how a steam engine works, step by step."]  # fmt: skip
    prompts = [model.tokenizer.encode(t) for t in texts]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    alone_ = [Engine(model).generate([p], params)[0].output for p in prompts]
    engine = Engine(model, max_batch=4)
    assert [r.output for r in engine.generate(prompts, params)] == alone_
    assert_no_leaks(engine)


@pytest.mark.slow
@pytest.mark.parametrize("compile", ["off", "aot"])
def test_smollm2_gguf_eight_streams_of_128_tokens_equal_each_alone(compile):
    """The benchmark's load: 8 streams of 128 greedy tokens (a padded batch drifted from
    token 83 here, before attention went row by row), eager and through the compiled step."""
    from archopt.bench.serve_load import PROMPTS
    from archopt.loading.llm import load_llm, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = load_llm("smollm2-135m")
    prompts = [model.tokenizer.encode(t) for t in PROMPTS[:8]]
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True)
    alone_ = [Engine(model, compile=compile).generate([p], params)[0].output for p in prompts]
    engine = Engine(model, max_batch=8, compile=compile)
    assert [r.output for r in engine.generate(prompts, params)] == alone_
    assert (engine.compiled is not None) == (compile == "aot")
    assert_no_leaks(engine)


@pytest.mark.slow
def test_smollm2_gguf_speculating_gives_the_tokens_of_one_step_at_a_time():
    """The benchmark's prompts alone through the compiled step, with and without drafts: the
    int8-activation kernels give a verified row the bits of a one-row step."""
    from archopt.bench.serve_load import PROMPTS
    from archopt.loading.llm import load_llm, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = load_llm("smollm2-135m")
    params = SamplingParams(max_tokens=128, temperature=0, ignore_eos=True, logprobs=1)
    plain, spec = Engine(model, compile="aot", speculate=0), Engine(model, compile="aot")
    for text in PROMPTS[:8]:
        prompt = model.tokenizer.encode(text)
        a, b = plain.generate([prompt], params)[0], spec.generate([prompt], params)[0]
        assert (b.output, b.logprobs) == (a.output, a.logprobs)
    assert spec.accepted > 0 and plain.drafted == 0
    assert_no_leaks(spec)


# -- decode batches through the compiled paged step -------------------------------------------


@pytest.fixture(scope="module")
def tiny_step(tiny, tmp_path_factory):
    """The paged step of ``tiny``, built once in a cache folder of its own (so the eager tests
    above never meet it)."""
    import os

    from archopt import decode_step as ds

    root = tmp_path_factory.mktemp("paged-step-cache")
    old = os.environ["ARCHOPT_CACHE"]
    os.environ["ARCHOPT_CACHE"] = str(root)
    try:
        return ds.compile_step(tiny, kind="paged"), root  # ~20 s on 2 cores
    finally:
        os.environ["ARCHOPT_CACHE"] = old


def test_compiled_decode_gives_each_request_its_tokens_alone(tiny, tiny_step):
    step, _ = tiny_step
    shared = list(range(60, 100))
    prompts = [[*shared, 1, 2], list(range(3, 40)), [*shared, 5], [7], shared + list(range(9))]
    want = [
        Engine(tiny, block_size=4, compile=step).generate([p], GREEDY)[0].output for p in prompts
    ]
    engine = Engine(tiny, max_batch=4, block_size=4, num_blocks=4, prefill_chunk=24, compile=step)
    reqs = engine.generate(prompts, GREEDY)
    assert [r.output for r in reqs] == want
    m = engine.metrics()
    assert m["compiled_decode"] == 1 and m["blocks_in_pool"] > 4  # the pool grew under it
    assert engine.scheduler.cached_tokens > 0
    assert_no_leaks(engine)


def test_compiled_steps_read_prompts_and_recompute_preempted_requests_as_eager_ones(
    tiny, tiny_step
):
    """Prompts in chunks of 8 through the compiled step (a token a row), beside decoding rows,
    in a pool so small that requests are preempted and their prompt and output read again:
    the tokens of the eager dense model alone."""
    step, _ = tiny_step
    prompts = [list(range(1, 30)), list(range(5, 12)), list(range(40, 57)), [9, 8, 7]]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    want = [alone(tiny, p, 20) for p in prompts]
    engine = Engine(
        tiny, max_batch=4, block_size=4, num_blocks=14, max_blocks=14, prefill_chunk=8,
        compile=step,
    )  # fmt: skip
    reqs = engine.generate(prompts, params)
    assert engine.scheduler.preemptions > 0 and engine.metrics()["compiled_decode"] == 1
    assert [r.output for r in reqs] == want
    assert_no_leaks(engine)


def test_a_step_of_more_rows_than_one_call_takes_is_cut_and_gives_the_eager_tokens(tiny, tiny_step):
    """A 300-token prompt in one chunk beside a decoding request: more rows than one call of
    the compiled step takes (256), so the step is cut in two calls, the prompt across them."""
    from archopt.step_graphs import MAX_BATCH

    step, _ = tiny_step
    prompts = [[3, 1, 4, 1, 5], [(7 * i) % 256 for i in range(MAX_BATCH + 44)]]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [alone(tiny, p, 8) for p in prompts]
    engine = Engine(tiny, max_batch=2, block_size=4, prefill_chunk=512, compile=step)
    calls = []

    def counted(tokens, *args):
        calls.append(tokens.shape[0])
        return step(tokens, *args)

    engine.compiled = counted
    first = engine.submit(Request(prompts[0], params))
    engine.step()  # the short one is decoding when the long one arrives
    second = engine.submit(Request(prompts[1], params))
    while engine.scheduler.has_work():
        engine.step()
    assert [first.output, second.output] == want
    assert calls[1:3] == [MAX_BATCH, 45]  # one decoding row and 300 prompt rows, in two calls
    assert_no_leaks(engine)


class Oracle:
    """Drafts from the request's known greedy continuation ``want``, each output position in
    ``wrong`` replaced by another token (the model overrules it there)."""

    def __init__(self, prompt, want, wrong=()):
        self.prompt, self.want, self.wrong = prompt, want, set(wrong)

    def propose(self, tokens, k):
        done = len(tokens) - len(self.prompt)
        run = self.want[done : done + k]
        return [(t + 1) % 256 if done + j in self.wrong else t for j, t in enumerate(run)]


@pytest.mark.parametrize("wrong", [(), (3, 9, 10), tuple(range(0, 20, 2)), tuple(range(20))])
def test_drafts_verified_in_the_compiled_step_give_the_tokens_one_step_at_a_time(
    tiny, tiny_step, wrong
):
    """Drafts right, wrong here and there, every other one and all wrong: the request's
    tokens are its greedy tokens alone, each right draft saves a step, and after every step
    the pool's counts match the block tables (rejected drafts' blocks given back)."""
    step, _ = tiny_step
    prompt = [(5 * i) % 256 for i in range(13)]
    want = alone(tiny, prompt, 20)
    engine = Engine(tiny, block_size=4, compile=step, speculate=4)
    req = Request(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    req.drafter = Oracle(prompt, want, wrong)
    engine.submit(req)
    steps = 0
    while req.finish_reason is None:
        engine.step()
        check_pool(engine.cache)
        steps += 1
    assert req.output == want
    # By hand: from the first output token on (the prompt's step), each step runs up to 4
    # drafts (within max_tokens) and keeps them up to the first wrong one.
    done, drafted, kept, decode_steps = 1, 0, 0, 0
    while done < 20:
        run = req.drafter.propose(prompt + want[:done], min(4, 20 - done - 1))
        a = next((j for j, t in enumerate(run) if t != want[done + j]), len(run))
        drafted, kept, done, decode_steps = (
            drafted + len(run),
            kept + a,
            done + 1 + a,
            decode_steps + 1,
        )
    assert (engine.drafted, engine.accepted, steps) == (drafted, kept, 1 + decode_steps)
    if not wrong:  # 20 tokens in 5 steps: the prompt's, then 5 + 5 + 5 + 4
        assert steps == 5
    if len(wrong) == 20:  # no draft kept: a step a token
        assert steps == 20 and kept == 0
    assert engine.metrics()["spec_accepted_tokens_total"] == kept
    assert_no_leaks(engine)


def test_a_speculating_request_stops_logs_and_ends_as_it_does_without_drafts(tiny, tiny_step):
    """A stop token inside a step's kept drafts ends the request there; max_tokens is met
    exactly; log-probabilities come from each verified row: all as with no drafts (the
    values to rounding)."""
    step, _ = tiny_step
    prompt = [(11 * i) % 256 for i in range(9)]
    want = alone(tiny, prompt, 24)
    cases = [
        SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[want[6]]),
        SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3),
    ]
    for params in cases:
        plain = Engine(tiny, block_size=4, compile=step, speculate=0).generate([prompt], params)
        engine = Engine(tiny, block_size=4, compile=step, speculate=4)
        req = Request(prompt, params)
        req.drafter = Oracle(prompt, want)
        engine.submit(req)
        while req.finish_reason is None:
            engine.step()
        assert engine.accepted > 0
        assert (req.output, req.finish_reason) == (plain[0].output, plain[0].finish_reason)
        # torch's fp32 matmul may sum a row of a 5-row call in another order than alone
        # (the last bit; archopt's int8-activation kernels do not): the same tokens, values
        # equal to rounding.
        got, ref = req.logprobs, plain[0].logprobs
        assert [(t, [x for x, _ in top]) for t, _, top in got] == [
            (t, [x for x, _ in top]) for t, _, top in ref
        ]
        flat = [[v, *(y for _, y in top)] for _, v, top in got]
        want_ = [[v, *(y for _, y in top)] for _, v, top in ref]
        torch.testing.assert_close(torch.tensor(flat), torch.tensor(want_), rtol=1e-6, atol=1e-5)
        assert_no_leaks(engine)


def test_drafts_stop_at_the_end_of_the_context(tiny, tiny_step):
    """A request that runs into the end of the model's context while its drafts are all
    right: drafts never reach past the context, and it ends at it ("length"), with the
    tokens it gets without drafts."""
    step, _ = tiny_step
    capacity = tiny.config.max_position_embeddings
    prompt = [(3 * i) % 256 for i in range(capacity - 12)]
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    plain = Engine(tiny, block_size=4, compile=step, speculate=0).generate([prompt], params)[0]
    assert plain.finish_reason == "length" and len(prompt) + len(plain.output) == capacity
    engine = Engine(tiny, block_size=4, compile=step, speculate=4)
    req = Request(prompt, params)
    req.drafter = Oracle(prompt, plain.output)
    engine.submit(req)
    while req.finish_reason is None:
        engine.step()
        check_pool(engine.cache)
    assert (req.output, req.finish_reason) == (plain.output, "length")
    assert engine.accepted > 0
    assert_no_leaks(engine)


def test_drafts_from_the_requests_own_tokens_only_while_the_batch_is_small(tiny, tiny_step):
    """The n-gram drafter on prompts that repeat themselves: the greedy tokens alone, drafts
    run while one request decodes (``speculate_batch=1``), none while two do, and none in an
    eager engine (drafts are verified by the compiled step)."""
    step, _ = tiny_step
    prompts = [[1, 2, 3, 4, 5, 6] * 6, [7, 8, 9] * 9]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    want = [alone(tiny, p, 24) for p in prompts]
    one = Engine(tiny, block_size=4, compile=step)  # the defaults: speculate, batch of 1
    assert [one.generate([p], params)[0].output for p in prompts] == want
    assert one.drafted > 0
    both = Engine(tiny, block_size=4, compile=step, speculate_batch=1)
    assert [r.output for r in both.generate(prompts, params)] == want
    assert both.drafted == 0 or both.steps > 24  # drafts only once one of them has finished
    wide = Engine(tiny, block_size=4, compile=step, speculate_batch=2)
    assert [r.output for r in wide.generate(prompts, params)] == want
    assert wide.drafted > 0
    eager = Engine(tiny, block_size=4, compile="off", speculate=4)
    assert [eager.generate([p], params)[0].output for p in prompts] == want
    assert eager.drafted == 0
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError, match="speculate must be an int >= 0"):
            Engine(tiny, compile="off", speculate=bad)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_kv_cache_halves_the_pool_and_decodes_through_its_own_step(
    tiny, tiny_step, dtype, tmp_path, monkeypatch
):
    """``kv_cache_dtype``: the pool holds half the bytes; eager, batched requests give their
    tokens alone; the compiled step of that kind (built here) gives the eager engine's tokens
    over the same rounded cache; a step of another kind is refused; after every step the
    pool is whole."""
    from archopt import decode_step as ds

    step32, _ = tiny_step
    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path))
    prompts = [[*range(60, 100), 1, 2], list(range(3, 30)), [7], [(9 * i) % 256 for i in range(50)]]
    eager = Engine(tiny, block_size=4, compile="off", kv_cache_dtype=dtype)
    full = Engine(tiny, block_size=4, compile="off")
    assert eager.cache.keys.dtype == getattr(torch, dtype)
    assert 2 * eager.cache.nbytes == full.cache.nbytes
    want = [eager.generate([p], GREEDY)[0].output for p in prompts]
    batched = Engine(tiny, max_batch=4, block_size=4, compile="off", kv_cache_dtype=dtype)
    assert [r.output for r in batched.generate(prompts, GREEDY)] == want
    step = ds.compile_step(tiny, kind=f"paged-{dtype}")  # ~20 s on 2 cores
    assert step.kind == f"paged-{dtype}"
    engine = Engine(tiny, max_batch=4, block_size=4, compile=step, kv_cache_dtype=dtype)
    reqs = [engine.submit(Request(p, GREEDY)) for p in prompts]
    while any(r.finish_reason is None for r in reqs):
        engine.step()
        check_pool(engine.cache)
    assert [r.output for r in reqs] == want
    assert engine.compile_how == "aot (given)"
    assert_no_leaks(engine)
    again = Engine(tiny, compile="auto", kv_cache_dtype=dtype)  # found in the cache folder
    assert again.compile_how == "aot (compiled step from cache)"
    with pytest.raises(ValueError, match=f"needs a 'paged-{dtype}' one"):
        Engine(tiny, compile=step32, kv_cache_dtype=dtype)
    with pytest.raises(ValueError, match="needs a 'paged' one"):
        Engine(tiny, compile=step)


def test_bad_kv_cache_dtypes_are_sentences(tiny):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32"):
        Engine(tiny, compile="off", kv_cache_dtype="fp8")
    half_model = create_model("llama-tiny").to(torch.bfloat16)
    with pytest.raises(ValueError, match="needs a model computing in float32, got one in bf"):
        Engine(half_model, compile="off", kv_cache_dtype="float16")
    assert Engine(half_model, compile="off").cache.keys.dtype == torch.bfloat16


def test_auto_takes_the_cached_step_or_switches_when_its_build_ends(tiny, tiny_step, monkeypatch):
    import shutil
    import subprocess
    import sys

    from archopt import background_build as bb
    from archopt import decode_step as ds
    from archopt.serve import compiled_step

    _, root = tiny_step
    monkeypatch.setenv("ARCHOPT_CACHE", str(root))
    assert Engine(tiny, compile="auto").compile_how == "aot (compiled step from cache)"
    assert Engine(tiny, compile="off").compiled is None
    # Now a build in flight elsewhere: eager until it ends, then the step, in the same engine.
    folder = ds.step_folder(tiny, "paged")
    built = folder.with_name(folder.name + "-built")
    folder.rename(built)
    builder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])

    def start_build(model, kind="static"):
        folder.mkdir()
        (folder / bb.LOCK_FILE).write_text(str(builder.pid))
        return folder

    monkeypatch.setattr(bb, "can_build_in_background", lambda model: True)
    monkeypatch.setattr(bb, "build_in_background", start_build)
    monkeypatch.setattr(compiled_step, "POLL_BUILD_S", 0.0)
    threads = torch.get_num_threads()
    try:
        engine = Engine(tiny, block_size=4)
        assert engine.compile_how.startswith("eager until")
        engine.generate([[1, 2, 3]], GREEDY)
        assert engine.compiled is None
        assert torch.get_num_threads() == 1  # beside a build, one thread
        shutil.copytree(built, folder, dirs_exist_ok=True)  # the build lands, its lock goes
        (folder / bb.LOCK_FILE).unlink()
        engine.generate([[4, 5, 6]], GREEDY)
        assert engine.compiled is not None
        assert engine.compile_how == "aot (built in the background)"
        # its process goes on (building what auto loads next time): still one thread
        assert torch.get_num_threads() == 1
        builder.kill()  # not waited for: the engine reaps it (a zombie answers signals)
        time.sleep(0.2)
        engine.generate([[7, 8, 9]], GREEDY)
        assert torch.get_num_threads() == threads  # and all of them once it has ended
        assert_no_leaks(engine)
    finally:
        builder.kill()
        builder.wait()
        torch.set_num_threads(threads)


def test_bad_compile_mode_is_a_sentence(tiny):
    with pytest.raises(ValueError, match="compile must be one of auto, aot, off"):
        Engine(tiny, compile="fast")


def _full_and_incremental(tokenizer, ids):
    from archopt.serve.detokenize import IncrementalText

    inc = IncrementalText(tokenizer)
    for i in range(1, len(ids) + 1):
        full = tokenizer.decode(ids[:i], skip_special_tokens=True)
        got = inc.add(ids[:i])
        assert full.startswith(got), (i, full, got)
        if not full.endswith("\ufffd"):  # a character still coming: held back until complete
            assert got == full, (i, full, got)
    assert inc.flush(ids) == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_detokenization_equals_decoding_the_whole_output():
    """Bytes of multi-byte characters split across tokens, invalid bytes, an output ending
    mid-character: at every token the text so far is the whole decode (complete characters),
    and flushing gives the whole decode exactly."""
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 🙂 end"
    ids = tok.encode(text)
    _full_and_incremental(tok, ids)
    _full_and_incremental(tok, [*ids[:-2], 0xFF, 0x41, *ids[:7]])  # a stray byte, then more
    _full_and_incremental(tok, tok.encode("🙂")[:3])  # ends mid-character: flushed as U+FFFD


def test_incremental_detokenization_on_smollm2s_tokenizer():
    from archopt.loading.llm import load_llm

    tok = load_llm("smollm2-135m", weights="fp32", tokenizer=True).tokenizer
    gen = torch.Generator().manual_seed(0)
    ids = tok.encode("Zürich, 東京 and Αθήνα 🙂 — a test of “quotes”.", add_special_tokens=False)
    _full_and_incremental(tok, ids)
    rand = torch.randint(0, 49152, (300,), generator=gen).tolist()  # special tokens included
    _full_and_incremental(tok, rand)


def test_token_bytes_add_up_to_the_text():
    """Each token's own bytes (what log-probabilities report): SmolLM2's byte-level entries
    joined give the text's UTF-8, characters split across tokens included; SentencePiece's
    byte tokens and word pieces by their own rules."""
    from archopt.loading.llm import load_llm
    from archopt.serve.detokenize import token_bytes

    tok = load_llm("smollm2-135m", weights="fp32", tokenizer=True).tokenizer
    text = "Zürich, 東京 and Αθήνα 🙂 — a test of “quotes”."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [token_bytes(tok, i) for i in ids]
    assert b"".join(pieces) == text.encode() and any(len(p) == 1 and p[0] > 127 for p in pieces)

    class Pieces:  # a SentencePiece vocabulary: a word piece, a byte token, a plain word
        vocab = ("\u2581caf\u00e9", "<0xE2>", "tea")

        def convert_ids_to_tokens(self, ids):
            return [self.vocab[i] for i in ids]

    assert [token_bytes(Pieces(), i) for i in range(3)] == [" café".encode(), b"\xe2", b"tea"]


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start():
    from archopt.serve.detokenize import cut_at_stop, sendable

    assert cut_at_stop("hello END world END", ["END"], 0) == ("hello ", True)
    assert cut_at_stop("abcXYz", ["Z", "XY"], 0) == ("abc", True)  # the earliest of them
    assert cut_at_stop("no stop here", ["END"], 0) == ("no stop here", False)
    assert cut_at_stop("text", [], 4) == ("text", False)
    # what was sent is searched again only as far back as a stop string could reach
    assert cut_at_stop("aEND" + "x" * 10 + "END", ["END"], 10) == ("aEND" + "x" * 10, True)
    assert sendable("hello EN", ["END"], 0, done=False) == "hello "  # "EN" may start "END"
    assert sendable("hello EN", ["END"], 0, done=True) == "hello EN"
    assert sendable("caf\ufffd", [], 0, done=False) == "caf"  # an incomplete character waits
    assert sendable("hello", [], 5, done=False) == ""


def test_a_stream_behind_the_engine_gets_what_is_waiting_in_one_chunk(monkeypatch):
    """While the event loop is held up (here: its first content chunk takes 0.3 s), the engine
    runs ahead; the stream then sends what arrived in one chunk, not one per token, and the
    text is the same. (SmolLM2: a tokenizer whose tokens are text one by one.)"""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    import archopt.serve.app as app_module
    from archopt.loading.llm import load_llm, smollm2_path
    from archopt.serve import responses

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = load_llm("smollm2-135m")
    app = app_module.create_app(lambda: model, model_name="m", compile="off")
    with running(app) as base:
        deadline = time.time() + 60
        while httpx.get(base + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
        body = {"model": "m", "prompt": "Lionel Messi is a", "max_tokens": 24, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip

        def pieces() -> list[str]:
            r = httpx.post(base + "/v1/completions", json=body, timeout=60)
            lines = [x for x in r.text.split("\n\n") if x and x != "data: [DONE]"]
            events = [json.loads(x[6:]) for x in lines]
            return [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]]

        keeping_up = pieces()
        original, slow = responses.chunk, []

        def held_up(head, delta, finish, **kw):
            if delta and not slow:
                slow.append(time.sleep(0.3))  # blocks the event loop, as a busy one would be
            return original(head, delta, finish, **kw)

        monkeypatch.setattr(responses, "chunk", held_up)
        behind = pieces()
        assert len(keeping_up) >= 12  # text token by token when the loop keeps up
        assert "".join(behind) == "".join(keeping_up)
        assert len(behind) < len(keeping_up)


def test_the_benchmarks_load_client_reads_streams_and_errors(tiny):
    """``archopt bench serve``'s client (plain asyncio, chunked server-sent events): each
    stream's tokens and text as the server sent them whole, and an error status as an error."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from archopt.bench.serve_load import completion_bodies, run_streams
    from archopt.serve.app import create_app

    app = create_app(tiny, model_name="tiny", max_batch=4, block_size=4, compile="off")
    with running(app) as base:
        deadline = time.time() + 30
        while httpx.get(base + "/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        bodies = completion_bodies(3, 9, eos_id=0, how="ignore_eos")
        r = run_streams(base, bodies, "/v1/completions")
        assert r["streams"] == 3 and r["tokens"] == 27 and r["tokens_per_s"] > 0
        for body, text in zip(bodies, r["texts"]):
            plain = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
            whole = httpx.post(base + "/v1/completions", json={**plain, "model": "tiny"}).json()
            assert text == whole["choices"][0]["text"] and text
        with pytest.raises(RuntimeError, match=r"HTTP 400: .*max_tokens must be"):
            run_streams(base, [{**bodies[0], "max_tokens": 0}], "/v1/completions")
        wait_no_leaks({"app": app})


def test_a_server_that_dies_while_starting_is_named_with_its_signal():
    """``archopt bench serve`` runs anchors as subprocesses; one that crashes (an illegal
    instruction in a binary built for another CPU) is an error naming the signal."""
    pytest.importorskip("httpx")
    import sys

    from archopt.bench.serve_load import Server, free_port

    crash = "import os, signal; print('starting'); os.kill(os.getpid(), signal.SIGILL)"
    srv = Server("anchor", [sys.executable, "-c", crash], free_port(), health="/health")
    with pytest.raises(RuntimeError, match=r"anchor was killed by SIGILL while starting: starting"):
        srv.up(timeout=30)
    srv.down()
    assert srv.proc is None


def test_the_mailbox_delivers_every_output_in_order_in_fewer_wake_ups():
    import asyncio

    from archopt.serve.app import Mailbox

    async def main():
        loop = asyncio.get_running_loop()
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: wakeups.append(1) or real(*a)
        box, queues = Mailbox(loop), [asyncio.Queue(), asyncio.Queue()]

        def engine():  # bursts, as a step emits one output per stream
            for i in range(300):
                for q in queues:
                    box.put(q, i)
                if i % 50 == 0:
                    time.sleep(0.005)

        thread = threading.Thread(target=engine)
        thread.start()
        got = [[await q.get() for _ in range(300)] for q in queues]
        thread.join()
        return got, len(wakeups)

    got, wakeups = asyncio.run(main())
    assert got == [list(range(300))] * 2
    assert 1 <= wakeups < 600  # never one per output across a burst


def test_the_benchmark_times_its_paired_anchor_just_before_each_run(monkeypatch):
    """``archopt bench serve`` times generate again right before each run of the default
    server (the host's speed drifts within minutes), and reports each run against it."""
    from types import SimpleNamespace

    from archopt.bench import serve as bench

    events = []

    class FakeServer:
        name, base, start_s = "archopt serve", "http://127.0.0.1:1", 0.5

        def up(self):
            events.append("up")
            return self

        def down(self):
            events.append("down")

    def streams(base, bodies, path):
        events.append(f"run {len(bodies)}")
        times = dict.fromkeys(("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"), 1.0)
        return {"streams": len(bodies), "tokens_per_s": 100.0 * len(bodies), **times}

    monkeypatch.setattr(bench, "run_streams", streams)
    monkeypatch.setattr(bench, "prefix_reuse", lambda *a, **k: {"ratio": 0.1})
    timings = iter([50.0, 40.0])

    def paired():
        events.append("generate")
        return next(timings)

    args = SimpleNamespace(streams=[1, 4], new_tokens=8, prefix_tokens=16)
    server = FakeServer()
    report = {"prefix": {}}
    runs = bench.serve_runs(args, "archopt serve", lambda n: server, "ignore_eos", 2, "sys",
                            report, lambda msg: None, paired)  # fmt: skip
    assert events == ["up", "run 1", "generate", "run 1", "generate", "run 4", "down"]
    assert [r["generate_just_before"] for r in runs] == [50.0, 40.0]
    text = bench.format_report({"machine": "m", "servers": {"archopt serve": runs},
                                "single_stream": {}})  # fmt: skip
    assert "4 streams / generate timed just before (40.0 tokens/s): 10.00x" in text
