"""One decode row through quantized linears: what each weight format costs per layer.

For SmolLM2-135M's shapes, one input row against many distinct weights (about 150 MB in all,
more than the caches hold, as in a real decode step) through: fp32 ``F.linear``; our exact
``Int8Linear`` / ``Int4Linear`` (their fused dequantize-multiply-sum); torch's
``_weight_int8pack_mm`` with fp32 and with bf16 activations (eager); and ``PackedInt4Linear``
(torch's CPU int4 kernel, int4 as one plane, int8 as two); and ``Int4Q8Linear`` (the int4
weights times int8 activations, archopt's kernel, when it builds here). ``--rows 4``: a batch
of four rows, as four decoding streams. All but the int8pack rows run as one
inductor graph per contender, each product feeding the next. Contenders are interleaved round
by round. Prints microseconds per weight and the weight bytes read per
second. Run:

    archopt bench quant-linear --threads 2
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from archopt.bench.common import machine_line
from archopt.measure import interleaved
from archopt.ops.act8 import Int4Q8Linear, Int8Q8Linear
from archopt.ops.quant import Int4Linear, Int8Linear, PackedInt4Linear
from archopt.report import ArgumentParser, float_in, int_in, markdown_table

SHAPES = [(3072, 576), (960, 576), (576, 1536), (49152, 576)]  # gate_up, qkv, down, lm_head


class _Each(nn.Module):
    """Every module in turn, each input depending on the previous output as in a decode step
    (independent products would let inductor fuse them into one wide loop, which a real step
    never can): one graph streaming all their weights."""

    def __init__(self, modules):
        super().__init__()
        self.mods = nn.ModuleList(modules)

    def forward(self, x):
        for m in self.mods:
            x = x + 1e-6 * m(x).sum(-1, keepdim=True)  # (1, in)
        return x


class _Linear(nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", w)

    def forward(self, x):
        return nn.functional.linear(x, self.weight)


def _int8pack(weights: list[torch.Tensor], dtype: torch.dtype):
    mods = [Int8Linear(w) for w in weights]
    packs = [(m.qweight, m.scale[:, 0].to(dtype)) for m in mods]

    def run(x):
        for q, s in packs:
            x = x + 1e-6 * torch._weight_int8pack_mm(x.to(dtype), q, s).sum(-1, keepdim=True)
        return x

    return run


def int4_q8_available() -> bool:
    from archopt.ops import cpu_kernels

    return cpu_kernels.load(build=True)


def contenders_for(n_out: int, n_in: int, budget: float, rows: int = 1) -> tuple[dict, int, dict]:
    count = max(2, int(budget // (n_out * n_in)))  # about `budget` bytes of int8 weights
    torch.manual_seed(0)
    weights = [torch.randn(n_out, n_in) * 0.05 for _ in range(count)]
    x = torch.randn(rows, n_in)
    int8 = [Int8Linear(w) for w in weights]
    int4 = [Int4Linear(w, group_size=32) for w in weights]
    fns = {
        "fp32 F.linear": torch.compile(_Each([_Linear(w) for w in weights]), dynamic=False),
        "Int8Linear, inductor": torch.compile(_Each(int8), dynamic=False),
        "Int4Linear, inductor": torch.compile(_Each(int4), dynamic=False),
        "_weight_int8pack_mm, fp32 x": _int8pack(weights, torch.float32),
        "_weight_int8pack_mm, bf16 x": _int8pack(weights, torch.bfloat16),
        "PackedInt4Linear int8 (2 planes)": torch.compile(
            _Each([PackedInt4Linear.from_int8(m) for m in int8]), dynamic=False
        ),
        "PackedInt4Linear int4": torch.compile(
            _Each([PackedInt4Linear.from_int4(m) for m in int4]), dynamic=False
        ),
    }
    if int4_q8_available():  # GGUF-like fp16 scales, then archopt's int8-activation kernel
        for m in int4:
            m.scale, m.minimum = m.scale.half().float(), m.minimum.half().float()
        q4 = _Each([Int4Q8Linear.from_int4(m) for m in int4])
        fns["Int4Q8Linear int4 x int8 activations"] = torch.compile(q4, dynamic=False)
        q8_0 = [Int8Linear(w, group_size=32) for w in weights]  # GGUF's Q8_0 blocks
        for m in q8_0:
            m.scale = m.scale.half().float()
        q8 = _Each([Int8Q8Linear.from_int8(m) for m in q8_0])
        fns["Int8Q8Linear Q8_0 x int8 activations"] = torch.compile(q8, dynamic=False)
    byte_per_weight = {  # bytes each contender reads per weight, scales included
        "fp32 F.linear": 4,
        "Int8Linear, inductor": 1 + 4 / n_in,
        "Int4Linear, inductor": 0.5 + 8 / 32,
        "_weight_int8pack_mm, fp32 x": 1 + 4 / n_in,
        "_weight_int8pack_mm, bf16 x": 1 + 2 / n_in,
        "PackedInt4Linear int8 (2 planes)": 1 + 2 * 4 / _group(n_in),
        "PackedInt4Linear int4": 0.5 + 4 / 32,
        "Int4Q8Linear int4 x int8 activations": 0.5 + 4 / 32,
        "Int8Q8Linear Q8_0 x int8 activations": 1 + 2 / 32,
    }
    calls = {k: (lambda f=f: f(x)) for k, f in fns.items()}
    return calls, count, byte_per_weight


def _group(n_in: int) -> int:
    return next(g for g in (256, 128, 64, 32) if n_in % g == 0)


def main(argv: list[str] | None = None) -> list[dict]:
    p = ArgumentParser(prog="archopt bench quant-linear", description=__doc__)
    p.add_argument("--threads", type=int_in(1, 1024), default=2)
    p.add_argument("--rounds", type=int_in(1), default=5)
    p.add_argument(
        "--mb",
        type=float_in(0, 1 << 20, open_low=True),
        default=150,
        help="int8 megabytes of distinct weights",
    )
    p.add_argument("--rows", type=int_in(1, 64), default=1, help="input rows (a batch)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = []
    with torch.inference_mode():
        for n_out, n_in in SHAPES:
            calls, count, bpw = contenders_for(n_out, n_in, args.mb * 1e6, args.rows)
            times = interleaved(calls, rounds=args.rounds, per_round=2, warmup=2, progress=False)
            for name, t in times.items():
                us = t["median_ms"] * 1e3 / count
                gbs = n_out * n_in * bpw[name] / us / 1e3
                rows.append({"shape": f"{n_out}x{n_in}", "name": name, "us": us, "gbs": gbs})
    what = "one row" if args.rows == 1 else f"{args.rows} rows"
    print(f"# {machine_line(args.threads)}; {what}, median us per weight (GB/s of its bytes)")
    names = list(dict.fromkeys(r["name"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    table = []
    for name in names:
        cells = [next(r for r in rows if r["name"] == name and r["shape"] == s) for s in shapes]
        table.append([name, *(f"{c['us']:.0f} ({c['gbs']:.1f})" for c in cells)])
    print(markdown_table(["contender", *shapes], table))
    return rows


if __name__ == "__main__":
    main()
