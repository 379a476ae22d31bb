"""Latency predictor: whole-model latency from a per-layer table measured on this machine.

nn-Meter's idea (Zhang et al., 2021, "nn-Meter: Towards Accurate Latency Prediction of Deep-
Learning Model Inference on Diverse Edge Devices", MobiSys): a model runs as a sequence of
kernels, so time each kernel once and add them up. Here a kernel is the outermost module of a
block type archopt builds networks from (``KERNEL_TYPES``: a conv + BN + activation, a
depthwise separable or inverted residual block, a MobileViT block, a Longformer layer, a
linear layer, a pooling ...), keyed by everything that decides its cost: its structure
(``repr``), its scalar settings (window, dilation, ...), its input shapes and the number of
global tokens. Each key is timed in isolation, on the module itself with the inputs it got
inside the network, the first time any candidate needs it, and kept in a JSON table in
archopt's cache folder (one table per CPU, torch version and thread count). What the kernels do
not cover (the containers' calls, a flatten, the Python around them) is a calibration
``measured = a * sum`` (the median ratio) fitted per space on a few candidates measured whole;
the candidates a search then predicts are held out from that fit, and the search measures
every one of them to report how close the prediction was.

Latency here is the fastest of the timed repeats, for the kernels and for whole models alike:
on a machine shared with other work the median moves with the others' load, the minimum much
less (the median and p90 are kept beside it). Not enough on a shared host, though: there the
same kernel can time 2x slower, fastest of 20 both times, a minute apart, so an entry can be
timed again (``LatencyTable.remeasure``, ``LatencyPredictor.add_round``) and keeps the fastest
of its rounds; ``archopt bench predictor --rounds`` does that for the table and the whole
models alike.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from archopt.io import atomic_write_text, cache_dir, writable_cache_dir
from archopt.measure import cpu_name, measure_latency, num_threads
from archopt.models.longformer import LongformerLayer
from archopt.models.mobilevit import MobileViTBlock
from archopt.ops.conv import ConvNormAct, DepthwiseSeparableConv2d
from archopt.ops.inverted_residual import InvertedResidual
from archopt.ops.transformer import TransformerLayer

KERNEL_TYPES: tuple[type[nn.Module], ...] = (
    MobileViTBlock,
    InvertedResidual,
    DepthwiseSeparableConv2d,
    ConvNormAct,
    LongformerLayer,
    TransformerLayer,
    nn.Conv2d,
    nn.Linear,
    nn.LayerNorm,
    nn.BatchNorm2d,
    nn.AdaptiveAvgPool2d,
    nn.AvgPool2d,
    nn.MaxPool2d,
)
CACHE_SUB = "latency"
TABLE_VERSION = 1


@dataclass
class KernelCall:
    key: str
    desc: str
    module: nn.Module
    args: tuple


def _scalars(module: nn.Module) -> str:
    """Settings that change a module's cost without showing in its repr (window, dilation)."""
    parts = []
    for name, m in module.named_modules():
        attrs = {
            k: v
            for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (int, float, str, tuple))
        }
        if attrs:
            parts.append(f"{name}:{sorted(attrs.items())!r}")
    return ";".join(parts)


def _arg_signature(a) -> str:
    if isinstance(a, torch.Tensor):
        extra = f":{int(a.sum())}" if a.dtype == torch.bool else ""
        return f"{tuple(a.shape)}:{a.dtype}{extra}"
    return repr(a)


def _clone(a):
    return a.detach().clone() if isinstance(a, torch.Tensor) else a


def kernel_calls(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[KernelCall]:
    """The kernels one forward pass of ``model`` runs, outermost first, in execution order."""
    calls: list[KernelCall] = []
    depth = [0]

    def pre(mod, args):
        if depth[0] == 0:
            sig = f"{mod!r}|{_scalars(mod)}|{','.join(map(_arg_signature, args))}"
            key = hashlib.sha1(sig.encode()).hexdigest()[:20]
            shapes = ",".join(_arg_signature(a) for a in args if isinstance(a, torch.Tensor))
            desc = f"{type(mod).__name__} {shapes}"
            calls.append(KernelCall(key, desc, mod, tuple(_clone(a) for a in args)))
        depth[0] += 1

    def post(mod, args, out):
        depth[0] -= 1

    handles = []
    for m in model.modules():
        if isinstance(m, KERNEL_TYPES):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post, always_call=True))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def machine_key(threads: int) -> dict:
    return {"cpu": cpu_name(), "torch": torch.__version__, "threads": threads}


