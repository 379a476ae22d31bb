"""Accuracy against cost for several models: train (or reuse) each, measure, find the fronts.

``pareto_study(["mobilenet_v1_025", "mobilevit_xxs"], data="digits", epochs=5)`` trains every
model on the same data with the same recipe (or reads the finished run from ``out_dir``),
measures params, MACs, batch-1 latency and peak memory on this machine, and writes a table
(``pareto.csv``, ``pareto.json``) and one front plot per cost axis. The MACs front and the
latency front are always both drawn, because they can differ: depthwise convolutions are
memory bound, so a model can win on MACs and lose on measured time.

A model may carry config overrides after colons: ``mobilenet_v1_100:width_mult=0.35`` or
``vit_tiny_patch16_224:depth=4:patch_size=4``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from archopt.io import atomic_write_text
from archopt.pareto import pareto_front, plot_front
from archopt.report import log
from archopt.train.data import load_data, parse_data_spec
from archopt.train.loop import train

# --x choice -> (column, axis label); all are costs, so minimized.
X_AXES = {
    "macs": ("macs", "MACs per image"),
    "latency": ("latency_ms", "latency, batch 1 (ms)"),
    "params": ("params", "parameters"),
    "memory": ("peak_memory_bytes", "peak memory, batch 1 (bytes)"),
}
# --y choice -> (column, axis label); maximized.
Y_AXES = {"accuracy": ("top1", "validation top-1")}
OUTPUTS = ("pareto.csv", "pareto.json")
COLUMNS = (
    "name",
    "model",
    "top1",
    "params",
    "macs",
    "latency_ms",
    "latency_p10_ms",
    "latency_p90_ms",
    "peak_memory_bytes",
    "train_time_s",
    "epochs",
    "resolution",
    "bf16",
)


def parse_model_spec(spec: str) -> tuple[str, dict]:
    """``name:key=value:key=value`` as (name, overrides); values parsed as JSON when they can."""
    name, *items = spec.strip().split(":")
    if not name:
        raise ValueError(f"a model spec must start with a model name, got {spec!r}")
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ValueError(
                f"model overrides must look like name:key=value, got {item!r} in {spec!r}"
            )
        key, raw = item.split("=", 1)
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return name, overrides


def _check_models(specs, parsed, images, epochs, batch_size, optimizer, lr, bf16, seed) -> None:
    """Every model with its overrides, and the recipe, before any model trains: each is built
    on the meta device (no memory, no time), so a bad override in the last spec does not cost
    the first model's training."""
    from archopt.train.build import build_model
    from archopt.train.config import TrainConfig

    for spec, (name, overrides) in zip(specs, parsed):
        cfg = TrainConfig(
            name, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, bf16=bf16,
            seed=seed, model_overrides=overrides,
        )  # fmt: skip
        try:
            with torch.device("meta"):
                build_model(cfg, images)
        except (ValueError, TypeError) as e:  # TypeError: an override of the wrong type
            raise ValueError(f"model {spec!r}: {e}") from e


