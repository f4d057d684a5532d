"""Run techniques in order and measure every stage on ONNX Runtime; write the run folder.

The pipeline knows no technique: it looks each config up in the registry, applies it, exports
(or takes the lowered graph), and measures the deployable file. Latency of all stages is taken
side by side at the end, interleaved, so that machine drift does not favour one stage.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from rich.console import Console

from edgeslim import io, registry
from edgeslim.config import Checked, TechniqueConfig, check_int
from edgeslim.errors import ConfigError
from edgeslim.evaluate.metrics import METRICS, VS_BASELINE
from edgeslim.evaluate.onnx_eval import evaluate_onnx, metric_value, onnx_outputs  # noqa: F401  (evaluate_onnx: old path)
from edgeslim.runtime.bench import input_memory_limit, machine_info
from edgeslim.task import ModelArtifact, Task, check_finite

console = Console(stderr=True)


@dataclass(frozen=True)
class RuntimeConfig(Checked):
    """How stages are measured on ONNX Runtime (1 intra-op thread: the edge case).

    ``seq_lens`` sets the sequence lengths of a model with a dynamic sequence axis
    (``Task.dynamic_dims``, e.g. MiniLM's tokens): "eval" times the evaluation samples in turn,
    each batch of ``batch_size`` cut to its longest real length (batch 1: every sentence unpadded,
    at its own length: what users send); a list such as ``[16, 32, 128]`` times every sample padded
    or cut to each length and reports the median per length too; "example" times the example
    input's shape (for MiniLM, padded to the task's ``seq_len``). The timed calls cycle through
    the samples (up to ``runs`` of them). Models without a sequence axis always use the example
    input. ``metrics.json`` records the lengths measured (``runtime.measured_seq_lens``).
    """

    threads: int = 1
    batch_size: int = 1
    warmup: int = 20
    runs: int = 300
    rounds: int = 5
    measure_memory: bool = True
    flush_denormals: bool = False  # time with denormals flushed to zero (see edgeslim.runtime.bench)
    seq_lens: Literal["eval", "example"] | tuple[int, ...] = "eval"

    def validate(self) -> None:
        cpus = os.cpu_count() or 1
        if not 1 <= self.threads <= cpus:
            raise ConfigError(f"threads: must be in [1, {cpus}] (this machine's cores), got {self.threads}")
        if isinstance(self.seq_lens, tuple):
            if not self.seq_lens:
                raise ConfigError('seq_lens: give at least one length, or "eval" / "example"')
            bad = next((n for n in self.seq_lens if not 1 <= n <= 1_000_000), None)
            if bad is not None:
                raise ConfigError(f"seq_lens: lengths must be in [1, 1,000,000], got {bad}")
            if len(set(self.seq_lens)) != len(self.seq_lens):
                raise ConfigError(f"seq_lens: {list(self.seq_lens)} names a length twice")


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
    seed: int | None = None
    extra_metrics: tuple[str, ...] = ()  # reported beside metric_name (report columns, metrics.json keys)

    def moved_to(self, target: Path) -> None:
        """Point the stages' paths into ``target``, where the run folder now is."""
        for s in self.stages:
            s.onnx_path = target / s.onnx_path.relative_to(self.out_dir)
        self.out_dir = target

    def to_json(self) -> dict[str, Any]:
        """The ``metrics.json`` contract (see DESIGN.md)."""
        return {
            "seed": self.seed,
            "stages": [{"name": s.name, "technique": s.technique, "parent": s.parent, **s.metrics,
                        "config": s.config, "onnx": s.onnx_path.name if s.onnx_path else None} for s in self.stages],
            "baseline": self.baseline,
            "metric_name": self.metric_name,
            "extra_metrics": list(self.extra_metrics),
            "runtime": self.runtime,
            "machine": self.machine,
        }

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def compress(
    task: Task,
    steps: Sequence[TechniqueConfig],
    *,
    runtime: RuntimeConfig = RuntimeConfig(),
    out_dir: str | Path | io.RunFolder | None = None,
    baseline_name: str = "fp32",
    recipe: dict[str, Any] | None = None,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> RunResult:
    """Measure the baseline, apply each step in order, measure after each, and write ``out_dir``.

    Everything is checked before any work: the steps, the runtime settings, and ``out_dir``, which
    must be new, empty or an earlier run folder (``overwrite=True`` adds the run to a folder that
    holds other files, which are kept; see :class:`edgeslim.io.RunFolder`). ``out_dir`` appears
    complete or not at all. ``seed`` seeds every global generator before the first step and is
    recorded in ``metrics.json``; ``recipe`` (the config used) is saved beside the results.
    ``progress=False`` silences the stage lines (the steps' own ``progress`` fields silence theirs).
    """
    quiet, console.quiet = console.quiet, not progress
    try:
        return _compress(task, steps, runtime, out_dir, baseline_name, recipe, overwrite, seed)
    finally:
        console.quiet = quiet


def _compress(task, steps, runtime, out_dir, baseline_name, recipe, overwrite, seed) -> RunResult:
    if not isinstance(task, Task):
        raise ConfigError(f"task: expected an edgeslim.Task, got {type(task).__name__}")
    if isinstance(steps, TechniqueConfig) or not isinstance(steps, Sequence):
        raise ConfigError("steps: expected a list of technique configs, e.g. [PTQInt8Config()]")
    for i, step in enumerate(steps):
        if not isinstance(step, TechniqueConfig):
            raise ConfigError(f"steps[{i}]: expected a technique config (e.g. PTQInt8Config()), got {step!r:.60}")
    if not isinstance(runtime, RuntimeConfig):
        raise ConfigError(f"runtime: expected a RuntimeConfig, got {type(runtime).__name__}")
    check_int("seed", seed)
    techniques = [registry.for_config(step) for step in steps]
    if task.is_graph:
        for i, tech in enumerate(techniques):
            if not tech.graph_only:
                graph_ones = ", ".join(t.name for t in registry.list_techniques() if t.graph_only)
                raise ConfigError(f"steps[{i}]: {tech.name} needs the PyTorch module; a model given as an ONNX "
                                  f"graph takes only {graph_ones}")
    _check_batch_fits(task, runtime)
    if isinstance(runtime.seq_lens, tuple) and sequence_axes(task) is None:
        raise ConfigError("runtime.seq_lens: the model has no sequence axis to set (Task.dynamic_dims names none); "
                          "leave seq_lens out")
    args = (task, steps, techniques, runtime, baseline_name, recipe, seed)
    if isinstance(out_dir, io.RunFolder):  # opened by the caller (a recipe: before the model was trained)
        return _write_run(out_dir.staging, *args)
    if out_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="edgeslim-") as tmp:
            result = _write_run(Path(tmp), *args)
        result.out_dir = None
        return result
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ConfigError(f"out_dir: expected a folder path, got {type(out_dir).__name__}")
    with io.RunFolder(out_dir, overwrite=overwrite) as folder:
        result = _write_run(folder.staging, *args)
    result.moved_to(folder.target)
    return result


