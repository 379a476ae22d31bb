"""Local attention on one GPU: ours (the Triton backend) vs FlexAttention vs SDPA with a mask.

Same inputs for every contender: bf16, B=1, H=12, d=64, one-sided window w, dilation, global
tokens spread evenly. Ours: ``local_attention(..., backend="triton")``. FlexAttention: the same
mask as a ``BlockMask`` built once outside the timing, ``torch.compile``d ``flex_attention``.
SDPA: ``scaled_dot_product_attention`` with a dense (N, N) boolean mask (only up to
``--sdpa-max-n``: the mask is N^2 bytes and the work O(N^2)).

Timing: CUDA events around each call, after a first (compiling) call and a warm-up, median of
``--reps``. "TFLOP/s" counts only the band's work, 4*B*H*N*(2w+1)*d for the forward pass and
2.5x that for the backward pass, whatever a contender actually computes, so it compares how
fast each one gets the same useful work done; "% mm" is that against a measured bf16
8192^3 matmul; "flex/ours" > 1 means ours is faster. "MiB" is the peak memory a call
allocates beyond its inputs (and beyond SDPA's prebuilt mask).

A contender that fails (out of memory, a compile error, ...) gets its error in its cell and the
run goes on; a global ``--budget-s`` (and ``--flex-budget-s`` for FlexAttention's compiles)
keeps the whole run short: what does not fit is marked "skipped".

    bash benchmarks/gpu_check.sh                       # the GPU tests, then this
    archopt bench attention-gpu [--lengths 4096 16384] [--budget-s 120]
    archopt bench attention-gpu --dry-run  # CPU, Triton interpreter, tiny shape
    (or python -m archopt.bench.attention_gpu with the same flags)
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before anything imports triton: it reads this at import
    os.environ["TRITON_INTERPRET"] = "1"

import functools
import signal
import statistics
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from archopt.report import ArgumentParser, float_in, int_in, markdown_table


@dataclass
class Result:
    ms: float | None = None
    mib: float | None = None
    note: str = ""


@dataclass
class Row:
    n: int
    window: int
    dilation: int
    n_global: int
    backward: bool
    results: dict[str, Result] = field(default_factory=dict)


def parse_args(argv=None):
    p = ArgumentParser(prog="archopt bench attention-gpu", description=__doc__.split("\n\n")[0])
    # run in this order (the table is sorted): what FlexAttention's budget covers first
    p.add_argument(
        "--lengths", type=int_in(1, 1 << 24), nargs="+", default=[16384, 131072, 4096, 65536]
    )
    p.add_argument("--windows", type=int_in(1), nargs="+", default=[256, 1024])
    p.add_argument("--dilations", type=int_in(1), nargs="+", default=[1, 4])
    p.add_argument("--globals", type=int_in(0), nargs="+", default=[0, 16], dest="n_globals")
    p.add_argument("--heads", type=int_in(1, 4096), default=12)
    p.add_argument("--head-dim", type=int_in(1, 4096), default=64)
    p.add_argument("--reps", type=int_in(1), default=5)
    p.add_argument("--sdpa-max-n", type=int_in(0), default=16384)
    p.add_argument("--flex-max-n", type=int_in(0), default=131072)
    p.add_argument(
        "--budget-s", type=float_in(0, open_low=True), default=100.0, help="start no work after"
    )
    p.add_argument("--flex-budget-s", type=float_in(0), default=50.0, help="FlexAttention's share")
    p.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny")
    args = p.parse_args(argv)
    if args.dry_run:
        args.lengths, args.windows, args.dilations, args.n_globals = [48], [4], [1, 2], [0, 2]
        args.heads, args.head_dim, args.reps, args.sdpa_max_n = 2, 16, 1, 48
    return args


class Clock:
    """Milliseconds of a call: CUDA events on the GPU, perf_counter on the CPU (dry run)."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def __call__(self, fn) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def matmul_tflops(device: str, clock: Clock) -> float:
    n = 8192 if device == "cuda" else 256
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    ms = statistics.median(clock(lambda: a @ b) for _ in range(10))
    return 2 * n**3 / ms / 1e9


def band_flops(row: Row, heads: int, d: int) -> float:
    fwd = 4 * heads * row.n * (2 * row.window + 1) * d
    return fwd * (3.5 if row.backward else 1.0)


def measure(fn, clock: Clock, reps: int, device: str) -> Result:
    """First call (compiles), one warm-up, then the median of ``reps`` and peak memory."""
    fn()
    fn()
    times = [clock(fn) for _ in range(reps)]
    mib = None
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - base) / 2**20
    return Result(ms=statistics.median(times), mib=mib)


