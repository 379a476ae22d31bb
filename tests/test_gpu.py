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
