"""ONNX export, ONNX Runtime sessions, benchmarks and graph statistics.

This subpackage imports ``torch`` only inside :func:`export_onnx` and :func:`denormals_flushed`, so benchmarking and inspecting
existing ONNX files stays light.
"""

from edgeslim.runtime.bench import (LatencyStats, Workload, benchmark_latency, compare_latency, denormals_flushed,
                                    fixed_lengths, machine_info, own_lengths, peak_memory_bytes)
from edgeslim.runtime.export import export_onnx, validate_outputs
from edgeslim.runtime.inspect import COMPUTE_OPS, INT8_OPS, GraphReport, inspect_optimized, report_graph
from edgeslim.runtime.ort import dummy_feed, input_feed, input_shapes, make_session, parse_shapes, predict, run, with_static_shapes
from edgeslim.runtime.probe import probe_session
from edgeslim.runtime.softmax import bound_softmax_inputs
from edgeslim.runtime.stats import count_macs, count_params, op_histogram, size_bytes

__all__ = [
    "COMPUTE_OPS",
    "INT8_OPS",
    "GraphReport",
    "LatencyStats",
    "Workload",
    "benchmark_latency",
    "bound_softmax_inputs",
    "compare_latency",
    "count_macs",
    "count_params",
    "denormals_flushed",
    "dummy_feed",
    "export_onnx",
    "fixed_lengths",
    "input_feed",
    "input_shapes",
    "inspect_optimized",
    "machine_info",
    "make_session",
    "op_histogram",
    "own_lengths",
    "parse_shapes",
    "peak_memory_bytes",
    "predict",
    "probe_session",
    "report_graph",
    "run",
    "size_bytes",
    "validate_outputs",
    "with_static_shapes",
]
