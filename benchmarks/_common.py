"""Shared plumbing for benchmarks: arguments, the JSON row contract, and the printed table."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROW_KEYS = ("model", "method", "metric_name", "metric", "size_bytes", "latency_ms_p50", "speedup_vs_fp32",
            "int8_op_fraction", "seconds")


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="Small, fast settings (a few minutes on 2 cores).")
    p.add_argument("--data-dir", type=Path, default=None, help="Folder of the real data set (see the script's doc).")
    p.add_argument("--json", type=Path, default=None, help="Write the rows as JSON here.")
    return p


def finish(name: str, rows: list[dict[str, Any]], args: argparse.Namespace, extra: dict[str, Any] | None = None) -> None:
    """Check the row contract, print the rows as a table and write the JSON file (atomically)."""
    from rich.console import Console
    from rich.table import Table

    from edgeslim import io
    from edgeslim.pipeline import machine_info

    for row in rows:
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise KeyError(f"benchmark row {row.get('method')} lacks {missing}")
    keys = list(ROW_KEYS) + [k for k in rows[0] if k not in ROW_KEYS] if rows else list(ROW_KEYS)
    table = Table(title=name)
    for k in keys:
        table.add_column(k, justify="right")
    for row in rows:
        table.add_row(*[_fmt(row.get(k)) for k in keys])
    Console(width=200).print(table)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    doc = {"benchmark": name, "command": command, "machine": machine_info(), "rows": rows, **(extra or {})}
    if args.json is not None:
        io.write_json(args.json, doc)
        print(f"wrote {args.json}")


def run_sections(name: str, args: argparse.Namespace,
                 sections: dict[str, tuple[str, Callable[[argparse.Namespace], list[dict[str, Any]]]]],
                 verdict: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
    """Run the sections ``args.only`` selects (key -> (banner, rows function)) in order, then check
    the targets with ``verdict``, print and write everything with :func:`finish`."""
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for key, (banner, make_rows) in sections.items():
        if args.only in (None, key):
            print(f"== {banner}", flush=True)
            rows += make_rows(args)
    v = verdict(rows)
    finish(name, rows, args, {"verdict": v, "seconds_total": round(time.perf_counter() - started, 1)})
    for section, d in v.items():
        print(section, d)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def build_graphs(methods: dict[str, Callable[[], Any]], prefix: str) -> tuple[dict[str, Path], dict[str, float]]:
    """Build each method's ONNX graph (a function returning a ModelProto, or None when its tool is
    not installed), timed, and save it in a fresh temporary folder; the paths and the seconds."""
    import tempfile

    import onnx

    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}."))
    paths, seconds = {}, {}
    for name, build in methods.items():
        t0 = time.perf_counter()
        graph = build()
        seconds[name] = time.perf_counter() - t0
        if graph is None:
            print(f"  {name}: not available here, skipped")
            continue
        paths[name] = tmp / f"{name}.onnx"
        onnx.save(graph, paths[name])
        print(f"  built {name} in {seconds[name]:.1f} s", flush=True)
    return paths, seconds
