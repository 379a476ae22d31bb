"""MobileNet v1 against the paper's tables and the timm / Hugging Face implementations."""

import pytest
import torch
from torch import nn

import archopt
from archopt import references as ref
from archopt.loading import (
    mobilenet_v1_config_from_hf,
    mobilenet_v1_from_hf,
    mobilenet_v1_from_timm,
)
from archopt.measure import count_macs, count_params, layer_table
from archopt.models.mobilenet_v1 import MobileNetV1

from .conftest import randomize_bn

BODY = [(32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2)]
BODY += [(512, 512, 1)] * 5 + [(512, 1024, 2), (1024, 1024, 1)]


def hand_count(res: int = 224, alpha: float = 1.0, depthwise: bool = True, fc: bool = True):
    """(MACs, weights without BN) of MobileNet v1 from Table 1, written out by hand."""
    c = lambda n: int(n * alpha)  # noqa: E731  (every multiplier used here gives multiples of 8)
    size = -(-res // 2)
    macs = size * size * 27 * c(32)
    weights = 27 * c(32)
    for cin, cout, stride in BODY:
        out = -(-size // stride)
        if depthwise:
            macs += out * out * 9 * c(cin) + out * out * c(cin) * c(cout)
            weights += 9 * c(cin) + c(cin) * c(cout)
        else:
            macs += out * out * 9 * c(cin) * c(cout)
            weights += 9 * c(cin) * c(cout)
        size = out
    if fc:
        macs += c(1024) * 1000
        weights += c(1024) * 1000 + 1000
    return macs, weights


def test_release_constants():
    model = archopt.create_model("mobilenet_v1_100")
    assert count_params(model) == ref.MOBILENET_V1_100_PARAMS == 4_231_976
    assert count_params(model, norm=False) == ref.MOBILENET_V1_100_PARAMS_NO_BN == 4_210_088
    assert count_macs(model, (1, 3, 224, 224)) == ref.MOBILENET_V1_100_MACS == 568_740_352
    assert hand_count() == (568_740_352, 4_210_088)


def test_table1_row_by_row():
    rows = layer_table(archopt.create_model("mobilenet_v1_100"), (1, 3, 224, 224))
    ours = [(r.type_stride, r.filter_shape, r.input_size) for r in rows]
    lecture = [
        ref.MOBILENET_V1_TABLE1_ERRATA.get(i, row) for i, row in enumerate(ref.MOBILENET_V1_TABLE1)
    ]
    # The model returns logits; the lecture's last row is the softmax.
    assert lecture[-1][0] == "Softmax / s1"
    assert ours == lecture[:-1]
    assert ref.MOBILENET_V1_TABLE1[25][0] == "Conv dw / s2"  # the lecture's typo, kept as printed
    assert sum(r.macs for r in rows) == 568_740_352
    assert sum(r.params for r in rows) == 4_231_976


def test_table2_shares():
    from archopt.tour.mobilenet import table2_shares

    shares = table2_shares(archopt.create_model("mobilenet_v1_100"))
    for kind in ("Conv 1x1", "Conv DW 3x3", "Fully Connected"):
        assert shares[kind][0] == pytest.approx(ref.MOBILENET_V1_TABLE2[kind][0], abs=0.005)
        assert shares[kind][1] == pytest.approx(ref.MOBILENET_V1_TABLE2[kind][1], abs=0.03)
    # The paper's 1.19% for the one full 3x3 conv does not follow from its own network: the stem
    # costs 112*112*27*32 = 10.8M of 568.7M MACs = 1.91% (and the paper's column sums to 99.29%).
    assert shares["Conv 3x3"][0] == pytest.approx(100 * 10_838_016 / 568_740_352)
    assert sum(ref.MOBILENET_V1_TABLE2[k][0] for k in ref.MOBILENET_V1_TABLE2) == pytest.approx(
        99.29
    )


def test_table4_full_conv_baseline():
    conv = archopt.create_model("conv_mobilenet_v1_100")
    macs, weights = hand_count(depthwise=False)
    assert count_macs(conv, (1, 3, 224, 224)) == macs == 4_867_293_184
    assert count_params(conv, norm=False) == weights
    assert (
        round(count_params(conv) / 1e6, 1) == ref.MOBILENET_V1_TABLE4["conv_mobilenet"][1] == 29.3
    )
    # The paper's 4866M is the body without the 1.024M-MAC classifier.
    body = macs - 1024 * 1000
    assert round(body / 1e6) == ref.MOBILENET_V1_TABLE4["conv_mobilenet"][0] == 4866
    assert all(not (isinstance(m, nn.Conv2d) and m.groups > 1) for m in conv.modules())


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.25])
def test_table6_width_multiplier(alpha):
    model = archopt.create_model("mobilenet_v1_100", width_mult=alpha)
    macs = count_macs(model, (1, 3, 224, 224))
    assert macs == hand_count(alpha=alpha)[0]
    paper_macs, paper_params = ref.MOBILENET_V1_TABLE6[alpha]
    assert round(macs / 1e6) == paper_macs
    assert round(count_params(model) / 1e6, 1) == paper_params


