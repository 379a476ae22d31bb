"""Tour section for MobileViT: the hybrid against ViT and a pure CNN, cost and trained accuracy."""

from __future__ import annotations

from pathlib import Path

from archopt.measure import measure_model
from archopt.optimize import optimize_for_inference
from archopt.registry import create_model
from archopt.report import markdown_table
from archopt.tour.common import Claim, Section, tour_log

# The models trained on the embedded digits: (label, registered name, overrides, optimizer).
# Each family gets its usual optimizer (the papers': SGD for MobileNet, AdamW for ViT and
# MobileViT); with one shared recipe, whichever family it suits wins and the comparison says
# more about the recipe than about the architecture. The ViT is shrunk (patch 8, 6 layers) so
# that a 32x32 image makes 16 tokens and the run fits the tour's budget.
TRAINED = [
    ("mobilevit_xxs", "mobilevit_xxs", {}, "adamw"),
    ("vit d=192 6x patch 8", "vit_tiny_patch16_224", {"depth": 6, "patch_size": 8}, "adamw"),
    ("mobilenet_v1 a=0.5", "mobilenet_v1_050", {}, "sgd"),
    ("mobilenet_v1 a=0.25", "mobilenet_v1_025", {}, "sgd"),
]
QUICK_TRAINED = [
    ("mobilevit_xxs", "mobilevit_xxs", {}, "adamw"),
    ("vit d=192 2x patch 8", "vit_tiny_patch16_224", {"depth": 2, "patch_size": 8}, "adamw"),
    ("mobilenet_v1 a=0.25", "mobilenet_v1_025", {}, "sgd"),
]


def mobilevit_section(
    out: Path, *, threads: int | None, repeats: int, progress: bool, quick: bool = False
) -> Section:
    """The hybrid against its parents: MobileViT vs ViT vs a pure CNN, params, MACs, latency,
    and accuracy after a short training on the embedded digits, with the Pareto fronts."""
    models = [
        ("mobilenet_v1_100", "CNN"),
        ("mobilevit_xxs", "hybrid"),
        *([] if quick else [("mobilevit_xs", "hybrid")]),
        ("mobilevit_s", "hybrid"),
        ("vit_tiny_patch16_224", "ViT"),
    ]
    results = []
    for i, (name, kind) in enumerate(models):
        tour_log(f"MobileViT: measuring {name} ({i + 1}/{len(models)})", progress)
        model = create_model(name).eval()
        (x,) = model.example_inputs(batch=1)
        eager = measure_model(model, tuple(x.shape), name=name, threads=threads, repeats=repeats)
        fast = optimize_for_inference(model, x)
        opt = measure_model(
            fast, tuple(x.shape), name=name, threads=threads, repeats=repeats, counted_model=model
        )
        results.append(
            {
                "model": name,
                "kind": kind,
                "resolution": x.shape[-1],
                "params": eager.params,
                "macs": eager.macs,
                "latency_ms": eager.latency_ms,
                "latency_optimized_ms": opt.latency_ms,
            }
        )
    rows = [
        [
            r["model"],
            r["kind"],
            r["resolution"],
            f"{r['params'] / 1e6:.2f}",
            f"{r['macs'] / 1e9:.2f}",
            f"{r['latency_ms']:.1f}",
            f"{r['latency_optimized_ms']:.1f}",
            f"{r['latency_optimized_ms'] / (r['macs'] / 1e9):.1f}",
        ]
        for r in results
    ]
    by = {r["model"]: r for r in results}
    hybrid, vit = by["mobilevit_s"], by["vit_tiny_patch16_224"]
    md = [
        "Batch 1. MobileViT runs at 256x256 (its native size), the others at 224x224. MACs "
        "include the attention matmuls.",
        "",
        markdown_table(
            [
                "model",
                "kind",
                "input",
                "M params",
                "GMACs",
                "latency ms",
                "optimized ms",
                "ms per GMAC",
            ],
            rows,
        ),
        "",
        "**Claim: at a small parameter budget, mixing convolutions into a ViT is the better "
        f"trade.** At about the same size (mobilevit_s {hybrid['params'] / 1e6:.2f}M params, "
        f"vit_tiny {vit['params'] / 1e6:.2f}M), MobileViT-S does "
        f"{hybrid['macs'] / vit['macs']:.2f}x the MACs of ViT-Tiny and takes "
        f"{hybrid['latency_optimized_ms'] / vit['latency_optimized_ms']:.2f}x its optimized "
        "latency here: the hybrid is not cheaper to run; the paper's case is accuracy per "
        "parameter, measured below.",
        "",
    ]
    study = _accuracy_study(out, threads=threads, repeats=repeats, progress=progress, quick=quick)
    md += study.pop("markdown")
    claims = study.pop("claims")
    return Section(
        title="MobileViT and the ViT baseline",
        markdown="\n".join(md),
        data={"models": results, "trained": study},
        plots=list(study["plots"].values()),
        claims=claims,
    )


