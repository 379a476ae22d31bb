"""Longformer local attention on the CPU: time and peak memory vs sequence length.

Contenders, same inputs, same process, interleaved round by round: ours (blocked backend),
FlexAttention (compiled, same mask), dense SDPA with a band mask, and Hugging Face
``LongformerSelfAttention`` next to our ``LongformerSelfAttention`` (both with their Q/K/V
projections). Run:

    archopt bench attention --threads 2 [--lengths 1024 ... 16384] [--plot out.png]
    (or python -m archopt.bench.attention with the same flags)
"""

from __future__ import annotations

import functools
import json
import warnings

import torch

from archopt.bench.common import machine_line, matmul_gflops
from archopt.io import atomic_write_text, check_writable
from archopt.measure import interleaved, measure_peak_memory
from archopt.ops.attention import blocked, local_attention
from archopt.ops.attention import flex as flex_backend
from archopt.ops.attention.reference import band_mask
from archopt.report import (
    ArgumentParser,
    float_in,
    int_in,
    log,
    markdown_table,
    pyplot,
    save_figure,
    table_head,
    table_row,
)


def op_contenders(n, args, dilation, n_global):
    b, h, d, w = 1, args.heads, args.head_dim, args.window
    q, k, v = (torch.randn(b, h, n, d, requires_grad=args.backward) for _ in range(3))
    glob = None
    if n_global:
        glob = torch.zeros(b, n, dtype=torch.bool)
        glob[:, torch.linspace(0, n - 1, n_global).long()] = True

    step = functools.partial(_step, backward=args.backward)

    def ours():
        return local_attention(
            q, k, v, window=w, dilation=dilation, global_mask=glob, backend="blocked"
        )

    fns = {"ours": step(ours)}
    if dilation != 1:  # the undilated band on the same inputs, interleaved: the ratio's base
        fns["ours, dilation 1"] = step(
            lambda: local_attention(q, k, v, window=w, global_mask=glob, backend="blocked")
        )
    # the memory / speed trades: smaller score chunks, a smaller spare buffer
    for mib in args.chunk_mib or []:
        fns[f"ours, {mib:g} MiB chunks"] = step(
            functools.partial(_with_setting, "CHUNK_BYTES", mib, ours)
        )
    for mib in args.spare_mib or []:
        fns[f"ours, {mib:g} MiB spare"] = step(
            functools.partial(_with_setting, "SPARE_BYTES", mib, ours)
        )
    # FlexAttention has no CPU backward (NotImplementedError in torch 2.14): forward only.
    if flex_backend.available() and not args.backward:
        compiled = flex_backend.can_compile()
        # Built once, as a model would: the mask construction is not part of the timed call.
        block_mask = flex_backend.make_block_mask(
            b,
            h,
            n,
            window=w,
            dilations=[dilation] * h,
            global_mask=glob,
            key_padding_mask=None,
            causal=False,
            device="cpu",
            compiled=compiled,
        )
        label = "flex (compiled)" if compiled else "flex (eager)"
        fns[label] = step(
            lambda: flex_backend.local_attention_flex(
                q,
                k,
                v,
                window=w,
                dilations=[dilation] * h,
                global_mask=glob,
                key_padding_mask=None,
                causal=False,
                scale=d**-0.5,
                compiled=compiled,
                block_mask=block_mask,
            )
        )
    if n <= args.dense_max:
        mask = band_mask(n, w, dilation)
        if glob is not None:
            mask = mask | glob[0][None, :] | glob[0][:, None]
        fns["dense SDPA + band mask"] = step(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        )
    return fns


def _step(fn, backward: bool):
    """``fn``, or, to time forward + backward, fn().sum().backward()."""
    if not backward:
        return fn

    def forward_backward():
        fn().sum().backward()

    return forward_backward


def _with_setting(name: str, mib: float, fn):
    saved = getattr(blocked, name)
    setattr(blocked, name, int(mib * 2**20))
    try:
        return fn()
    finally:
        setattr(blocked, name, saved)


