"""CUDA checks: skipped cleanly on machines without a GPU."""

import pytest
import torch

import archopt
from archopt.measure import measure_latency, measure_peak_memory

from .conftest import randomize_bn

pytestmark = pytest.mark.gpu


def test_mobilenet_on_cuda_matches_cpu():
    model = randomize_bn(archopt.create_model("mobilenet_v1_100")).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        fast = archopt.optimize_for_inference(model.cuda(), x.cuda())
        out = fast(x.cuda()).cpu()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3 * ref.abs().max().item())


def test_cuda_latency_waits_for_the_gpu_and_memory():
    small, big = torch.randn(1024, 1024, device="cuda"), torch.randn(4096, 4096, device="cuda")
    lat_small = measure_latency(lambda a: a @ a, small, repeats=5)
    lat_big = measure_latency(lambda a: a @ a, big, repeats=5)
    assert lat_small.device == lat_big.device == "cuda"
    # 64x the work. A timer that stopped when the kernel was queued, not done, would see two
    # launches of about the same cost.
    assert lat_big.median_ms > 8 * lat_small.median_ms
    x = torch.randn(2048, 2048, device="cuda")
    mem = measure_peak_memory(lambda a: a @ a, x)
    assert mem.method == "cuda" and mem.bytes >= 2048 * 2048 * 4


def _inputs(name: str, model, batch: int = 2):
    """The registry's default input for ``name``: images, or token ids for the sequence models."""
    from archopt.registry import model_info

    info = model_info(name)
    gen = torch.Generator().manual_seed(0)
    if info.task == "image":
        return torch.randn(batch, *info.default_input, generator=gen)
    vocab = model.config.vocab_size
    return torch.randint(0, vocab, (1 if info.task == "encoder" else batch, *info.default_input),
                         generator=gen)  # fmt: skip


def model_on_device_matches_cpu(name: str, device: str, dtype: torch.dtype) -> None:
    """A registered model (random weights) on ``device`` in ``dtype`` against its fp32 CPU
    output: close to the dtype's rounding (TF32 convolutions included for fp32)."""
    from archopt.registry import list_models

    assert name in list_models()
    torch.manual_seed(0)
    model = archopt.create_model(name).eval()
    x = _inputs(name, model)

    def main_output(y):  # the encoder's hidden states; logits otherwise
        return getattr(y, "last_hidden_state", y)

    with torch.no_grad():
        ref = main_output(model(x))
        moved = model.to(device=device, dtype=dtype)
        xd = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
        out = main_output(moved(xd)).float().cpu()
    tol = 5e-3 if dtype == torch.float32 else 5e-2
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref.float(), rtol=0, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", archopt.list_models())
def test_every_registered_model_on_cuda_matches_cpu(name, dtype):
    model_on_device_matches_cpu(name, "cuda", dtype)


@pytest.mark.parametrize("cache", ["dense", "static"])
def test_smollm2_on_cuda_gives_the_cpus_greedy_tokens(cache):
    from archopt.generate import generate
    from archopt.loading.llm import load_llm, smollm2_path

    try:
        smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    cpu = load_llm("smollm2-135m", weights="fp32")
    ids = torch.tensor([cpu.tokenizer.encode("Lionel Messi is a")])
    want = generate(cpu, ids, 32, cache=cache, compile="off", stop=None)
    cuda = load_llm("smollm2-135m", weights="fp32", device="cuda")
    got = generate(cuda, ids.cuda(), 32, cache=cache, compile="off", stop=None)
    assert torch.equal(got.cpu(), want)


def test_optimize_for_inference_on_cuda_defaults():
    """The default call on a CUDA model, with and without an example: a CUDA backend (never
    ONNX Runtime's CPU session), outputs on the GPU and equal to the model's within TF32's
    rounding; onnxruntime asked for by name is a clear error."""
    model = randomize_bn(archopt.create_model("mobilenet_v1_050")).eval().cuda()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x)
        for fast in (
            archopt.optimize_for_inference(model, x),
            archopt.optimize_for_inference(model),
        ):
            out = fast(x)
            assert out.device.type == "cuda"
            torch.testing.assert_close(out, ref, rtol=0, atol=5e-3 * ref.abs().max().item())
    with pytest.raises(ValueError, match="runs on the CPU"):
        archopt.optimize_for_inference(model, x, compile="onnxruntime")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_generate_on_cuda_is_a_graph_with_the_eager_tokens(dtype):
    """generate's default on a GPU records the static-cache step as a CUDA graph: the same
    tokens as the eager static step (the same kernels, replayed), on ragged prompts in a batch,
    and in fp32 the dense cache's tokens too; a second call records its own graph."""
    from archopt.generate import generate, plan_decode

    torch.manual_seed(0)
    model = archopt.create_model("llama-tiny").eval().to(device="cuda", dtype=dtype)
    assert plan_decode(model).how.startswith("cuda graph")
    ids = torch.randint(0, model.config.vocab_size, (3, 11), device="cuda")
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :4] = mask[2, :7] = False  # left padding: 11, 7 and 4 prompt tokens
    with torch.inference_mode():
        run = dict(attention_mask=mask, stop=None)
        graph = generate(model, ids, 40, **run)
        again = generate(model, ids, 40, **run)
        static = generate(model, ids, 40, cache="static", compile="off", **run)
        dense = generate(model, ids, 40, cache="dense", compile="off", **run)
    assert torch.equal(graph, static) and torch.equal(again, graph)
    if dtype == torch.float32:
        assert torch.equal(graph, dense)


def test_generate_command_on_cuda_decodes_through_the_graph(tmp_path, capsys):
    """`archopt generate --device cuda` (a GGUF written here: SmolLM2's does not travel to a
    GPU machine): the model on the GPU, its decode the CUDA graph, every token generated."""
    import json

    from archopt.cli import main

    from .model_files import tiny_gguf, write

    path = write(tmp_path / "tiny.gguf", tiny_gguf())
    argv = ["generate", "--model", str(path), "--weights", "fp32", "--max-new-tokens", "8",
            "--ignore-eos", "--prompt", "hello", "--json"]  # fmt: skip
    assert main([*argv, "--device", "cuda"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"] == "cuda" and r["decode"].startswith("cuda graph")
    assert r["new_tokens"] == 8 and r["decode_tokens_per_s"] > 0
