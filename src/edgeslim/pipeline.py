"""Run techniques in order and measure every stage on ONNX Runtime; write the run folder.

The pipeline knows no technique: it looks each config up in the registry, applies it, exports
(or takes the lowered graph), and measures the deployable file. Latency of all stages is taken
side by side at the end, interleaved, so that machine drift does not favour one stage.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from rich.console import Console

from edgeslim import io, registry
from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError
from edgeslim.task import ModelArtifact, Task

console = Console(stderr=True)


@dataclass(frozen=True)
class RuntimeConfig:
    """How stages are measured on ONNX Runtime (1 intra-op thread: the edge case)."""

    threads: int = 1
    batch_size: int = 1
    warmup: int = 20
    runs: int = 300
    rounds: int = 5
    measure_memory: bool = True
    flush_denormals: bool = False  # time with denormals flushed to zero (see edgeslim.runtime.bench)

    def __post_init__(self) -> None:
        for name in ("threads", "batch_size", "runs", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"runtime.{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"runtime.warmup: must be >= 0, got {self.warmup}")


@dataclass
class Stage:
    """One measured model: its name, the step that made it, and its figures."""

    name: str
    technique: str | None
    config: dict[str, Any] | None
    parent: str | None
    onnx_path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    stages: list[Stage]
    baseline: str
    metric_name: str
    runtime: dict[str, Any]
    machine: dict[str, Any]
    out_dir: Path | None

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` contract (see DESIGN.md)."""
        return {
            "stages": [{"name": s.name, "technique": s.technique, "parent": s.parent, **s.metrics,
                        "config": s.config, "onnx": s.onnx_path.name if s.onnx_path else None} for s in self.stages],
            "baseline": self.baseline,
            "metric_name": self.metric_name,
            "runtime": self.runtime,
            "machine": self.machine,
        }

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def evaluate_onnx(model: onnx.ModelProto | Path, task: Task) -> float:
    """The task metric of the deployable graph, computed from ONNX Runtime outputs."""
    from edgeslim.runtime import make_session, run

    session = make_session(model, threads=os.cpu_count() or 1)
    outs, targets = [], []
    for x, y in task.evaluation_batches():
        outs.append(run(session, x)[0])
        targets.append(y)
    return float(task.metric(torch.from_numpy(np.concatenate(outs)), torch.from_numpy(np.concatenate(targets))))


def compress(
    task: Task,
    steps: Sequence[TechniqueConfig],
    *,
    runtime: RuntimeConfig = RuntimeConfig(),
    out_dir: str | Path | None = None,
    baseline_name: str = "fp32",
    recipe: dict[str, Any] | None = None,
) -> RunResult:
    """Measure the baseline, apply each step in order, measure after each, and write ``out_dir``.

    ``out_dir`` appears complete or not at all: it is built under a temporary name and moved into
    place at the end. ``recipe`` (the config used) is saved beside the results.
    """
    techniques = [registry.for_config(step) for step in steps]  # fail before any work
    target = Path(out_dir) if out_dir is not None else Path(".edgeslim-run")
    with io.StagingDir(target) as stage_dir:
        result = _run(task, steps, techniques, runtime, stage_dir, baseline_name)
        io.write_json(stage_dir / "metrics.json", result.to_json())
        from edgeslim.report import write_report

        write_report(result, stage_dir)
        used = recipe if recipe is not None else {"steps": [s.to_dict() for s in steps], "runtime": vars(runtime)}
        import yaml

        io.write_text(stage_dir / "recipe.yaml", yaml.safe_dump(used, sort_keys=False))
    if out_dir is None:
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        result.out_dir = None
    else:
        result.out_dir = target
        for s in result.stages:
            s.onnx_path = target / s.onnx_path.relative_to(stage_dir)
    return result


