"""Tables of a run: one row per stage, with gains relative to the baseline."""

from __future__ import annotations

from typing import Any, Iterable, Sequence

COLUMNS = [
    # (header, key, format)
    ("stage", "name", "{}"),
    ("{metric}", "metric", "{:.4f}"),
    ("Δ", "metric_delta", "{:+.4f}"),
    ("size", "size_bytes", "_bytes"),
    ("×smaller", "size_ratio_vs_baseline", "{:.2f}×"),
    ("params", "params", "{:,}"),
    ("MACs", "macs", "_count"),
    ("p50 ms", "latency_ms_p50", "{:.3f}"),
    ("p90 ms", "latency_ms_p90", "{:.3f}"),
    ("p99 ms", "latency_ms_p99", "{:.3f}"),
    ("×faster", "speedup_vs_baseline", "{:.2f}×"),
    ("int8 ops", "int8_op_fraction", "{:.0%}"),
    ("peak mem", "peak_memory_bytes", "_bytes"),
    ("step s", "step_seconds", "{:.1f}"),
]


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "–"
    if spec == "_bytes":
        for unit in ("B", "KB", "MB", "GB"):
            if abs(value) < 1024 or unit == "GB":
                return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
            value /= 1024
    if spec == "_count":
        for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
            if value >= div:
                return f"{value / div:.1f}{unit}"
        return str(value)
    return spec.format(value)


# The terminal shows the columns a reader compares first; report.md has them all.
TERMINAL_KEYS = ("name", "metric", "metric_delta", "size_bytes", "size_ratio_vs_baseline", "latency_ms_p50",
                 "latency_ms_p99", "speedup_vs_baseline", "int8_op_fraction", "peak_memory_bytes")


def _rows(result, keys: tuple[str, ...] | None = None) -> tuple[list[str], list[list[str]]]:
    extra = [(name, name, "{:.4f}") for name in result.extra_metrics]  # beside the metric
    columns = [c for c in COLUMNS[:3] + extra + COLUMNS[3:] if keys is None or c[1] in keys or c in extra]
    headers = [h.format(metric=result.metric_name) for h, _, _ in columns]
    rows = []
    for s in result.stages:
        data = {"name": s.name, **s.metrics}
        rows.append([_fmt(data.get(key), spec) for _, key, spec in columns])
    return headers, rows


def table_lines(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A markdown table as lines: the header row, the ``|---|`` rule, one line per row of cells."""
    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def lengths_text(summary: dict[str, Any]) -> str:
    """The sequence lengths latency was timed at, in words, from ``runtime.measured_seq_lens``."""
    if summary.get("source") == "eval":
        return (f"evaluation samples at their own lengths (median {summary['p50']:g}, "
                f"{summary['min']}–{summary['max']} tokens, {summary['feeds']} inputs in turn)")
    return "sequence length" + ("s " if len(summary["lengths"]) > 1 else " ") + ", ".join(map(str, summary["lengths"]))


def markdown_table(result) -> str:
    """The run's ``report.md``: a table with one row per stage and the measuring conditions."""
    headers, rows = _rows(result)
    lines = ["# edgeslim run", "", *table_lines(headers, rows)]
    rt, mc = result.runtime, result.machine
    lines += [
        "",
        f"Baseline: `{result.baseline}`. ×smaller and ×faster are relative to it; latency is ONNX Runtime "
        f"{rt.get('onnxruntime')} on {rt.get('provider')}, {rt.get('threads')} intra-op thread(s), batch "
        f"{rt.get('batch_size')}{', denormals flushed to zero' if rt.get('flush_denormals') else ''}"
        f"{', ' + lengths_text(rt['measured_seq_lens']) if rt.get('measured_seq_lens') else ''}, "
        f"{rt.get('runs')} timed runs after {rt.get('warmup')} warm-up, all stages "
        f"interleaved in one process. int8 ops: share of compute ops (Conv/MatMul/Gemm families) that run as "
        f"integer kernels in the ORT-optimized graph. Machine: {mc.get('cpu')} ({mc.get('cpu_count')} cores).",
        "",
    ]
    for s in result.stages:
        by_len = s.metrics.get("latency_ms_p50_by_seq_len")
        if by_len:
            lines.append(f"- `{s.name}`: p50 ms by sequence length: "
                         + ", ".join(f"{n}: {ms:.3f}" for n, ms in by_len.items()))
    for s in result.stages:
        fp = s.metrics.get("fp_compute_nodes") or []
        if s.technique and fp:
            lines.append(f"- `{s.name}`: compute nodes still in float: {', '.join(fp[:10])}"
                         + (" …" if len(fp) > 10 else ""))
        # a step's warnings for people (``notes["warnings"]``, e.g. a budget finer than its data resolves)
        lines += [f"- `{s.name}`: **warning**: {w}" for w in s.metrics.get("note_warnings") or []]
    return "\n".join(lines) + "\n"


def rich_table(result):
    """The same table for the terminal."""
    from rich.table import Table

    headers, rows = _rows(result, TERMINAL_KEYS)
    table = Table(title=f"edgeslim — {result.metric_name}, latency on ONNX Runtime ({result.runtime.get('threads')} thread)")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    return table