def make_inputs(row: Row, heads: int, d: int, device: str):
    q, k, v = (
        torch.randn(1, heads, row.n, d, device=device, dtype=torch.bfloat16).requires_grad_(
            row.backward
        )
        for _ in range(3)
    )
    glob = torch.zeros(1, row.n, dtype=torch.bool, device=device)
    if row.n_global:
        glob[:, torch.linspace(0, row.n - 1, row.n_global).long()] = True
    return q, k, v, glob


def step(fn, inputs, backward: bool):
    """The timed call: forward, or forward + backward with a fixed output gradient."""
    if not backward:
        return lambda: fn()
    grad = []

    def run():
        out = fn()
        if not grad:
            grad.append(torch.randn_like(out))
        out.backward(grad[0])
        for x in inputs:  # nothing left allocated between calls
            x.grad = None

    return run


def ours_contender(row: Row, q, k, v, glob):
    from archopt.ops.attention import local_attention

    kwargs = dict(window=row.window, dilation=row.dilation, global_mask=glob)
    return lambda: local_attention(q, k, v, backend="triton", **kwargs)


def flex_contender(row: Row, q, k, v, glob, compiled: bool):
    """FlexAttention with the band + global mask; window and dilation are captured as tensors
    so that only a new length recompiles."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    reach = torch.tensor(row.window * row.dilation, device=q.device)
    dil = torch.tensor(row.dilation, device=q.device)

    def mask_mod(b, h, qi, ki):
        diff = qi - ki
        band = (diff.abs() <= reach) & (diff % dil == 0)
        return band | glob[b, qi] | glob[b, ki]

    # built eagerly (once, untimed): compiling create_block_mask's own kernels took over 2
    # minutes on an H200 with torch 2.11 (a sort kernel's lowering), longer than the run
    block_mask = create_block_mask(mask_mod, 1, None, row.n, row.n, q.device)
    attend = _compiled_flex() if compiled else flex_attention
    return lambda: attend(q, k, v, block_mask=block_mask)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = 64  # one graph per length, forward and backward
    return torch.compile(flex_attention, dynamic=False)


def sdpa_contender(row: Row, q, k, v, glob):
    pos = torch.arange(row.n, device=q.device, dtype=torch.int32)
    diff = pos[:, None] - pos[None, :]
    mask = (diff.abs() <= row.window * row.dilation) & (diff % row.dilation == 0)
    del diff
    mask |= glob[0][:, None] | glob[0][None, :]
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def run_row(row: Row, args, clock: Clock, device: str, clocks: dict) -> None:
    q, k, v, glob = make_inputs(row, args.heads, args.head_dim, device)
    outputs = {}
    contenders = {
        "ours": lambda: ours_contender(row, q, k, v, glob),
        "flex": lambda: flex_contender(row, q, k, v, glob, compiled=device == "cuda"),
        "sdpa": lambda: sdpa_contender(row, q, k, v, glob),
    }
    for name, build in contenders.items():
        now = time.perf_counter()
        if now > clocks["deadline"]:
            row.results[name] = Result(note="skipped (time budget)")
            continue
        if name == "sdpa" and row.n > args.sdpa_max_n:
            row.results[name] = Result(note=f"skipped (N > {args.sdpa_max_n})")
            continue
        if name == "flex":
            # a new length (or the first backward pass) compiles: 10-60 s, so it starts only
            # with that much time left, so that the run is not cut off in the middle of it
            compiles = (row.n, row.backward) not in clocks["flex_shapes"]
            if (
                row.n > args.flex_max_n
                or clocks["flex"] > args.flex_budget_s
                or (compiles and clocks["deadline"] - now < 45)
            ):
                row.results[name] = Result(note="skipped (flex budget)")
                continue
            clocks["flex_shapes"].add((row.n, row.backward))
            if device == "cuda":  # a compile that outlasts FlexAttention's budget is cut off
                left = min(args.flex_budget_s - clocks["flex"], clocks["deadline"] - now)
                signal.signal(signal.SIGALRM, _flex_timeout)
                signal.alarm(max(1, int(left)))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn = build()
                if not row.backward:  # (also the first, compiling call)
                    outputs[name] = fn().float()
                row.results[name] = measure(
                    step(fn, (q, k, v), row.backward), clock, args.reps, device
                )
        except Exception as e:  # one failing contender must not end the run
            message = " ".join(str(e).split()).replace("|", "/")[:100]
            row.results[name] = Result(note=f"error: {type(e).__name__}: {message}")
        finally:
            if name == "flex":
                signal.alarm(0)
                clocks["flex"] += time.perf_counter() - now
            if device == "cuda":
                torch.cuda.empty_cache()
    if "ours" in outputs:  # forward agreement, a sanity check on the same inputs
        for name in ("flex", "sdpa"):
            if name in outputs:
                err = (outputs["ours"] - outputs[name]).abs().max().item()
                row.results["ours"].note += f"{'; ' if row.results['ours'].note else ''}"
                row.results["ours"].note += f"max abs diff vs {name} {err:.1e}"
                break


def fmt_ms(r: Result) -> str:
    return f"{r.ms:.3f}" if r.ms is not None else "-"


def table(rows: list[Row], args, peak: float) -> str:
    head = [
        "N", "w", "dil", "glob", "pass", "ours ms", "flex ms", "sdpa ms", "flex/ours",
        "ours TFLOP/s (% mm)", "flex TFLOP/s", "MiB ours/flex/sdpa", "notes",
    ]  # fmt: skip
    lines = []
    for row in rows:
        r = {name: row.results.get(name, Result(note="-")) for name in ("ours", "flex", "sdpa")}
        flops = band_flops(row, args.heads, args.head_dim)
        ratio = f"{r['flex'].ms / r['ours'].ms:.2f}x" if r["ours"].ms and r["flex"].ms else "-"
        ours_tf = flex_tf = "-"
        if r["ours"].ms:
            tf = flops / r["ours"].ms / 1e9
            ours_tf = f"{tf:.1f} ({100 * tf / peak:.0f}%)"
        if r["flex"].ms:
            flex_tf = f"{flops / r['flex'].ms / 1e9:.1f}"
        mib = "/".join(f"{x.mib:.0f}" if x.mib is not None else "-" for x in r.values())
        notes = "; ".join(f"{name}: {x.note}" for name, x in r.items() if x.note)
        lines.append([
            row.n, row.window, row.dilation, row.n_global, "fwd+bwd" if row.backward else "fwd",
            fmt_ms(r["ours"]), fmt_ms(r["flex"]), fmt_ms(r["sdpa"]), ratio, ours_tf, flex_tf,
            mib, notes,
        ])  # fmt: skip
    return markdown_table(head, lines)


class _FlexTimeout(Exception):  # caught per contender: FlexAttention's cell says so
    def __init__(self) -> None:
        super().__init__("over its time budget (compiling), cut off")


def _flex_timeout(signum, frame):
    raise _FlexTimeout


class _Stopped(BaseException):  # not caught by the per-contender `except Exception`
    pass


def _stop(signum, frame):
    raise _Stopped


def main(argv=None) -> int:
    if "--dry-run" in (sys.argv if argv is None else argv):
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's import below, which reads it
    args = parse_args(argv)
    start = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark (use --dry-run on a CPU)")
        return 1
    import triton

    torch.manual_seed(0)
    clock = Clock(device)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    peak = matmul_tflops(device, clock)
    print(f"# Local attention, {name}; torch {torch.__version__}, triton {triton.__version__}")
    print(f"bf16 matmul: {peak:.1f} TFLOP/s; B=1, H={args.heads}, d={args.head_dim}, bf16\n")
    clocks = {"deadline": start + args.budget_s, "flex": 0.0, "flex_shapes": set()}
    rows = []
    configs = [
        Row(n, window, dilation, n_global, backward)
        for n in args.lengths
        for window in args.windows
        for dilation in args.dilations
        for n_global in args.n_globals
        for backward in (False, True)
    ]
    signal.signal(signal.SIGTERM, _stop)  # `timeout`: still print the table of what ran
    try:
        for row in configs:
            run_row(row, args, clock, device, clocks)
            rows.append(row)
            print(
                f"N={row.n} w={row.window} dil={row.dilation} glob={row.n_global} "
                f"{'fwd+bwd' if row.backward else 'fwd'}: "
                + ", ".join(f"{k} {fmt_ms(x)} {x.note}".strip() for k, x in row.results.items()),
                flush=True,
            )
    except _Stopped:
        print("stopped by SIGTERM: the table is partial")
    rows.sort(key=lambda r: (r.n, r.window, r.dilation, r.n_global, r.backward))
    print()
    print(table(rows, args, peak))
    print(f"\n({time.perf_counter() - start:.0f} s in all, FlexAttention {clocks['flex']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
