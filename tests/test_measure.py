import pytest
import torch
import torch.nn.functional as F
from torch import nn

from archopt.measure import (
    count_macs,
    count_params,
    format_table,
    layer_table,
    measure_latency,
    measure_model,
    measure_peak_memory,
    trace_macs,
)


@pytest.mark.parametrize(
    "module,shape,expected",
    [
        # dense 3x3: every output element (8*10*10) sums 4*3*3 products
        (nn.Conv2d(4, 8, 3, padding=1), (1, 4, 10, 10), 8 * 10 * 10 * 4 * 9),
        # grouped: C_in/groups = 2 inputs per output
        (nn.Conv2d(4, 8, 3, padding=1, groups=2), (2, 4, 10, 10), 2 * 8 * 100 * 2 * 9),
        # depthwise, stride 2: one input channel per output, 5x5 outputs
        (nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6), (1, 6, 9, 9), 6 * 5 * 5 * 9),
        # transposed: every input element feeds C_out*K*K outputs
        (nn.ConvTranspose2d(3, 5, 2, stride=2), (1, 3, 4, 4), 3 * 16 * 5 * 4),
        (nn.Conv1d(3, 4, 5), (2, 3, 20), 2 * 4 * 16 * 3 * 5),
        (nn.Linear(10, 7), (3, 10), 3 * 10 * 7),
        (nn.Linear(10, 7, bias=False), (2, 5, 10), 2 * 5 * 10 * 7),
        (nn.ReLU(), (4, 4), 0),
        (nn.BatchNorm2d(3).eval(), (1, 3, 4, 4), 0),
    ],
)
def test_module_macs(module, shape, expected):
    assert count_macs(module, shape) == expected


class Functional(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize(
    "fn,args,expected",
    [
        (torch.matmul, (torch.randn(5, 6), torch.randn(6, 7)), 5 * 6 * 7),
        (torch.matmul, (torch.randn(2, 3, 5, 6), torch.randn(2, 3, 6, 7)), 6 * 5 * 6 * 7),
        (torch.bmm, (torch.randn(4, 5, 6), torch.randn(4, 6, 2)), 4 * 5 * 6 * 2),
        (lambda a, b: a @ b.T, (torch.randn(3, 8), torch.randn(9, 8)), 3 * 8 * 9),
        # attention: QK^T (L*S*E) + AV (L*S*Ev) per batch*head, fused CPU kernel included
        (F.scaled_dot_product_attention, (torch.randn(2, 3, 10, 8),) * 3, 2 * 3 * 10 * 10 * 16),
        (
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
            (torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 4), torch.randn(1, 2, 7, 6)),
            2 * 7 * 7 * (4 + 6),
        ),
    ],
)
def test_functional_macs(fn, args, expected):
    assert count_macs(Functional(fn), args) == expected


def test_sdpa_is_counted_where_flop_counter_sees_zero():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 64, 32)
    with FlopCounterMode(display=False) as fc:
        F.scaled_dot_product_attention(q, q, q)
    ours = count_macs(Functional(F.scaled_dot_product_attention), (q, q, q))
    assert ours == 2 * 64 * 64 * 64
    assert fc.get_total_flops() in (0, 2 * ours)  # 0 on CPU builds without a formula


def test_count_params_options():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.LayerNorm(4), nn.Linear(4, 2))
    m[3].weight.requires_grad_(False)
    assert count_params(m) == 3 * 4 * 9 + 4 + 8 + 8 + 10
    assert count_params(m, norm=False) == 3 * 4 * 9 + 4 + 10
    assert count_params(m, trainable_only=True) == 3 * 4 * 9 + 4 + 8 + 8 + 2


class TinyAttention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d/H)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


def test_layer_table_gives_attention_its_own_row():
    model = nn.Sequential(TinyAttention(), nn.LayerNorm(8))
    rows = layer_table(model, (1, 5, 8))
    assert [r.name for r in rows] == ["0.qkv", "0", "0.proj"]
    attn = rows[1]
    assert attn.type_stride == "TinyAttention (matmul)" and attn.params == 0
    assert attn.macs == 2 * 5 * 5 * 8  # heads * N * N * (dh + dh)
    assert rows[2].params == 8 * 8 + 8 + 16  # proj and the LayerNorm after it
    assert sum(r.macs for r in rows) == count_macs(model, (1, 5, 8))
    assert sum(r.share for r in rows) == pytest.approx(1.0)
    text = format_table(rows)
    assert "TinyAttention (matmul)" in text and text.splitlines()[-1].startswith("Total")


def test_measurement_leaves_training_mode_and_bn_stats_alone():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = m[1].running_mean.clone()
    count_macs(m, (2, 3, 8, 8))
    layer_table(m, (2, 3, 8, 8))
    assert m.training and torch.equal(m[1].running_mean, before)


def test_trace_attributes_ops_to_modules():
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    recs = trace_macs(m, (3, 4))
    assert [(r.module, r.macs) for r in recs] == [("0", 48), ("1", 24)]


def test_latency_fields_and_validation():
    calls = []
    lat = measure_latency(lambda x: calls.append(1) or x * 2, torch.ones(3), warmup=2, repeats=5)
    assert len(calls) == 7 and lat.repeats == 5
    assert lat.p10_ms <= lat.median_ms <= lat.p90_ms and lat.min_ms <= lat.median_ms
    assert lat.threads == torch.get_num_threads() and lat.device == "cpu"
    assert lat.torch_version == torch.__version__
    one = measure_latency(nn.Identity(), torch.ones(1), repeats=3, threads=1)
    assert one.threads == 1
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        measure_latency(nn.Identity(), torch.ones(1), repeats=0)


def test_peak_memory_tensors_is_exact():
    def work():
        a = torch.ones(1000, 1000)  # 4 MB
        view = a[0]
        c = a + 1  # 8 MB live
        del a  # still alive through the view
        d = c * 2  # 12 MB peak
        del c
        return d.sum() + view.sum()

    assert measure_peak_memory(work).bytes == 3 * 4_000_000  # the scalars come after c is freed
    assert measure_peak_memory(work).method == "tensors"
    x = torch.ones(1000, 1000)
    # views of memory that existed before the call cost nothing; a copy does
    assert measure_peak_memory(lambda: x[1:].unfold(0, 10, 1).transpose(0, 1)).bytes == 0
    assert measure_peak_memory(lambda: x[1:].clone()).bytes == 999 * 1000 * 4
    big = measure_peak_memory(lambda: torch.ones(16, 1024, 1024).sum(), method="rss")
    assert big.method.startswith("rss") and big.bytes > 0.8 * 64 * 2**20
    with pytest.raises(ValueError, match="method must be one of"):
        measure_peak_memory(lambda: None, method="heap")


def test_measure_model_summary():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    s = measure_model(m, (1, 3, 10, 10), name="tiny", repeats=3)
    assert s.params == 3 * 8 * 9 + 8 and s.macs == 8 * 64 * 27
    # conv output and ReLU output (not in place) are alive together
    assert s.peak_memory_bytes == 2 * 8 * 64 * 4 and s.latency_ms > 0
