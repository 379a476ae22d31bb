"""Generation: every decode path (caches, compiled steps, batches, sampling, stops) gives the
tokens the uncached loop gives. The caches themselves: test_kv_cache.py."""

import pytest
import torch

from archopt.generate import generate, stream
from archopt.ops.cache_spec import make_cache
from archopt.sampling import greedy, sample

from .tiny_llama import rand_ids, sharp_tiny_llama


@pytest.fixture(scope="module")
def model():
    return sharp_tiny_llama()


@pytest.mark.parametrize("cache", ["dense", "static"])
def test_cache_tokens_equal_lecture_loop(model, cache):
    ids = rand_ids(1, 9)
    ref = generate(model, ids, 40, cache="none")
    assert torch.equal(generate(model, ids, 40, cache=cache), ref)


def test_left_padded_batch_equals_each_row_alone(model):
    prompts = [rand_ids(1, n, seed=n)[0].tolist() for n in (3, 11, 1, 7)]
    for cache in ("none", "dense", "static"):
        batch = generate(model, prompts, 25, cache=cache)
        assert batch.shape == (4, 11 + 25)
        for i, p in enumerate(prompts):
            alone = generate(model, p, 25, cache=cache)
            assert torch.equal(batch[i, -25:], alone[0, -25:]), (cache, i)
            assert torch.equal(batch[i, 11 - len(p) : 11], torch.tensor(p))


def test_sampling(model):
    ids = rand_ids(1, 5)
    greedy = generate(model, ids, 12)
    assert torch.equal(generate(model, ids, 12, temperature=0.7, top_k=1, seed=3), greedy)
    assert torch.equal(generate(model, ids, 12, temperature=1.0, top_p=1e-6, seed=3), greedy)
    a = generate(model, ids, 12, temperature=1.5, seed=7)
    assert torch.equal(generate(model, ids, 12, temperature=1.5, seed=7), a)
    assert not torch.equal(a, greedy)  # 12 draws at temperature 1.5 on a 512-token vocab


