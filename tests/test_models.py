"""Every registered model: builds, runs, counts, optimizes and exports consistently."""

import pytest
import torch

import archopt
from archopt.measure import count_macs, count_params, layer_table

from .conftest import randomize_bn

MODELS = archopt.list_models()


def input_shape(model, batch=2):
    res = getattr(model, "default_resolution", 224)
    return (batch, model.config.in_chans, res, res)


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_counts(name):
    model = archopt.create_model(name, num_classes=7).eval()
    shape = input_shape(model)
    assert model(torch.randn(shape)).shape == (shape[0], 7)
    rows = layer_table(model, shape)
    assert sum(r.macs for r in rows) == count_macs(model, shape) > 0
    assert sum(r.params for r in rows) == count_params(model)


@pytest.mark.parametrize("name", MODELS)
def test_optimize_for_inference_matches(name):
    model = randomize_bn(archopt.create_model(name, num_classes=10)).eval()
    x = torch.randn(input_shape(model, batch=1))
    with torch.no_grad():
        ref = model(x)
        fast = archopt.optimize_for_inference(model, x)
        out = fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original kept
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