def _run_dir_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec)


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def pareto_study(
    models: Sequence[str],
    *,
    data: str = "digits",
    epochs: int = 5,
    x: str = "macs",
    y: str = "accuracy",
    out_dir: str | os.PathLike = "archopt-pareto",
    batch_size: int = 64,
    optimizer: str = "sgd",
    lr: float | None = None,
    resolution: int | None = None,
    channels: int | None = None,
    seed: int = 0,
    bf16: str = "auto",
    threads: int | None = None,
    repeats: int = 20,
    logx: bool = False,
    progress: bool | None = None,
    verbose: bool = True,
) -> dict:
    """Train or reuse, measure, and write the table and plots; returns what ``pareto.json`` holds.

    Runs live in ``out_dir/runs/<model spec>``; a finished one is read back, an interrupted
    one resumed, so rerunning with more models only trains the new ones. Changing the recipe
    (epochs, lr, ...) for an existing run is an error: choose another ``out_dir``.
    """
    from archopt.measure import cpu_name, measure_model
    from archopt.registry import get_model_fn

    if x not in X_AXES:
        raise ValueError(f"x must be one of {sorted(X_AXES)}, got {x!r}")
    if y not in Y_AXES:
        raise ValueError(f"y must be one of {sorted(Y_AXES)}, got {y!r}")
    specs = [m.strip() for m in models if m.strip()]
    if not specs:
        raise ValueError("pareto_study needs at least one model, got none")
    try:  # the plots come after every training: find out now that they cannot
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(
            "pareto_study writes its fronts as plots, which needs matplotlib: pip install "
            "'archopt[plot]'"
        ) from None
    if len(set(specs)) != len(specs):
        raise ValueError(f"each model may appear once, got {specs}")
    parsed = [parse_model_spec(s) for s in specs]
    for name, _ in parsed:  # a typo in the last name should not cost every training first
        get_model_fn(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    axes = list(dict.fromkeys([x, "macs", "latency"]))
    # A failed study must not leave an older table looking like this one's result.
    for stale in (*OUTPUTS, *(f"pareto_{a}.png" for a in X_AXES)):
        (out / stale).unlink(missing_ok=True)

    images = load_data(parse_data_spec(data), resolution=resolution, channels=channels)
    _check_models(specs, parsed, images, epochs, batch_size, optimizer, lr, bf16, seed)
    rows = []
    for spec, (name, overrides) in zip(specs, parsed):
        log(f"[pareto] {spec}: training (or reading) ...", verbose)
        result = train(
            name,
            images,
            epochs=epochs,
            batch_size=batch_size,
            optimizer=optimizer,
            lr=lr,
            resolution=images.resolution,
            channels=images.in_chans,
            model_overrides=overrides,
            bf16=bf16,
            seed=seed,
            out_dir=out / "runs" / _run_dir_name(spec),
            resume=True,
            progress=progress,
            verbose=verbose,
        )
        model = result.model.to("cpu").eval()
        shape = (1, images.in_chans, images.resolution, images.resolution)
        log(f"[pareto] {spec}: measuring {shape} ...", verbose)
        m = measure_model(model, shape, name=spec, threads=threads, repeats=repeats)
        rows.append(
            {
                "name": spec,
                "model": name,
                "overrides": overrides,
                "top1": result.top1,
                "params": m.params,
                "macs": m.macs,
                "latency_ms": m.latency_ms,
                "latency_p10_ms": m.latency_p10_ms,
                "latency_p90_ms": m.latency_p90_ms,
                "peak_memory_bytes": m.peak_memory_bytes,
                "train_time_s": result.time_s,
                "epochs": result.epochs_done,
                "resolution": images.resolution,
                "bf16": result.bf16,
                "threads": m.threads,
            }
        )

    y_col, y_label = Y_AXES[y]
    fronts, plots = {}, {}
    for axis in axes:
        col, label = X_AXES[axis]
        idx = pareto_front(rows, {col: "min", y_col: "max"})
        fronts[axis] = [rows[i]["name"] for i in idx]
        path = out / f"pareto_{axis}.png"
        plot_front(
            rows,
            col,
            y_col,
            path,
            logx=logx,
            xlabel=f"{label} (lower is better)",
            ylabel=f"{y_label} (higher is better)",
            title=f"{y_label} vs {label} on {images.name}, {epochs} epochs",
        )
        plots[axis] = path.name
    differ = sorted(set(fronts["macs"]) ^ set(fronts["latency"]))
    report = {
        "data": images.describe(),
        "settings": {
            "epochs": epochs,
            "batch_size": batch_size,
            "optimizer": optimizer,
            "lr": lr,
            "seed": seed,
            "x": x,
            "y": y,
        },
        "environment": {
            "torch": torch.__version__,
            "cpu": cpu_name(),
            "threads": rows[0]["threads"],
        },
        "rows": rows,
        "fronts": fronts,
        "macs_vs_latency_front_differs": differ,
        "plots": plots,
    }
    atomic_write_text(out / "pareto.csv", _csv_text(rows))
    atomic_write_text(out / "pareto.json", json.dumps(report, indent=2, default=float) + "\n")
    return report


def format_study(report: dict) -> str:
    """The study as text: the table, then who is on each front."""
    w = max(len("model"), *(len(r["name"]) for r in report["rows"]))
    head = (
        f"{'model':{w}s} {'top-1':>7s} {'params':>10s} {'MMACs':>9s} {'latency ms':>11s} "
        f"{'peak MiB':>9s}"
    )
    lines = [head]
    for r in report["rows"]:
        lines.append(
            f"{r['name']:{w}s} {r['top1']:7.4f} {r['params']:10,d} {r['macs'] / 1e6:9.2f} "
            f"{r['latency_ms']:11.3f} {r['peak_memory_bytes'] / 2**20:9.2f}"
        )
    lines.append("")
    for axis, names in report["fronts"].items():
        lines.append(f"front under {axis}: {', '.join(names)}")
    differ = report["macs_vs_latency_front_differs"]
    if differ:
        lines.append(
            "the MACs front and the latency front differ (on one, not the other): "
            + ", ".join(differ)
        )
    else:
        lines.append("the MACs front and the latency front hold the same models here")
    lines.append("plots: " + ", ".join(report["plots"].values()))
    return "\n".join(lines)