@pytest.mark.parametrize("shape", [(1, 7), (4, 49152), (3, 1)])
def test_greedy_is_argmax_with_ties_nan_and_inf(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    logits = torch.randint(0, 3, shape, generator=gen).float()  # many ties
    if shape[0] > 2:
        logits[1, shape[1] // 2] = float("nan")
        logits[2] = float("-inf")
    assert torch.equal(greedy(logits), logits.argmax(dim=-1))


def test_sample_respects_top_k_and_top_p():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample(logits, temperature=1.0, top_k=2, generator=gen).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086, ...
    got = sample(logits, temperature=1.0, top_p=0.8, generator=gen)
    assert set(got.tolist()) == {0, 1}  # 0.636 < 0.8 needs the second token, not the third
    share = (got == 0).float().mean().item()
    assert abs(share - probs[0] / (probs[0] + probs[1])) < 0.03


def test_stop_tokens_end_rows(model):
    ids = rand_ids(2, 6)
    ref = generate(model, ids, 20)
    stop = int(ref[0, 6 + 4])  # row 0's fifth new token
    steps = list(stream(model, ids, 20, stop=stop))
    row0 = torch.stack(steps)[:, 0]
    first = int((row0 == stop).nonzero()[0])
    assert model.config.pad_token_id is None  # so the pad id is 0
    assert (row0[first + 1 :] == 0).all()
    if stop not in ref[1, 6:].tolist():
        assert len(steps) == 20  # row 1 never stops, so the run goes on


def test_bad_input(model):
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\), got 600"):
        model(torch.tensor([[1, 600]]))
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 2], []], 3)
    with pytest.raises(ValueError, match="input_ids is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[1, 2, 3]]), 3, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="unknown cache spec 'radix': expected one of"):
        generate(model, [1, 2], 3, cache="radix")
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        generate(model, [1, 2], 0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 1.5"):
        generate(model, [1, 2], 3, temperature=1.0, top_p=1.5)
    with pytest.raises(ValueError, match="cache capacity must be >= 1"):
        make_cache("static", num_layers=1, batch=1, kv_heads=1, head_dim=8, capacity=0)
    # neither truncated nor passed on to torch to fail there
    with pytest.raises(ValueError, match=r"integer token ids, got a torch\.float32 tensor"):
        generate(model, torch.tensor([[1.5, 2.0]]), 3)
    with pytest.raises(ValueError, match=r"input_ids must be integer token ids, got 1\.5"):
        generate(model, [[1, 2], [1.5]], 3)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"):
        generate(model, [1, 2], 3, temperature=1.0, seed=2**80)
    with pytest.raises(ValueError, match=r"stop must be token ids, 'eos' or None, got 3\.5"):
        generate(model, [1, 2], 3, stop=3.5)
    with pytest.raises(ValueError, match=r"a torch\.compile backend name .* got 'fast'"):
        generate(model, [1, 2], 3, cache="static", compile="fast")


def test_text_generation_needs_a_tokenizer(model):
    from archopt.generate import stream_text

    with pytest.raises(ValueError, match="needs a tokenizer, and this model has none"):
        next(stream_text(model, "hello", 3))


def test_compiled_decode_step_never_recompiles(model):
    from torch._dynamo.utils import counters

    ids = rand_ids(2, 7)
    ref = generate(model, ids, 30, cache="static")
    counters.clear()
    # The "eager" backend traces exactly what inductor would compile, without the C++ build.
    assert torch.equal(generate(model, ids, 30, cache="static", compile="eager"), ref)
    assert counters["stats"]["unique_graphs"] == 1  # 29 one-token steps, one graph
    assert not counters["recompiles"]
    assert torch.equal(generate(model, ids, 30, cache="static", compile="eager"), ref)
    assert counters["stats"]["unique_graphs"] == 1  # a new run reuses it too
    with pytest.raises(ValueError, match="compile='aot' needs cache='static'"):
        generate(model, ids, 3, cache="dense", compile=True)


def test_compiled_runs_of_different_lengths_share_a_graph(model):
    from torch._dynamo.utils import counters

    counters.clear()
    for n_prompt, n_new in [(5, 10), (9, 30), (3, 50)]:  # all within one 256-slot cache
        ids = rand_ids(1, n_prompt)
        ref = generate(model, ids, n_new, cache="static")
        assert torch.equal(generate(model, ids, n_new, cache="static", compile="eager"), ref)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": -1.0}, "temperature must be >= 0, got -1.0"),
        ({"top_k": 0}, "top_k must be an integer >= 1, got 0"),
        ({"top_p": float("nan")}, "top_p must be in"),
        ({"stop": "sometimes"}, "stop must be token ids, 'eos' or None"),
        ({"compile": 2.5}, "compile must be True, False, one of"),
        ({"compile": "cuda-graph"}, "compile='cuda-graph' runs on a CUDA GPU, got a model on cpu"),
        ({"compile": "cuda-graph", "cache": "dense"}, "needs cache='static'"),
    ],
)
def test_generate_checks_its_arguments(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate(model, rand_ids(1, 3), 4, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        generate(model, rand_ids(1, 3), 4.0)


def test_perplexity_scores_one_sequence(model):
    from archopt.perplexity import perplexity

    ids = rand_ids(2, 20)
    with pytest.raises(ValueError, match=r"ids must be \(length,\) or \(1, length\), got shape"):
        perplexity(model, ids)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1, got 0"):
        perplexity(model, ids[0], chunk=0)
    assert perplexity(model, ids[0]) == perplexity(model, ids[:1])


def test_gpu_decode_benchmark_dry_run(capsys):
    """The GPU decoding benchmark's plumbing on the CPU: every contender timed, every one with
    the dense cache's tokens."""
    from archopt.bench.decode_gpu import main

    assert main(["--dry-run", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("| dtype | contender") :].splitlines()
    rows = [line for line in table if line.startswith("| fp32")]
    assert len(rows) == 5  # dense, no cache, static, default, HF
    assert all(row.rstrip(" |").endswith("same") for row in rows), rows