def _run(task, steps, techniques, runtime: RuntimeConfig, stage_dir: Path, baseline_name: str) -> RunResult:
    stages: list[Stage] = []
    artifact = ModelArtifact(torch=task.model)
    plan = [(baseline_name, None, None)] + [(t.name, t, s) for t, s in zip(techniques, steps)]
    for i, (name, tech, step) in enumerate(plan):
        label = f"{i:02d}_{name}"
        console.print(f"[bold]stage {i}/{len(plan) - 1}[/bold] {name}")
        t0 = time.perf_counter()
        if tech is not None:
            artifact = tech.fn(artifact, step, task)
            artifact.files = dict(artifact.files)
        graph = artifact.onnx if artifact.onnx is not None else task.export(artifact.torch)
        seconds = time.perf_counter() - t0
        path = stage_dir / label / "model.onnx"
        io.write_bytes(path, graph.SerializeToString())
        for fname, content in artifact.files.items():
            io.write_bytes(path.parent / fname, content.encode() if isinstance(content, str) else content)
        stage = Stage(label, name if tech else None, step.to_dict() if step else None,
                      stages[-1].name if stages else None, path)
        stage.metrics = _static_measures(path, graph, task)
        stage.metrics["onnx_size_bytes"] = stage.metrics["size_bytes"]
        if artifact.size_file is not None:
            if artifact.size_file not in artifact.files:
                raise ConfigError(f"{name}: size_file {artifact.size_file!r} is not among the stage's files")
            stage.metrics["size_bytes"] = (path.parent / artifact.size_file).stat().st_size
            stage.metrics["size_file"] = artifact.size_file
        stage.metrics["step_seconds"] = round(seconds, 3)
        stage.metrics.update({f"note_{k}": v for k, v in artifact.notes.items()})
        console.print(f"  {task.metric_name} {stage.metrics[task.metric_name]:.4f}  size {stage.metrics['size_bytes']:,} B")
        stages.append(stage)
    _measure_latency(stages, task, runtime)
    _relative(stages, task.metric_name)
    rt = {**vars(runtime), "provider": "CPUExecutionProvider", "onnxruntime": ort.__version__}
    return RunResult(stages, stages[0].name, task.metric_name, rt, machine_info(), stage_dir)


def _static_measures(path: Path, graph: onnx.ModelProto, task: Task) -> dict[str, Any]:
    from edgeslim.runtime import count_params, inspect_optimized, size_bytes

    value = evaluate_onnx(path, task)
    report = inspect_optimized(path)
    return {
        "metric_name": task.metric_name,
        "metric": value,
        task.metric_name: value,
        "size_bytes": size_bytes(path),
        "params": count_params(graph),
        "macs": _macs(graph, task),
        "int8_op_fraction": report.int8_op_fraction,
        "compute_ops": report.compute_ops,
        "int_compute_ops": report.int_compute_ops,
        "fp_compute_nodes": report.fp_compute_nodes,
    }


def _macs(graph: onnx.ModelProto, task: Task) -> int | None:
    """MACs at the example inputs' shapes; None (with a warning) where shape inference cannot follow."""
    from edgeslim.errors import ModelError
    from edgeslim.runtime import count_macs

    inits = {i.name for i in graph.graph.initializer}
    names = [i.name for i in graph.graph.input if i.name not in inits]
    shapes = {n: list(t.shape) for n, t in zip(names, task.example_inputs)}
    try:
        return count_macs(graph, shapes)
    except ModelError as err:
        console.print(f"  [yellow]MACs not counted[/yellow]: {err}")
        return None


def _measure_latency(stages: list[Stage], task: Task, runtime: RuntimeConfig) -> None:
    from edgeslim.runtime import compare_latency, peak_memory_bytes

    x = tuple(_repeat(t.detach().cpu().numpy(), runtime.batch_size) for t in task.example_inputs)
    console.print(f"measuring latency of {len(stages)} stages side by side "
                  f"({runtime.runs} runs each, batch {runtime.batch_size}, {runtime.threads} thread(s))")
    stats = compare_latency({s.name: s.onnx_path for s in stages}, x, threads=runtime.threads,
                            warmup=runtime.warmup, runs=runtime.runs, rounds=runtime.rounds,
                            flush_denormals=runtime.flush_denormals)
    for s in stages:
        d = stats[s.name].to_dict()
        s.metrics.update({k: d[k] for k in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean")})
        s.metrics["batch_size"] = runtime.batch_size
        s.metrics["flush_denormals"] = runtime.flush_denormals
        if runtime.measure_memory:
            names = [i.name for i in onnx.load(s.onnx_path, load_external_data=False).graph.input]
            shapes = {name: list(a.shape) for name, a in zip(names, x)}
            s.metrics["peak_memory_bytes"] = peak_memory_bytes(s.onnx_path, shapes, threads=runtime.threads)
        else:
            s.metrics["peak_memory_bytes"] = None


def _repeat(a: np.ndarray, batch_size: int) -> np.ndarray:
    """``a`` tiled along the batch axis to ``batch_size`` rows (float64 inputs become float32)."""
    a = a.astype(np.float32) if a.dtype == np.float64 else a
    reps = int(np.ceil(batch_size / len(a)))
    return np.concatenate([a] * reps)[:batch_size]


def _relative(stages: list[Stage], metric_name: str) -> None:
    base = stages[0].metrics
    for s in stages:
        m = s.metrics
        m["metric_delta"] = m["metric"] - base["metric"]
        m["speedup_vs_baseline"] = base["latency_ms_p50"] / m["latency_ms_p50"] if m["latency_ms_p50"] else None
        m["size_ratio_vs_baseline"] = base["size_bytes"] / m["size_bytes"] if m["size_bytes"] else None