def _table_path(threads: int) -> Path | None:
    folder = writable_cache_dir(CACHE_SUB)
    if folder is None:
        return None
    digest = hashlib.sha1(json.dumps(machine_key(threads), sort_keys=True).encode()).hexdigest()
    return folder / f"table-{digest[:12]}.json"


class LatencyTable:
    """Kernel key -> measured milliseconds on this machine, plus per-space calibrations.

    Kept in ``archopt.io.cache_dir()/latency`` (one file per CPU, torch version and thread
    count), read at start and written back atomically after every new entry; in memory only
    when the cache folder cannot be written.
    """

    def __init__(self, threads: int | None = None, *, path: Path | None = None) -> None:
        self.threads = threads or torch.get_num_threads()
        self.path = path if path is not None else _table_path(self.threads)
        self.kernels: dict[str, dict] = {}
        self.calibrations: dict[str, dict] = {}
        self.measured_now = 0  # entries this process had to measure
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError):
                data = {}  # a damaged cache entry is rebuilt, never trusted
            if data.get("version") == TABLE_VERSION and data.get("machine") == machine_key(
                self.threads
            ):
                self.kernels = dict(data.get("kernels", {}))
                self.calibrations = dict(data.get("calibrations", {}))

    def save(self) -> None:
        if self.path is None:
            return
        on_disk = {}
        with contextlib.suppress(OSError, json.JSONDecodeError):
            on_disk = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if on_disk.get("machine") == machine_key(self.threads):  # keep what others added
            self.kernels = {**on_disk.get("kernels", {}), **self.kernels}
            self.calibrations = {**on_disk.get("calibrations", {}), **self.calibrations}
        data = {
            "version": TABLE_VERSION,
            "machine": machine_key(self.threads),
            "kernels": self.kernels,
            "calibrations": self.calibrations,
        }
        with contextlib.suppress(OSError):
            atomic_write_text(self.path, json.dumps(data, indent=1, sort_keys=True) + "\n")

    def kernel_ms(self, call: KernelCall, *, repeats: int = 20) -> float:
        entry = self.kernels.get(call.key)
        if entry is None:
            entry = self._add_round(call, repeats)
        return entry["ms"]

    def remeasure(self, call: KernelCall, *, repeats: int = 20) -> float:
        """Time ``call`` once more and keep the fastest of all its rounds (see ``rounds``)."""
        return self._add_round(call, repeats)["ms"]

    def _add_round(self, call: KernelCall, repeats: int) -> dict:
        lat = measure_latency(
            call.module, call.args, warmup=3, repeats=repeats, threads=self.threads
        )
        old = self.kernels.get(call.key)
        rounds = [*(old.get("rounds", [old["ms"]]) if old else []), lat.min_ms]
        entry = {
            "ms": min(rounds),
            "rounds": rounds,
            "median_ms": lat.median_ms,
            "p90_ms": lat.p90_ms,
            "desc": call.desc,
            "measured": time.strftime("%Y-%m-%d %H:%M"),
        }
        self.kernels[call.key] = entry
        self.measured_now += 1
        return entry


@dataclass
class Prediction:
    ms: float  # calibrated prediction of the whole model
    kernel_sum_ms: float  # the table's sum, before calibration
    kernels: int  # kernel calls in one forward pass
    new_entries: int  # of them measured now (not found in the table)
    keys: tuple[str, ...] = ()  # the table entries summed, in execution order