def module_contenders(n, args):
    try:
        import transformers
    except ImportError:
        return {}
    from archopt.loading.longformer import longformer_config_from_hf, longformer_from_hf
    from archopt.models.longformer import LongformerModel

    c = args.heads * args.head_dim
    cfg = transformers.LongformerConfig(
        hidden_size=c,
        num_attention_heads=args.heads,
        num_hidden_layers=1,
        attention_window=[2 * args.window],
        vocab_size=10,
        max_position_embeddings=16,
        intermediate_size=4,
    )
    hf = transformers.LongformerModel(cfg).eval()
    ours = LongformerModel(longformer_config_from_hf(cfg)).eval()
    ours.load_state_dict(longformer_from_hf(hf.state_dict()))
    hf_attn, our_attn = hf.encoder.layer[0].attention.self, ours.layers[0].attn
    n_hf = -(-n // (2 * args.window)) * 2 * args.window  # HF needs a multiple of 2w
    x = torch.randn(1, n_hf, c)
    zero = torch.zeros(1, n_hf)
    no = torch.zeros(1, n_hf, dtype=torch.bool)
    return {
        "HF LongformerSelfAttention (+proj)": lambda: hf_attn(
            x,
            attention_mask=zero,
            is_index_masked=no,
            is_index_global_attn=no,
            is_global_attn=False,
        )[0],
        "ours LongformerSelfAttention (+proj)": lambda: our_attn(x),
    }


def main(argv: list[str] | None = None) -> None:
    p = ArgumentParser(prog="archopt bench attention", description=__doc__)
    p.add_argument("--threads", type=int_in(1, 1024), default=2)
    p.add_argument(
        "--lengths", type=int_in(1, 1 << 24), nargs="+", default=[1024, 2048, 4096, 8192, 16384]
    )
    p.add_argument("--window", type=int_in(1), default=256)
    p.add_argument("--heads", type=int_in(1, 4096), default=12)
    p.add_argument("--head-dim", type=int_in(1, 4096), default=64)
    p.add_argument("--dense-max", type=int_in(0), default=8192, help="skip dense SDPA above this N")
    p.add_argument(
        "--hf-max", type=int_in(0), default=16384, help="skip the HF module above this N"
    )
    p.add_argument("--variants", action="store_true", help="also dilation 2, 4 and 16 globals")
    p.add_argument("--rounds", type=int_in(1), default=3)
    p.add_argument(
        "--min-round-ms",
        type=float_in(0),
        default=250.0,
        help="calls per contender per round: at least this many ms (0: one call)",
    )
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument(
        "--chunk-mib",
        type=float_in(0, open_low=True),
        nargs="+",
        help="also ours with these score-chunk sizes",
    )
    p.add_argument(
        "--spare-mib",
        type=float_in(0),
        nargs="+",
        help="also ours with these spare-buffer sizes (peak memory: the output plus that)",
    )
    p.add_argument(
        "--dilation-alone",
        action="store_true",
        help="only ours at dilation 1, 2 and 4, interleaved: the dilation cost without "
        "other contenders' leftovers",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="PNG of time against length")
    args = p.parse_args(argv)
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_writable(path, flag)  # before the minutes of work, not after
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.dilation_alone:
        print(dilation_alone(args))
        return
    rate = matmul_gflops()
    print(f"# {machine_line(args.threads)}; fp32 matmul 2048^3: {rate:.0f} GFLOP/s")
    what = "forward + backward" if args.backward else "forward"
    print(f"# B=1, H={args.heads}, d={args.head_dim}, w={args.window} (one-sided), {what}, fp32\n")
    head = ["N", "variant", "contender", "median ms", "p10-p90 ms", "vs ours", "band GFLOP/s"]
    print(table_head([*head, "peak RSS MiB"]))
    results = []
    variants = [("w", 1, 0)]
    if args.variants:
        variants += [("dilation 2", 2, 0), ("dilation 4", 4, 0), ("16 global", 1, 16)]
    grad = torch.enable_grad() if args.backward else torch.inference_mode()
    with grad:
        for n in args.lengths:
            for label, dil, n_glob in variants:
                fns = op_contenders(n, args, dil, n_glob)
                if label == "w" and n <= args.hf_max:
                    modules = module_contenders(n, args).items()
                    fns.update({k: _step(f, args.backward) for k, f in modules})
                log(f"N={n} {label}")
                stats = interleaved(
                    fns, rounds=args.rounds, per_round=1, warmup=1, min_round_ms=args.min_round_ms
                )
                # QK^T and PV over the band; a backward pass does twice the forward's matmuls.
                band_flops = 4 * args.heads * n * (2 * args.window + 1) * args.head_dim
                band_flops *= 3 if args.backward else 1
                base = stats["ours"]["median_ms"]
                for name, s in stats.items():
                    mem = measure_peak_memory(fns[name], method="rss").bytes / 2**20
                    gflops = band_flops / (s["median_ms"] * 1e6)
                    cells = [
                        n, label, name, f"{s['median_ms']:.1f}",
                        f"{s['p10_ms']:.1f}-{s['p90_ms']:.1f}", f"{s['median_ms'] / base:.2f}x",
                        f"{gflops:.0f}", f"{mem:.1f}",
                    ]  # fmt: skip
                    print(table_row(cells), flush=True)
                    results.append(
                        {"n": n, "variant": label, "contender": name, "peak_mib": mem, **s}
                    )
    print("\n" + summary(results, lambda n: 4 * args.heads * n * args.head_dim))
    if args.json:
        record = {"machine": machine_line(args.threads), "results": results}
        atomic_write_text(args.json, json.dumps(record, indent=2))
    if args.plot:
        plot(results, args.plot)


def dilation_alone(args) -> str:
    """Ours at dilation 1, 2 and 4 on the same inputs, nothing else in the rounds."""
    rows = []
    for n in args.lengths:
        qkv = [torch.randn(1, args.heads, n, args.head_dim) for _ in range(3)]
        fns = {
            d: (lambda d=d, qkv=qkv: local_attention(*qkv, window=args.window, dilation=d))
            for d in (1, 2, 4)
        }
        with torch.inference_mode():
            t = {d: s["median_ms"] for d, s in interleaved(fns, rounds=args.rounds).items()}
        rows.append([
            n, f"{t[1]:.1f}", f"{t[2]:.1f}", f"{t[4]:.1f}", f"{t[2] / t[1]:.2f}x",
            f"{t[4] / t[1]:.2f}x",
        ])  # fmt: skip
    head = ["N", "d=1 ms", "d=2 ms", "d=4 ms", "d=2 / d=1", "d=4 / d=1"]
    title = f"# {machine_line(args.threads)}; ours only, forward, fp32, w={args.window}"
    return title + "\n" + markdown_table(head, rows)


def summary(results, output_bytes) -> str:
    """The issue's goals, read off the rows: ours vs Flex, dilated vs undilated, memory.

    ``output_bytes(n)``: the size of the attention output, the floor of peak memory."""
    at = {(r["n"], r["variant"], r["contender"]): r for r in results}
    head = [
        "N", "Flex / ours", "d=2 / d=1", "d=4 / d=1", "output MiB", "ours peak MiB",
        "ours, smallest spare: peak MiB, time", "Flex peak MiB",
    ]  # fmt: skip
    lines = []
    for n in sorted({r["n"] for r in results}):
        ours, flex = at.get((n, "w", "ours")), at.get((n, "w", "flex (compiled)"))
        spares = [
            r for r in results if r["n"] == n and r["variant"] == "w" and "spare" in r["contender"]
        ]
        low = min(spares, key=lambda r: r["peak_mib"], default=None)

        def ratio(a, b):
            return f"{a['median_ms'] / b['median_ms']:.2f}x" if a and b else "-"

        # dilated against undilated measured in the same rounds (ours, dilation 1)
        d2, d4 = at.get((n, "dilation 2", "ours")), at.get((n, "dilation 4", "ours"))
        u2, u4 = (at.get((n, f"dilation {d}", "ours, dilation 1")) for d in (2, 4))
        mem = lambda r: f"{r['peak_mib']:.1f}" if r else "-"  # noqa: E731
        low_cell = f"{mem(low)}, {ratio(low, ours)}" if low else "-"
        lines.append([
            n, ratio(flex, ours), ratio(d2, u2), ratio(d4, u4), f"{output_bytes(n) / 2**20:.1f}",
            mem(ours), low_cell, mem(flex),
        ])  # fmt: skip
    return markdown_table(head, lines)


def plot(results, path):
    plt = pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = sorted(
        {r["contender"] for r in results if r["variant"] == "w" and "chunks" not in r["contender"]}
    )
    for name in names:
        rows = sorted(
            (r for r in results if r["contender"] == name and r["variant"] == "w"),
            key=lambda r: r["n"],
        )
        ns = [r["n"] for r in rows]
        ax_t.plot(ns, [r["median_ms"] for r in rows], "o-", label=name)
        ax_m.plot(ns, [r["peak_mib"] for r in rows], "o-", label=name)
    for ax, ylabel in ((ax_t, "forward time (ms)"), (ax_m, "peak RSS above start (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle("Local attention, w=256, 12 heads, d=64: time and memory vs N")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


if __name__ == "__main__":
    main()