def _check_batch_fits(task: Task, runtime: RuntimeConfig) -> None:
    """Refuse, before any work, a latency batch whose inputs alone would take a quarter of memory."""
    per_sample = sum(t[:1].numel() * 4 for t in task.example_inputs)  # float32 (int64 ids: close enough)
    limit = input_memory_limit()
    if limit is not None and per_sample * runtime.batch_size > limit:
        most = max(1, limit // max(per_sample, 1))
        raise ConfigError(f"runtime.batch_size: {runtime.batch_size:,} samples of {per_sample:,} B do not fit in "
                          f"a quarter of this machine's memory; at most {most:,}")


def _write_run(stage_dir: Path, task, steps, techniques, runtime, baseline_name, recipe, seed) -> RunResult:
    from edgeslim.train import seed_everything

    seed_everything(seed)
    result = _run(task, steps, techniques, runtime, stage_dir, baseline_name)
    result.seed = seed
    io.write_json(stage_dir / "metrics.json", result.to_json())
    from edgeslim.report import write_report

    write_report(result, stage_dir)
    used = recipe if recipe is not None else {"seed": seed, "steps": [s.to_dict() for s in steps], "runtime": vars(runtime)}
    import yaml

    io.write_text(stage_dir / "recipe.yaml", yaml.safe_dump(used, sort_keys=False))
    return result


def _run(task, steps, techniques, runtime: RuntimeConfig, stage_dir: Path, baseline_name: str) -> RunResult:
    stages: list[Stage] = []
    artifact = ModelArtifact.of(task.model)
    labels: np.ndarray | None = None
    reference: np.ndarray | None = None  # the baseline's outputs: what VS_BASELINE metrics compare with
    plan = [(baseline_name, None, None)] + [(t.name, t, s) for t, s in zip(techniques, steps)]
    for i, (name, tech, step) in enumerate(plan):
        label = f"{i:02d}_{name}"
        console.print(f"[bold]stage {i}/{len(plan) - 1}[/bold] {name}")
        t0 = time.perf_counter()
        if tech is not None:
            artifact = tech.fn(artifact, step, task)
            artifact.files = dict(artifact.files)
            if artifact.onnx is None and artifact.torch is not None:
                check_finite(artifact.torch, f"after step {name}")
            if artifact.sparsity is not None:
                artifact.sparsity.check(artifact.torch, name)
        graph = artifact.deployable(task)
        files, size_file = _stage_files(artifact)
        seconds = time.perf_counter() - t0
        path = stage_dir / label / "model.onnx"
        io.write_bytes(path, graph.SerializeToString())
        for fname, content in files.items():
            io.write_bytes(path.parent / fname, content.encode() if isinstance(content, str) else content)
        stage = Stage(label, name if tech else None, step.to_dict() if step else None,
                      stages[-1].name if stages else None, path)
        outputs, targets = onnx_outputs(path, task, label)
        if reference is None:
            labels, reference = targets, outputs
            if task.metric_name in VS_BASELINE:  # later steps (budgets, scans) compare with the baseline too
                task = task.with_targets(reference)
        stage.metrics = _metric_values(task, outputs, labels, reference, label)
        stage.metrics.update(_static_measures(path, graph, task))
        stage.metrics["onnx_size_bytes"] = stage.metrics["size_bytes"]
        if size_file is not None:
            if size_file not in files:
                raise ConfigError(f"{name}: size_file {size_file!r} is not among the stage's files")
            stage.metrics["size_bytes"] = (path.parent / size_file).stat().st_size
            stage.metrics["size_file"] = size_file
        stage.metrics["step_seconds"] = round(seconds, 3)
        stage.metrics.update({f"note_{k}": v for k, v in artifact.notes.items()})
        shown = "  ".join(f"{m} {stage.metrics[m]:.4f}" for m in (task.metric_name, *task.extra_metrics))
        console.print(f"  {shown}  size {stage.metrics['size_bytes']:,} B")
        stages.append(stage)
    measured = _measure_latency(stages, task, runtime)
    _relative(stages, task.metric_name)
    rt = {**vars(runtime), "measured_seq_lens": measured, "provider": "CPUExecutionProvider",
          "onnxruntime": ort.__version__}
    return RunResult(stages, stages[0].name, task.metric_name, rt, machine_info(), stage_dir,
                     extra_metrics=task.extra_metrics)


def _stage_files(artifact: ModelArtifact) -> tuple[dict[str, str | bytes], str | None]:
    """The stage's files and the one that is its size: the step's own, plus the sparse file of a
    model that carries sparsity (``weights.sparse``, :func:`edgeslim.prune.sparse.encode_sparse`
    at the sparsity's ``index_bits``) unless a lowered graph or the step's own compact file
    (``size_file``) is the deployable form. Written here, from the stage's weights, so no step
    re-encodes it after changing them."""
    files, size_file = dict(artifact.files), artifact.size_file
    if artifact.sparsity is not None and artifact.onnx is None and size_file is None:
        from edgeslim.prune.sparse import encode_sparse
        from edgeslim.sparsity import SPARSE_FILE

        files[SPARSE_FILE] = encode_sparse(artifact.torch, index_bits=artifact.sparsity.index_bits)
        size_file = SPARSE_FILE
    return files, size_file


def _metric_values(task: Task, outputs: np.ndarray, labels: np.ndarray | None, reference: np.ndarray,
                   stage: str) -> dict[str, Any]:
    """The task's metric and its extra metrics of one stage's outputs: those in VS_BASELINE against
    the baseline stage's outputs on the same samples, the others against the data's targets."""
    value = metric_value(task.metric, task.metric_name, outputs, reference if task.metric_name in VS_BASELINE
                         else labels, stage)
    extra = {name: metric_value(METRICS[name], name, outputs, reference if name in VS_BASELINE else labels, stage)
             for name in task.extra_metrics}
    return {"metric_name": task.metric_name, "metric": value, task.metric_name: value, **extra}


def _static_measures(path: Path, graph: onnx.ModelProto, task: Task) -> dict[str, Any]:
    from edgeslim.runtime import count_params, inspect_optimized, size_bytes

    report = inspect_optimized(path)
    return {
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


def sequence_axes(task: Task) -> tuple[int | None, ...] | None:
    """Each input's sequence axis: its one dynamic axis past the batch axis (``Task.dynamic_dims``);
    None when no input has exactly one (the model takes fixed shapes, or images of any size)."""
    if not task.dynamic_dims:
        return None
    axes = tuple(next(iter(d)) if len(d) == 1 and next(iter(d)) >= 1 else None for d in task.dynamic_dims)
    return axes if len(axes) == len(task.example_inputs) and any(a is not None for a in axes) else None


def latency_inputs(task: Task, runtime: RuntimeConfig) -> tuple[Any, dict[str, Any] | None]:
    """What the stages are timed on, and the summary of its sequence lengths for ``metrics.json``
    (None for a model without a sequence axis): a :class:`~edgeslim.runtime.bench.Workload` of
    evaluation samples at the lengths ``runtime.seq_lens`` asks for, or the example input repeated
    to ``runtime.batch_size`` rows (no sequence axis, or ``seq_lens: example``)."""
    from edgeslim.runtime.bench import fixed_lengths, own_lengths
    from edgeslim.task import iter_batches

    axes = sequence_axes(task)
    if axes is None or runtime.seq_lens == "example":
        x = tuple(_repeat(t.detach().cpu().numpy(), runtime.batch_size) for t in task.example_inputs)
        if axes is None:
            return (x if len(x) > 1 else x[0]), None
        length = int(next(t.shape[a] for t, a in zip(x, axes) if a is not None))
        return (x if len(x) > 1 else x[0]), {"source": "example", "feeds": 1, "min": length, "p50": float(length),
                                              "mean": float(length), "max": length, "lengths": [length]}
    limit = runtime.runs * runtime.batch_size
    xs = [x for x, _ in iter_batches(task.evaluation, 256, limit)]
    samples = (tuple(np.concatenate([b[i] for b in xs]) for i in range(len(xs[0]))) if isinstance(xs[0], tuple)
               else np.concatenate(xs))
    if runtime.seq_lens == "eval":
        load = own_lengths(samples, axes, runtime.batch_size)
        return load, {"source": "eval", **load.summary()}
    per_length = max(1, limit // len(runtime.seq_lens))  # the same number of calls at every length
    load = fixed_lengths(samples, axes, runtime.seq_lens, runtime.batch_size, limit=per_length)
    return load, {"source": "stated", **load.summary()}


def _measure_latency(stages: list[Stage], task: Task, runtime: RuntimeConfig) -> dict[str, Any] | None:
    """Time every stage side by side; returns the measured lengths' summary (None: no sequence axis)."""
    from edgeslim.report.markdown import lengths_text
    from edgeslim.runtime import compare_latency, peak_memory_bytes
    from edgeslim.runtime.bench import Workload

    x, lengths = latency_inputs(task, runtime)
    where = "" if lengths is None else ", " + lengths_text(lengths)
    console.print(f"measuring latency of {len(stages)} stages side by side "
                  f"({runtime.runs} runs each, batch {runtime.batch_size}, {runtime.threads} thread(s){where})")
    stats = compare_latency({s.name: s.onnx_path for s in stages}, x, threads=runtime.threads,
                            warmup=runtime.warmup, runs=runtime.runs, rounds=runtime.rounds,
                            flush_denormals=runtime.flush_denormals)
    biggest = x.longest() if isinstance(x, Workload) else x
    biggest = biggest if isinstance(biggest, tuple) else (biggest,)
    for s in stages:
        d = stats[s.name].to_dict()
        s.metrics.update({k: d[k] for k in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_mean",
                                            "latency_ms_p50_by_seq_len")})
        s.metrics["batch_size"] = runtime.batch_size
        s.metrics["flush_denormals"] = runtime.flush_denormals
        if runtime.measure_memory:  # at the longest input timed
            names = [i.name for i in onnx.load(s.onnx_path, load_external_data=False).graph.input]
            shapes = {name: list(a.shape) for name, a in zip(names, biggest)}
            s.metrics["peak_memory_bytes"] = peak_memory_bytes(s.onnx_path, shapes, threads=runtime.threads)
        else:
            s.metrics["peak_memory_bytes"] = None
    return lengths


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