class LatencyPredictor:
    """Predict batch-1 latency of a model from the table; ``calibrate`` once per space."""

    def __init__(self, table: LatencyTable | None = None, *, threads: int | None = None) -> None:
        self.table = table if table is not None else LatencyTable(threads)
        self.a, self.b = 1.0, 0.0
        self.calibration: dict | None = None

    @property
    def threads(self) -> int:
        return self.table.threads

    def kernel_sum(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Prediction:
        before = self.table.measured_now
        with num_threads(self.threads):
            calls = kernel_calls(model, inputs)
            total = sum(self.table.kernel_ms(c) for c in calls)
        new = self.table.measured_now - before
        if new:
            self.table.save()
        return Prediction(total, total, len(calls), new, tuple(c.key for c in calls))

    def add_round(
        self,
        model: nn.Module,
        inputs: tuple[torch.Tensor, ...],
        *,
        done: set[str] | None = None,
        repeats: int = 20,
    ) -> Prediction:
        """Time every kernel of ``model`` once more; each entry keeps its fastest round.
        ``done``: keys already timed in this round (skipped, and the new ones added), so a
        round over many models times a kernel they share once."""
        done = set() if done is None else done
        with num_threads(self.threads):
            calls = kernel_calls(model, inputs)
            for c in calls:
                if c.key not in done:
                    self.table.remeasure(c, repeats=repeats)
                    done.add(c.key)
        self.table.save()
        total = sum(self.table.kernel_ms(c) for c in calls)
        keys = tuple(c.key for c in calls)
        return Prediction(self.a * total + self.b, total, len(calls), 0, keys)

    def sum_ms(self, keys) -> float:
        """The table's sum over ``keys`` (a ``Prediction.keys``) as it stands now."""
        return sum(self.table.kernels[k]["ms"] for k in keys)

    def predict(self, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Prediction:
        p = self.kernel_sum(model, inputs)
        p.ms = self.a * p.kernel_sum_ms + self.b
        return p

    def calibrate(self, name: str, models, *, repeats: int = 20) -> dict:
        """Fit ``measured = a * kernel_sum`` (the median ratio) on ``models``, a list of
        ``(model, inputs)``, or reuse the fit stored under ``name``; returns the calibration."""
        stored = self.table.calibrations.get(name)
        if stored is None:
            sums, measured = [], []
            for model, inputs in models:
                sums.append(self.kernel_sum(model, inputs).kernel_sum_ms)
                lat = measure_latency(
                    model, inputs, warmup=3, repeats=repeats, threads=self.threads
                )
                measured.append(lat.min_ms)
            # A ratio, not a line: with a handful of noisy timings an intercept can come out
            # anywhere (negative predictions); the median ratio cannot.
            ratios = [m / s for s, m in zip(sums, measured) if s > 0]
            a, b = (float(np.median(ratios)) if ratios else 1.0), 0.0
            stored = {
                "a": a,
                "b": b,
                "kernel_sum_ms": sums,
                "measured_ms": measured,
                "fitted": time.strftime("%Y-%m-%d %H:%M"),
            }
            self.table.calibrations[name] = stored
            self.table.save()
        self.a, self.b = stored["a"], stored["b"]
        self.calibration = stored
        return stored


def check_predictions(predicted: list[float], measured: list[float]) -> dict:
    """Share of predictions within +-10% of the measured latency, and Spearman's rank rho."""
    from scipy.stats import spearmanr

    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    if len(p) == 0:
        return {"n": 0, "within_10pct": None, "spearman": None, "median_abs_error": None}
    rel = np.abs(p - m) / m
    rho = float(spearmanr(p, m).statistic) if len(p) >= 3 and np.ptp(m) > 0 else None
    return {
        "n": len(p),
        "within_10pct": float(np.mean(rel <= 0.10)),
        "spearman": rho,
        "median_abs_error": float(np.median(rel)),
        "max_abs_error": float(rel.max()),
    }


def table_folder() -> Path:
    return cache_dir() / CACHE_SUB


__all__ = [
    "KERNEL_TYPES",
    "KernelCall",
    "LatencyPredictor",
    "LatencyTable",
    "Prediction",
    "check_predictions",
    "kernel_calls",
    "table_folder",
]
