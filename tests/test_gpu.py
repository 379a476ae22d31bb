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


def test_cuda_latency_and_memory():
    x = torch.randn(2048, 2048, device="cuda")
    lat = measure_latency(lambda a: a @ a, x, repeats=5)
    assert lat.device == "cuda" and lat.median_ms > 0
    mem = measure_peak_memory(lambda a: a @ a, x)
    assert mem.method == "cuda" and mem.bytes >= 2048 * 2048 * 4
