"""Every registered model: builds, runs, counts, optimizes and exports consistently."""

import pytest
import torch

import archopt
from archopt.measure import count_macs, count_params, layer_table

from .conftest import randomize_bn

MODELS = archopt.list_models()
TEXT_MODELS = ("longformer", "llama", "smollm2")
IMAGE_MODELS = [n for n in MODELS if not n.startswith(TEXT_MODELS)]
# Small overrides keep the loop fast; every model is still built from its registered preset.
SMALL = {
    "longformer_base_4096": dict(num_layers=2),
    "vit_base_patch16_224": dict(depth=2),
    "smollm2-135m": dict(num_layers=2),
}


@pytest.mark.parametrize("name", MODELS)
def test_forward_and_counts(name):
    model = archopt.create_model(name, **SMALL.get(name, {})).eval()
    args = model.example_inputs(batch=2)
    out = model(*args)
    assert out[0].shape[0] == 2 if isinstance(out, tuple) else out.shape[0] == 2
    rows = layer_table(model, args)
    assert sum(r.macs for r in rows) == count_macs(model, args) > 0
    assert sum(r.params for r in rows) <= count_params(model)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_classifier_head(name):
    model = archopt.create_model(name, num_classes=7).eval()
    (x,) = model.example_inputs(batch=2)
    assert model(x).shape == (2, 7)
    # Parameters the model holds itself, outside any layer (ViT's class token and position
    # embeddings), have no row in the table; every layer's parameters must be in one.
    own = sum(p.numel() for p in model.parameters(recurse=False))
    assert sum(r.params for r in layer_table(model, (x,))) == count_params(model) - own


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_optimize_for_inference_matches(name):
    model = randomize_bn(archopt.create_model(name, num_classes=10)).eval()
    num_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # 0 for ViT
    (x,) = model.example_inputs(batch=1)
    with torch.no_grad():
        ref = model(x)
        fast = archopt.optimize_for_inference(model, x, compile=None)  # backends: test_optimize
        out = fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == num_bn  # kept
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