@pytest.mark.parametrize("res", [224, 192, 160, 128])
def test_table7_resolution_multiplier(res):
    model = archopt.create_model("mobilenet_v1_100")
    macs = count_macs(model, (1, 3, res, res))
    assert macs == hand_count(res=res)[0]
    paper = ref.MOBILENET_V1_TABLE7[res][0]
    if res == 160:
        # Exactly 290.68M (291 rounded). The paper's 290 is 569M scaled by rho^2 = (160/224)^2.
        assert round(macs / 1e6) == 291
        assert round(568.74 * (res / 224) ** 2) == paper
    else:
        assert round(macs / 1e6) == paper


def test_any_width_and_resolution():
    model = archopt.create_model("mobilenet_v1_100", width_mult=0.6, num_classes=10).eval()
    assert model.stem.conv.out_channels == 24  # 32*0.6 = 19.2 -> 24 (divisor-8 rounding, >= 90%)
    assert model(torch.randn(2, 3, 97, 131)).shape == (2, 10)
    model = archopt.create_model("mobilenet_v1_025", act="relu", num_classes=0).eval()
    assert isinstance(model.stem.act, nn.ReLU)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 256)


@pytest.mark.parametrize(
    "x,msg",
    [
        (torch.randn(3, 224, 224), r"expected a 4-D input .* got shape \(3, 224, 224\)"),
        (torch.randn(1, 4, 224, 224), "expected 3 input channels, got 4"),
        (torch.randn(1, 3, 16, 224), "at least 32x32 .* got 16x224"),
    ],
)
def test_bad_input(x, msg):
    with pytest.raises(ValueError, match=msg):
        archopt.create_model("mobilenet_v1_025")(x)


@pytest.mark.parametrize("alpha", [0, -0.5])
def test_bad_width_multiplier(alpha):
    with pytest.raises(ValueError, match=f"width_mult must be > 0, got {alpha}"):
        archopt.create_model("mobilenet_v1_100", width_mult=alpha)


# ---- parity with the reference implementations ----


@pytest.mark.parametrize("variant,alpha", [("mobilenetv1_100", 1.0), ("mobilenetv1_125", 1.25)])
def test_timm_parity(variant, alpha):
    timm = pytest.importorskip(
        "timm", reason="timm is not installed (pip install 'archopt[vision]')"
    )
    theirs = timm.create_model(variant, pretrained=False)
    randomize_bn(theirs).eval()
    ours = archopt.create_model("mobilenet_v1_100", width_mult=alpha).eval()
    ours.load_state_dict(mobilenet_v1_from_timm(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    assert count_params(ours) == count_params(theirs)


@pytest.mark.parametrize("head", [True, False])
@pytest.mark.parametrize("multiplier,res", [(1.0, 224), (0.75, 193)])
def test_hf_parity(head, multiplier, res):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install 'archopt[hf]')"
    )
    cfg = transformers.MobileNetV1Config(depth_multiplier=multiplier, num_labels=1001)
    cls = transformers.MobileNetV1ForImageClassification if head else transformers.MobileNetV1Model
    theirs = randomize_bn(cls(cfg)).eval()
    ours = MobileNetV1(mobilenet_v1_config_from_hf(cfg, with_classifier=head)).eval()
    ours.load_state_dict(mobilenet_v1_from_hf(theirs.state_dict()), strict=True)
    x = torch.randn(2, 3, res, res)  # odd size: TF "SAME" padding is asymmetric there
    with torch.no_grad():
        out = theirs(pixel_values=x)
        expected = out.logits if head else out.pooler_output
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)


def test_key_maps_reject_unknown_keys():
    with pytest.raises(KeyError, match=r"unexpected key 'blocks\.0\.0\.se\.weight'"):
        mobilenet_v1_from_timm({"blocks.0.0.se.weight": torch.zeros(1)})
