"""Measurement: parameters, MACs (attention included), per-layer tables, latency, peak memory.

``counting``: params and MACs (at the ATen level); ``table``: the per-layer table (the
MobileNet paper's Table 1); ``timing``: ``measure_latency``, ``interleaved`` (contenders in
shuffled rounds: the one timing loop of the benchmarks), ``measure_peak_memory``;
``summary``: ``measure_model``, all of them at once. Imports ops and models at most.
"""

from archopt.measure.counting import count_macs, count_params, trace_macs
from archopt.measure.summary import ModelMeasurement, measure_model
from archopt.measure.table import LayerRow, format_table, layer_table
from archopt.measure.timing import (
    Latency,
    PeakMemory,
    cpu_name,
    interleaved,
    measure_latency,
    measure_peak_memory,
    num_threads,
)

__all__ = [
    "Latency",
    "LayerRow",
    "ModelMeasurement",
    "PeakMemory",
    "count_macs",
    "count_params",
    "cpu_name",
    "format_table",
    "interleaved",
    "layer_table",
    "measure_latency",
    "measure_model",
    "measure_peak_memory",
    "num_threads",
    "trace_macs",
]