def _accuracy_study(
    out: Path, *, threads: int | None, repeats: int, progress: bool, quick: bool
) -> dict:
    """Train each model of TRAINED from scratch, measure it, and find the accuracy fronts."""
    from archopt.pareto import pareto_front, plot_front
    from archopt.train import load_data, parse_data_spec, train

    resolution, epochs = 32, 1 if quick else 6
    trained = QUICK_TRAINED if quick else TRAINED
    images = load_data(parse_data_spec("digits"), resolution=resolution)
    shape = (1, images.in_chans, resolution, resolution)
    rows = []
    for i, (label, name, overrides, optimizer) in enumerate(trained):
        tour_log(f"MobileViT: training {label}, {epochs} epochs ({i + 1}/{len(trained)})", progress)
        result = train(
            name,
            images,
            epochs=epochs,
            optimizer=optimizer,
            resolution=resolution,
            channels=images.in_chans,
            model_overrides=overrides,
            # bf16 autocast on a CPU without native bf16 is slower and noisier; fp32 is the
            # same arithmetic for every model.
            bf16="off",
            seed=0,
            progress=False,
            verbose=False,
        )
        model = result.model.to("cpu").eval()
        m = measure_model(model, shape, name=label, threads=threads, repeats=repeats)
        rows.append(
            {
                "name": label,
                "model": name,
                "overrides": overrides,
                "optimizer": optimizer,
                "top1": result.top1,
                "params": m.params,
                "macs": m.macs,
                "latency_ms": m.latency_ms,
                "train_time_s": result.time_s,
            }
        )
    fronts, plots = {}, {}
    axes = (("macs", "macs", "MACs per image"), ("latency_ms", "latency", "latency, batch 1 (ms)"))
    for col, axis, label in axes:
        fronts[axis] = [rows[i]["name"] for i in pareto_front(rows, {col: "min", "top1": "max"})]
        path = out / f"mobilevit_accuracy_vs_{axis}.png"
        plot_front(
            rows,
            col,
            "top1",
            path,
            logx=True,
            xlabel=f"{label} (lower is better)",
            ylabel="validation top-1 (higher is better)",
            title=f"digits {resolution}x{resolution}, {epochs} epochs: accuracy vs {label}",
        )
        plots[axis] = path.name
    differ = sorted(set(fronts["macs"]) ^ set(fronts["latency"]))

    table = markdown_table(
        ["model", "optimizer", "top-1", "M params", "MMACs", "latency ms", "train s"],
        [
            [
                r["name"],
                r["optimizer"],
                f"{r['top1']:.3f}",
                f"{r['params'] / 1e6:.2f}",
                f"{r['macs'] / 1e6:.1f}",
                f"{r['latency_ms']:.2f}",
                f"{r['train_time_s']:.0f}",
            ]
            for r in rows
        ],
    )
    md = [
        f"### Accuracy after {epochs} epochs from scratch on the embedded digits",
        f"{images.describe()['train_size']} training and {images.describe()['val_size']} "
        f"validation images at {resolution}x{resolution}, batch 64, cosine schedule, seed 0, "
        "fp32. Latency and MACs are for one image at this size. Few epochs and little data: "
        "the ranking is a hint, not a result.",
        "",
        table,
        "",
        f"Pareto front, accuracy vs MACs: {', '.join(fronts['macs'])}. Accuracy vs latency: "
        f"{', '.join(fronts['latency'])}. "
        + (
            "The two fronts differ (" + ", ".join(differ) + "): judging by MACs would pick "
            "another model than judging by measured time."
            if differ
            else "The two fronts hold the same models here."
        ),
        "",
        f"![accuracy vs MACs]({plots['macs']})",
        "",
        f"![accuracy vs latency]({plots['latency']})",
    ]
    by = {r["model"]: r for r in rows}
    hybrid, vit = by["mobilevit_xxs"], by["vit_tiny_patch16_224"]
    cnn = by.get("mobilenet_v1_050") or by["mobilenet_v1_025"]

    def per_mac(r: dict) -> float:
        return r["latency_ms"] / (r["macs"] / 1e6)

    slow, fast = max(rows, key=per_mac), min(rows, key=per_mac)
    spread = per_mac(slow) / per_mac(fast)
    claims = [
        Claim(
            "MobileViT has fewer parameters than a ViT at similar (or better) accuracy",
            f"mobilevit_xxs {hybrid['params'] / 1e6:.2f}M params, top-1 {hybrid['top1']:.3f}; "
            f"{vit['name']} {vit['params'] / 1e6:.2f}M, top-1 {vit['top1']:.3f}",
            hybrid["params"] < vit["params"] and hybrid["top1"] >= vit["top1"] - 0.02,
            "fewer params and top-1 at most 2 points lower",
        ),
        Claim(
            "Adding transformers to a small CNN (MobileViT) beats the pure CNN on accuracy",
            f"mobilevit_xxs top-1 {hybrid['top1']:.3f} ({hybrid['params'] / 1e6:.2f}M params) "
            f"vs {cnn['name']} {cnn['top1']:.3f} ({cnn['params'] / 1e6:.2f}M)",
            hybrid["top1"] > cnn["top1"],
            "higher top-1",
        ),
        Claim(
            "MACs do not predict latency: judge the front on measured time too",
            f"{spread:.1f}x spread in ms per MMAC ({slow['name']} {per_mac(slow):.3f}, "
            f"{fast['name']} {per_mac(fast):.3f}); accuracy fronts "
            + ("differ: " + ", ".join(differ) if differ else "agree here"),
            spread > 2.0,
            "ms per MAC differs > 2x between models",
        ),
    ]
    return {
        "resolution": resolution,
        "epochs": epochs,
        "rows": rows,
        "fronts": fronts,
        "macs_vs_latency_front_differs": differ,
        "plots": plots,
        "markdown": md,
        "claims": claims,
    }
