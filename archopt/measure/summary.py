"""One call that measures a model the way every report and the CLI show it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from archopt.measure.counting import count_macs, count_params
from archopt.measure.timing import measure_latency, measure_peak_memory


@dataclass
class ModelMeasurement:
    name: str
    input_shape: tuple[int, ...]
    params: int
    macs: int
    latency_ms: float
    latency_p10_ms: float
    latency_p90_ms: float
    peak_memory_bytes: int
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    name: str = "",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 20,
    counted_model: nn.Module | None = None,
) -> ModelMeasurement:
    """Params, MACs, latency and peak memory of ``model`` on a random input of ``input_shape``.

    ``counted_model``: count params and MACs on this module instead (an optimized or compiled
    model computes the same function but may hide its structure from the counters).
    """
    counted = counted_model if counted_model is not None else model
    x = torch.randn(input_shape)
    model.eval()
    lat = measure_latency(model, x, warmup=warmup, repeats=repeats, threads=threads)
    mem = measure_peak_memory(model, x)
    return ModelMeasurement(
        name=name,
        input_shape=tuple(input_shape),
        params=count_params(counted),
        macs=count_macs(counted, input_shape),
        latency_ms=lat.median_ms,
        latency_p10_ms=lat.p10_ms,
        latency_p90_ms=lat.p90_ms,
        peak_memory_bytes=mem.bytes,
        threads=lat.threads,
    )
