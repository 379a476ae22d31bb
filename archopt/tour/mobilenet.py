"""Tour sections for the lecture's first technique: depthwise separable convolution."""

from __future__ import annotations

from pathlib import Path

import torch

from archopt import references as ref
from archopt.measure import count_params, format_table, layer_table, measure_model
from archopt.optimize import optimize_for_inference
from archopt.pareto import pareto_front
from archopt.registry import create_model
from archopt.report import markdown_table, pyplot, save_figure
from archopt.tour.common import Claim, Section, tour_log


def check_table1(rows) -> tuple[int, list[str]]:
    """Rows of our table equal to the lecture's (errata applied); notes on every difference."""
    ours = [(r.type_stride, r.filter_shape, r.input_size) for r in rows]
    lecture = list(ref.MOBILENET_V1_TABLE1[:-1])  # the model returns logits: no softmax row
    notes, matched = [], 0
    for i, (mine, theirs) in enumerate(zip(ours, lecture)):
        fixed = ref.MOBILENET_V1_TABLE1_ERRATA.get(i, theirs)
        if mine == fixed:
            matched += 1
            if fixed != theirs:
                notes.append(f"row {i + 1}: lecture prints {theirs}, the network has {mine}")
        else:
            notes.append(f"row {i + 1}: lecture {theirs}, ours {mine}")
    if len(ours) != len(lecture):
        notes.append(f"ours has {len(ours)} rows, the lecture {len(lecture)} (without softmax)")
    return matched, notes


def table2_shares(model) -> dict[str, tuple[float, float]]:
    """Share of MACs and of weights (no BN) by layer type, as the paper's Table 2."""
    rows = layer_table(model, (1, 3, 224, 224))
    macs: dict[str, int] = {}
    for r in rows:
        kind = (
            "Conv DW 3x3"
            if "dw" in r.filter_shape
            else "Conv 1x1"
            if r.filter_shape.startswith("1x1")
            else "Conv 3x3"
            if r.type_stride.startswith("Conv")
            else "Fully Connected"
            if r.type_stride.startswith("FC")
            else None
        )
        if kind:
            macs[kind] = macs.get(kind, 0) + r.macs
    params: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            kind = (
                "Conv DW 3x3"
                if m.groups > 1
                else "Conv 1x1"
                if m.kernel_size == (1, 1)
                else "Conv 3x3"
            )
        elif isinstance(m, torch.nn.Linear):
            kind = "Fully Connected"
        else:
            continue
        params[kind] = params.get(kind, 0) + sum(p.numel() for p in m.parameters(recurse=False))
    tm, tp = sum(macs.values()), sum(params.values())
    return {k: (100 * macs[k] / tm, 100 * params[k] / tp) for k in ref.MOBILENET_V1_TABLE2}


