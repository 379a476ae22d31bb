"""ViT / DeiT against their published sizes and timm; the shared transformer layer's attention
against a written-out softmax oracle."""

import math

import pytest
import torch
from torch import nn

import archopt
from archopt.loading import vit_from_timm
from archopt.measure import count_macs, count_params, layer_table
from archopt.ops.transformer import MultiHeadSelfAttention, TransformerLayer

from .test_mobilevit import randomize_norms


def hand_count(d: int, depth: int, res: int = 224, patch: int = 16, classes: int = 1000) -> int:
    """MACs of ViT: patch embedding, per layer 12 d^2 per token (qkv 3, proj 1, MLP 8) plus
    QK^T and AV (2 * T^2 * d), and the head."""
    n = (res // patch) ** 2
    t = n + 1  # with the class token
    layer = t * 12 * d * d + 2 * t * t * d
    return n * d * 3 * patch * patch + depth * layer + d * classes


@pytest.mark.parametrize(
    "name,params,macs,d",
    [
        # DeiT-Tiny / ViT-Ti: 5.7M params (DeiT Table 1), 1.25 GMACs with attention counted.
        ("vit_tiny_patch16_224", 5_717_416, 1_253_683_200, 192),
        # ViT-B/16: timm's vit_base_patch16_224 has exactly 86,567,656 (the paper's "86M");
        # 17.56 GMACs with attention counted (0.72 G of it QK^T and AV).
        ("vit_base_patch16_224", 86_567_656, 17_563_828_224, 768),
    ],
)
def test_params_and_macs(name, params, macs, d):
    model = archopt.create_model(name)
    assert count_params(model) == params
    assert count_macs(model, (1, 3, 224, 224)) == macs == hand_count(d, 12)


def test_attention_rows_in_layer_table():
    rows = layer_table(archopt.create_model("vit_tiny_patch16_224"), (1, 3, 224, 224))
    attn = [r for r in rows if r.type_stride == "MultiHeadSelfAttention (matmul)"]
    assert len(attn) == 12
    assert all(r.macs == 2 * 197 * 197 * 192 and r.input_size == "197x192" for r in attn)


def test_same_layer_code_as_mobilevit():
    vit = archopt.create_model("vit_tiny_patch16_224")
    mvit = archopt.create_model("mobilevit_xxs")
    assert all(type(b) is TransformerLayer for b in vit.blocks)
    assert type(mvit.stages[2][1].transformer[0]) is TransformerLayer
    act = vit.blocks[0].mlp.act
    assert isinstance(act, nn.GELU) and act.approximate == "none"


def test_attention_matches_softmax_oracle():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(24, 3).eval()
    x = torch.randn(2, 7, 24)
    q, k, v = attn.qkv(x).split(24, dim=-1)
    heads = lambda t: t.reshape(2, 7, 3, 8).transpose(1, 2)  # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, 7, 24))
    torch.testing.assert_close(attn(x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_timm_parity(variant):
    timm = pytest.importorskip(
        "timm", reason="timm is not installed (pip install 'archopt[vision]')"
    )
    theirs = randomize_norms(timm.create_model(variant, pretrained=False)).eval()
    ours = archopt.create_model("vit_tiny_patch16_224").eval()
    ours.load_state_dict(vit_from_timm(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_timm_parity_base():
    timm = pytest.importorskip(
        "timm", reason="timm is not installed (pip install 'archopt[vision]')"
    )
    theirs = randomize_norms(timm.create_model("vit_base_patch16_224", pretrained=False)).eval()
    ours = archopt.create_model("vit_base_patch16_224").eval()
    ours.load_state_dict(vit_from_timm(theirs.state_dict()), strict=True)
    assert count_params(ours) == count_params(theirs)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_features_without_head():
    model = archopt.create_model("vit_tiny_patch16_224", num_classes=0, depth=1).eval()
    assert model(torch.randn(2, 3, 224, 224)).shape == (2, 192)


@pytest.mark.parametrize(
    "x,msg",
    [
        (torch.randn(3, 224, 224), r"expected a 4-D input .* got shape \(3, 224, 224\)"),
        (torch.randn(1, 1, 224, 224), "expected 3 input channels, got 1"),
        (torch.randn(1, 3, 8, 8), r"expected a 224x224 input .* 14x14 grid .* got 8x8"),
        (torch.randn(1, 3, 224, 240), "expected a 224x224 input .* got 224x240"),
    ],
)
def test_bad_input(x, msg):
    with pytest.raises(ValueError, match=msg):
        archopt.create_model("vit_tiny_patch16_224", depth=1)(x)


def test_bad_config():
    with pytest.raises(ValueError, match="embed_dim must be divisible by num_heads, got 192 and 5"):
        archopt.create_model("vit_tiny_patch16_224", num_heads=5)
    with pytest.raises(ValueError, match="img_size must be a multiple of patch_size"):
        archopt.create_model("vit_tiny_patch16_224", img_size=200)


def test_key_map_rejects_distillation_token():
    with pytest.raises(KeyError, match=r"unexpected key 'dist_token'"):
        vit_from_timm({"dist_token": torch.zeros(1, 1, 192)})
