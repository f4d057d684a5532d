"""Pareto plot: latency (x) against the metric (y); marker area is the file size."""

from __future__ import annotations

import io as _io
from pathlib import Path


def pareto_plot(result, path: str | Path) -> None:
    """Write a PNG of latency p50 vs metric, one labelled point per stage, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = [s for s in result.stages if s.metrics.get("latency_ms_p50") is not None]
    xs = [s.metrics["latency_ms_p50"] for s in stages]
    ys = [s.metrics["metric"] for s in stages]
    sizes = [s.metrics["size_bytes"] for s in stages]
    biggest = max(sizes) if sizes else 1
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.scatter(xs, ys, s=[60 + 900 * b / biggest for b in sizes], alpha=0.5, edgecolors="black")
    for s, x, y in zip(stages, xs, ys):
        ax.annotate(s.name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    front = _pareto_front(list(zip(xs, ys)))
    if len(front) > 1:
        ax.plot(*zip(*front), linestyle="--", color="gray", linewidth=1)
    ax.set_xlabel(f"latency p50 (ms, ONNX Runtime, {result.runtime.get('threads')} thread)")
    ax.set_ylabel(result.metric_name)
    ax.set_title("edgeslim: metric vs latency (marker area = file size)")
    ax.grid(alpha=0.3)
    save_png(fig, path)


def save_png(fig, path: str | Path) -> None:
    """Write a matplotlib figure as PNG atomically (rendered in memory first), then close it."""
    import matplotlib.pyplot as plt

    from edgeslim import io

    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    io.write_bytes(path, buf.getvalue())


def _pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another that is both faster and at least as good, sorted by latency."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front
