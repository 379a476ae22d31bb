import itertools

import pytest
import torch
from torch import nn

from archopt.measure import count_params
from archopt.ops import ConvNormAct, DepthwiseSeparableConv2d, fold_batchnorm, tf_same_pad

from .conftest import randomize_bn


@pytest.mark.parametrize(
    "cin,cout,k", list(itertools.product([1, 3, 8, 32, 17], [1, 5, 64, 100], [1, 3, 5, 7]))
)
def test_ds_conv_weight_count_matches_formula(cin, cout, k):
    block = DepthwiseSeparableConv2d(cin, cout, k)
    weights = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    assert weights == cin * k * k + cin * cout
    assert count_params(block, norm=False) == cin * k * k + cin * cout
    assert count_params(block) == cin * k * k + cin * cout + 2 * cin + 2 * cout
    # the full conv it replaces
    assert count_params(ConvNormAct(cin, cout, k), norm=False) == cin * cout * k * k


def test_ds_conv_structure_and_shapes():
    block = DepthwiseSeparableConv2d(16, 24, 3, stride=2, act="relu").eval()
    assert block.dw.conv.groups == 16 and block.dw.conv.kernel_size == (3, 3)
    assert block.pw.conv.kernel_size == (1, 1) and block.pw.conv.groups == 1
    assert isinstance(block.dw.act, nn.ReLU) and isinstance(block.pw.bn, nn.BatchNorm2d)
    assert block(torch.randn(2, 16, 15, 16)).shape == (2, 24, 8, 8)


def test_ds_conv_equals_dense_composition():
    block = randomize_bn(DepthwiseSeparableConv2d(6, 10, 3, act="relu6")).eval()
    x = torch.randn(2, 6, 9, 9)
    dw, pw = block.dw, block.pw
    y = nn.functional.conv2d(x, dw.conv.weight, padding=1, groups=6)
    y = nn.functional.relu6(dw.bn(y))
    y = nn.functional.relu6(pw.bn(nn.functional.conv2d(y, pw.conv.weight)))
    torch.testing.assert_close(block(x), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("groups,stride,k", [(1, 1, 3), (1, 2, 1), (12, 2, 3), (4, 1, 5)])
def test_fold_batchnorm_equals_unfolded(groups, stride, k):
    model = nn.Sequential(
        ConvNormAct(12, 12, k, stride, groups=groups),
        nn.Conv2d(12, 8, 1),
        nn.BatchNorm2d(8),
    )
    randomize_bn(model).eval()
    x = torch.randn(3, 12, 13, 11)
    ref = model(x)
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    torch.testing.assert_close(folded(x), ref, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_refuses_training_mode():
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(ConvNormAct(3, 4).train())


@pytest.mark.parametrize("size,k,s", [(224, 3, 2), (225, 3, 2), (7, 3, 1), (10, 5, 3), (1, 3, 2)])
def test_tf_same_pad_gives_ceil_output(size, k, s):
    before, after = tf_same_pad(size, k, s)
    assert 0 <= after - before <= 1
    out = (size + before + after - k) // s + 1
    assert out == -(-size // s)


@pytest.mark.parametrize(
    "kwargs,msg",
    [
        (dict(in_channels=0, out_channels=4), "in_channels must be a positive int, got 0"),
        (dict(in_channels=4, out_channels=6, groups=4), r"divisible by groups \(4\)"),
        (dict(in_channels=4, out_channels=4, act="tanh"), "activation must be one of"),
    ],
)
def test_bad_conv_arguments(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        ConvNormAct(**kwargs)