def mobilenet_section(
    out: Path, *, threads: int | None, repeats: int, progress: bool, quick: bool = False
) -> Section:
    tour_log("MobileNet v1: architecture table", progress)
    base = create_model("mobilenet_v1_100")
    rows = layer_table(base, (1, 3, 224, 224))
    matched, notes = check_table1(rows)
    t2 = table2_shares(base)

    variants = [
        (
            "conv_mobilenet_v1_100",
            "conv_mobilenet_v1_100",
            {},
            224,
            ref.MOBILENET_V1_TABLE4["conv_mobilenet"],
        ),
        *[
            (
                f"mobilenet_v1 a={a}",
                "mobilenet_v1_100",
                {"width_mult": a},
                224,
                ref.MOBILENET_V1_TABLE6[a],
            )
            for a in ref.MOBILENET_V1_TABLE6
        ],
        *[
            (f"mobilenet_v1 a=1.0 r={r}", "mobilenet_v1_100", {}, r, ref.MOBILENET_V1_TABLE7[r])
            # Quick mode keeps one resolution: enough to show the multiplier, a third the time.
            for r in (list(ref.MOBILENET_V1_TABLE7)[-1:] if quick else ref.MOBILENET_V1_TABLE7)
            if r != 224
        ],
    ]
    results = []
    for i, (label, name, overrides, res, paper) in enumerate(variants):
        tour_log(f"MobileNet v1: measuring {label} ({i + 1}/{len(variants)})", progress)
        model = create_model(name, **overrides).eval()
        shape = (1, 3, res, res)
        eager = measure_model(model, shape, name=label, threads=threads, repeats=repeats)
        fast = optimize_for_inference(model, torch.randn(shape))
        opt = measure_model(
            fast, shape, name=label, threads=threads, repeats=repeats, counted_model=model
        )
        results.append(
            {
                "label": label,
                "resolution": res,
                "paper_mmacs": paper[0],
                "paper_mparams": paper[1],
                "macs": eager.macs,
                "params": eager.params,
                "params_no_bn": count_params(model, norm=False),
                "latency_ms": eager.latency_ms,
                "latency_optimized_ms": opt.latency_ms,
                "peak_memory_bytes": eager.peak_memory_bytes,
                "threads": eager.threads,
            }
        )

    by_label = {r["label"]: r for r in results}
    conv, ds = by_label["conv_mobilenet_v1_100"], by_label["mobilenet_v1 a=1.0"]
    mac_ratio = conv["macs"] / ds["macs"]
    lat_ratio = conv["latency_optimized_ms"] / ds["latency_optimized_ms"]
    front = pareto_front(
        [(r["macs"], r["latency_optimized_ms"]) for r in results], maximize=(False, False)
    )
    plot = _plot_mobilenet(results, out / "mobilenet_macs_vs_latency.png")

    t1 = format_table(rows, total_params=count_params(base))
    md = [
        "### Table 1: MobileNet v1 1.0-224 body, measured layer by layer",
        f"{matched} of {len(ref.MOBILENET_V1_TABLE1) - 1} rows equal the lecture's Table 1 "
        "(the model returns logits, so there is no softmax row).",
        *[f"- {n}" for n in notes],
        "",
        "```",
        t1,
        "```",
        "",
        "### Table 2: where the work is (share of MACs / of weights)",
        markdown_table(
            [
                "layer type",
                "MACs % (paper)",
                "MACs % (ours)",
                "params % (paper)",
                "params % (ours)",
            ],
            [
                [
                    k,
                    ref.MOBILENET_V1_TABLE2[k][0],
                    f"{v[0]:.2f}",
                    ref.MOBILENET_V1_TABLE2[k][1],
                    f"{v[1]:.2f}",
                ]
                for k, v in t2.items()
            ],
        ),
        "",
        "### Tables 4, 6, 7: full conv vs depthwise separable, width and resolution multipliers",
        f"Batch 1, {ds['threads']} threads, {torch.__version__}. Latency is the median; "
        "'optimized' is `optimize_for_inference` (BN folded, layout chosen by measurement).",
        "",
        markdown_table(
            [
                "model",
                "MMACs paper",
                "MMACs ours",
                "M params paper",
                "M params ours",
                "latency ms",
                "optimized ms",
                "ms per GMAC",
                "peak MiB",
            ],
            [
                [
                    r["label"],
                    r["paper_mmacs"],
                    f"{r['macs'] / 1e6:.1f}",
                    r["paper_mparams"],
                    f"{r['params'] / 1e6:.2f}",
                    f"{r['latency_ms']:.2f}",
                    f"{r['latency_optimized_ms']:.2f}",
                    f"{r['latency_optimized_ms'] / (r['macs'] / 1e9):.1f}",
                    f"{r['peak_memory_bytes'] / 2**20:.1f}",
                ]
                for r in results
            ],
        ),
        "",
        f"**Claim: depthwise separable convolution cuts the work about 8-9x.** MACs: "
        f"{mac_ratio:.2f}x fewer. Measured latency here: {lat_ratio:.2f}x faster. Depthwise "
        "convolutions do little arithmetic per byte moved, so the time saved is smaller than "
        "the MACs saved: judge on the latency axis, not on MACs alone.",
        "",
        "Smaller variants cost more time per MAC (the 'ms per GMAC' column): halving the "
        "MACs does not halve the latency. Pareto front on (MACs, latency) alone: "
        + ", ".join(results[i]["label"] for i in front)
        + ". With both axes 'lower is better' the smallest model always wins; the front "
        "becomes a real choice only with accuracy as a third axis: see the trained "
        "accuracy fronts in the MobileViT section.",
    ]
    if plot:
        md += ["", f"![MACs vs latency]({plot.name})"]
    half = by_label.get("mobilenet_v1 a=0.5")
    claims = [
        Claim(
            "Depthwise separable convolution cuts MACs about 8-9x (MobileNet vs full-conv twin)",
            f"{mac_ratio:.2f}x fewer MACs",
            8.0 <= mac_ratio <= 9.5,
            "MACs ratio in [8, 9.5]",
        ),
        Claim(
            "... but not latency by the same factor (depthwise convolution is memory bound)",
            f"{lat_ratio:.2f}x faster (optimized, batch 1) vs {mac_ratio:.2f}x fewer MACs",
            lat_ratio < mac_ratio,
            "latency ratio < MACs ratio",
        ),
    ]
    if half:
        q = ds["macs"] / half["macs"]
        claims.append(
            Claim(
                "The width multiplier alpha cuts MACs roughly by alpha^2 (alpha=0.5: about 4x)",
                f"{q:.2f}x fewer MACs at alpha=0.5",
                3.0 <= q <= 4.5,
                "MACs ratio in [3, 4.5]",
            )
        )
    return Section(
        title="Depthwise separable convolution and MobileNet v1",
        markdown="\n".join(md),
        data={
            "table1_rows_matched": matched,
            "table1_notes": notes,
            "table2": t2,
            "variants": results,
            "mac_ratio_conv_over_ds": mac_ratio,
            "latency_ratio_conv_over_ds": lat_ratio,
            "pareto_front": [results[i]["label"] for i in front],
        },
        plots=[plot.name] if plot else [],
        claims=claims,
    )


def _plot_mobilenet(results: list[dict], path: Path) -> Path | None:
    try:
        plt = pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r["macs"] / 1e6 for r in results]
    ys = [r["latency_optimized_ms"] for r in results]
    ax.scatter(xs, ys)
    for x, y, r in zip(xs, ys, results):
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    # If time followed MACs, every point would sit on this line through MobileNet 1.0-224.
    anchor = next(r for r in results if r["label"] == "mobilenet_v1 a=1.0")
    per_mac = anchor["latency_optimized_ms"] / (anchor["macs"] / 1e6)
    line = [min(xs), max(xs)]
    ax.plot(line, [x * per_mac for x in line], "r--", label="latency proportional to MACs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MMACs (log)")
    ax.set_ylabel("latency, batch 1 (ms, log)")
    ax.set_title("MobileNet v1 variants: MACs vs measured latency")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
