import json

import pytest
import torch

import archopt
from archopt.optimize import InputAdapter, choose_backend

from .conftest import randomize_bn


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    return randomize_bn(archopt.create_model("mobilenet_v1_050", num_classes=10)).eval()


def close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("channels_last", [True, False, None])
def test_eager_modes(mobilenet, channels_last):
    x = torch.randn(2, 3, 160, 160)
    fast = archopt.optimize_for_inference(mobilenet, x, channels_last=channels_last, compile=None)
    if channels_last is not None:
        assert isinstance(fast, InputAdapter) == channels_last
    y = torch.randn(3, 3, 96, 128)  # eager modes are not specialised to the example's shape
    with torch.no_grad():
        close(fast(x), mobilenet(x))
        close(fast(y), mobilenet(y))


def test_jit_mode(mobilenet):
    x = torch.randn(1, 3, 128, 128)
    fast = archopt.optimize_for_inference(mobilenet, x, compile="jit")
    with torch.no_grad():
        close(fast(x), mobilenet(x))


def test_onnxruntime_mode(mobilenet):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (archopt[onnx])")
    x = torch.randn(2, 3, 128, 128)
    fast = archopt.optimize_for_inference(mobilenet, x, compile="onnxruntime")
    with torch.no_grad():
        close(fast(x), mobilenet(x))
        y = torch.randn(5, 3, 128, 128)  # batch is dynamic in the export
        close(fast(y), mobilenet(y))


@pytest.mark.slow
def test_inductor_mode(mobilenet):
    x = torch.randn(1, 3, 128, 128)
    fast = archopt.optimize_for_inference(mobilenet, x, compile="inductor")
    with torch.no_grad():
        close(fast(x), mobilenet(x))


@pytest.mark.parametrize("compile", [None, "jit"])
def test_bfloat16_within_bf16_precision(mobilenet, compile):
    x = torch.randn(2, 3, 128, 128)
    fast = archopt.optimize_for_inference(mobilenet, x, dtype=torch.bfloat16, compile=compile)
    if compile is None:
        assert next(fast.inner.parameters()).dtype == torch.bfloat16 and not fast.training
    with torch.no_grad():
        out, ref = fast(x), mobilenet(x)
    assert out.dtype == torch.float32
    err = (out - ref).abs().max() / ref.abs().max()
    assert 0 < err < 3e-2  # not fp32-exact, but close


def test_auto_picks_a_checked_backend(mobilenet):
    x = torch.randn(1, 3, 96, 96)
    name, fast, times = choose_backend(mobilenet, x, repeats=3)
    assert name in times and times[name] == min(times.values())
    assert {"eager", "jit"} <= set(times)
    with torch.no_grad():
        close(fast(x), mobilenet(x))


def test_the_default_is_the_remembered_fastest_checked_backend(mobilenet, tmp_path, monkeypatch):
    import archopt.optimize as optimize

    monkeypatch.setenv("ARCHOPT_CACHE", str(tmp_path))
    x = torch.randn(1, 3, 96, 96)
    measured = []
    real = optimize.measure_latency
    monkeypatch.setattr(
        optimize, "measure_latency", lambda *a, **k: measured.append(1) or real(*a, **k)
    )
    name, _, times = choose_backend(mobilenet, x, repeats=3, remember=True)
    assert len(measured) >= len(times) >= 2  # every checked backend (and eager's layouts)
    (record,) = (tmp_path / "optimize").iterdir()
    assert json.loads(record.read_text())["backend"] == name
    measured.clear()
    again, fast, times_again = choose_backend(mobilenet, x, repeats=3, remember=True)
    assert (again, times_again) == (name, times) and not measured  # nothing re-measured
    with torch.no_grad():
        close(fast(x), mobilenet(x))
    record.write_text("{broken")  # unreadable: measured again, rewritten
    assert choose_backend(mobilenet, x, repeats=3, remember=True)[0] in times
    assert measured and json.loads(record.read_text())["backend"] in times
    # no arguments at all: the model's own example shape gets the remembered backend, any
    # other shape the eager optimized model
    default = archopt.optimize_for_inference(mobilenet)
    (example,) = mobilenet.example_inputs()
    y = torch.randn(2, 3, 128, 160)
    with torch.no_grad():
        close(default(example), mobilenet(example))
        close(default(y), mobilenet(y))


def test_bad_arguments(mobilenet):
    with pytest.raises(ValueError, match="compile must be None, 'auto' or one of"):
        archopt.optimize_for_inference(mobilenet, compile="tvm")
    with pytest.raises(ValueError, match="compile='jit' needs an example_input"):
        archopt.optimize_for_inference(mobilenet, compile="jit")
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        archopt.optimize_for_inference(mobilenet, dtype=torch.int8)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="runs float32 only"):
        archopt.optimize_for_inference(mobilenet, x, compile="onnxruntime", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"model must be a torch nn\.Module, got str"):
        archopt.optimize_for_inference("mobilenet_v1_100", x)
    with pytest.raises(ValueError, match=r"floating-point tensor, got torch\.int64"):
        archopt.optimize_for_inference(mobilenet, x.long())
    with pytest.raises(ValueError, match="example_input must be finite"):
        archopt.optimize_for_inference(mobilenet, torch.full_like(x, float("nan")))


def test_counting_an_input_past_memory_is_refused_before_allocating(mobilenet):
    from archopt.errors import ResourceError
    from archopt.measure import count_macs

    with pytest.raises(ResourceError, match=r"a \(1, 3, 100000, 100000\) input needs about"):
        count_macs(mobilenet, (1, 3, 100000, 100000))
    with pytest.raises(ValueError, match=r"sizes must be >= 1, got \(1, 3, 0, 64\)"):
        count_macs(mobilenet, (1, 3, 0, 64))


def test_onnx_export_runs_in_onnxruntime(mobilenet, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (archopt[onnx])")
    pytest.importorskip("onnx", reason="onnx is not installed (archopt[onnx])")
    path = archopt.export_onnx(mobilenet, tmp_path / "sub" / "m.onnx", torch.randn(1, 3, 96, 96))
    assert path.exists() and not list(path.parent.glob("*.part"))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 96, 96)
    (out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        close(torch.from_numpy(out), mobilenet(x))
    assert mobilenet.training is False


def test_failed_export_leaves_nothing(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        archopt.export_onnx(Broken(), tmp_path / "m.onnx", torch.randn(1, 3))
    assert list(tmp_path.iterdir()) == []
