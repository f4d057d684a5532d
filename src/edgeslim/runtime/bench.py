"""Latency and peak-memory measurements on ONNX Runtime (CPU).

Latency: per-call wall time with ``time.perf_counter`` after warm-up, summarised by
percentiles (tails matter on edge devices). ``flush_denormals`` times with denormal floats
flushed to zero (x86 FTZ/DAZ): attention softmax over padded (masked) positions computes exp of
very negative logits, whose denormal results cost ~10x on x86 (measured: ORT's Softmax on
1x12x128x128 logits, 0.08 ms normal vs 0.9-2.1 ms with masked logits; 34% of int8 MiniLM's
time at seq 128). ORT's ``session.set_denormal_as_zero`` only reaches its pool threads, and at
1 intra-op thread ORT computes on the caller's thread, so the flag is also set there. Sequence models are timed at the lengths users send: a :class:`Workload` holds several inputs
that the timed calls cycle through, e.g. each evaluation sentence unpadded at its own length
(:func:`own_lengths`) or every sentence padded or cut to each of a stated set of lengths
(:func:`fixed_lengths`); at 25 tokens a padded-to-128 figure overstates MiniLM's latency 3-4x and
ranks int8 graphs differently (per-kernel overheads weigh more on short inputs). Memory: measured in a fresh subprocess so the
caller's heap (torch, data sets, other sessions) does not pollute the number. Every figure is
reported with :func:`machine_info`, the machine and library versions it was measured with.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from edgeslim.errors import RuntimeToolError
from edgeslim.runtime.ort import first_line, input_feed, make_session

__all__ = ["LatencyStats", "Workload", "benchmark_latency", "compare_latency", "denormals_flushed", "fixed_lengths",
           "machine_info", "own_lengths", "peak_memory_bytes"]

_MEMORY_TIMEOUT_S = 120


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles in milliseconds of ``runs`` timed calls at a fixed batch and thread count."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    warmup: int
    batch_size: int
    threads: int
    flush_denormals: bool = False
    # p50 at each sequence length of a Workload with ``by_length`` (a stated set of lengths), else None
    p50_ms_by_seq_len: dict[int, float] | None = None

    def to_dict(self) -> dict:
        """Flat dict with the key names used in reports and JSON results."""
        return {
            "latency_ms_p50": self.p50_ms,
            "latency_ms_p90": self.p90_ms,
            "latency_ms_p99": self.p99_ms,
            "latency_ms_mean": self.mean_ms,
            "runs": self.runs,
            "warmup": self.warmup,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "flush_denormals": self.flush_denormals,
            "latency_ms_p50_by_seq_len": (None if self.p50_ms_by_seq_len is None
                                          else {str(k): v for k, v in self.p50_ms_by_seq_len.items()}),
        }


def _stats(samples_s: list[float], *, warmup: int, batch_size: int, threads: int, flush: bool,
           by_seq_len: dict[int, list[float]] | None = None) -> LatencyStats:
    ms = np.asarray(samples_s, dtype=np.float64) * 1e3
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    by = None if by_seq_len is None else {n: float(np.median(v)) * 1e3 for n, v in sorted(by_seq_len.items())}
    return LatencyStats(float(p50), float(p90), float(p99), float(ms.mean()), len(ms), warmup, batch_size, threads,
                        flush, by)


Inputs = Any  # one array, or a tuple of arrays (one per model input), batch first


@dataclass(frozen=True)
class Workload:
    """Inputs that timed calls take in turn (call i runs ``feeds[i % len(feeds)]``), with the
    sequence length of each: what a sequence model is sent in use, rather than one padded shape.
    ``by_length`` also reports the median per distinct length (for a stated set of lengths)."""

    feeds: tuple[Inputs, ...]
    seq_lens: tuple[int, ...]
    by_length: bool = False

    def __post_init__(self) -> None:
        if not self.feeds or len(self.feeds) != len(self.seq_lens):
            raise RuntimeToolError(f"a workload needs one sequence length per feed and at least one feed, got "
                                   f"{len(self.feeds)} feed(s) and {len(self.seq_lens)} length(s)")

    def summary(self) -> dict[str, Any]:
        """The lengths the figures were measured at (``metrics.json``'s ``measured_seq_lens``)."""
        lens = np.asarray(self.seq_lens)
        return {"feeds": len(lens), "min": int(lens.min()), "p50": float(np.median(lens)),
                "mean": round(float(lens.mean()), 2), "max": int(lens.max()),
                "lengths": sorted({int(n) for n in lens}) if self.by_length else None}

    def longest(self) -> Inputs:
        """The feed with the most tokens (for a peak-memory figure)."""
        return self.feeds[int(np.argmax(self.seq_lens))]


def _parts(x: Inputs) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(v) for v in x) if isinstance(x, (tuple, list)) else (np.asarray(x),)


def _check_axes(parts: tuple[np.ndarray, ...], axes: Sequence[int | None]) -> None:
    if len(axes) != len(parts) or not any(a is not None for a in axes):
        raise RuntimeToolError(f"sequence axes {tuple(axes)} must name one axis (or None) per input ({len(parts)}) "
                               "and at least one axis")
    for part, axis in zip(parts, axes):
        if axis is not None and not 1 <= axis < part.ndim:
            raise RuntimeToolError(f"sequence axis {axis} is not a non-batch axis of an input of shape {part.shape}")


def _real_lengths(parts: tuple[np.ndarray, ...], axes: Sequence[int | None]) -> np.ndarray:
    """Per sample, 1 + the last position holding a non-zero value in any input with a sequence
    axis: trailing zeros (padding ids and a zero attention mask) are padding."""
    n = len(parts[0])
    length = np.zeros(n, dtype=np.int64)
    for part, axis in zip(parts, axes):
        if axis is None:
            continue
        moved = np.moveaxis(part, axis, -1).reshape(n, -1, part.shape[axis])  # (N, rest, T)
        used = (moved != 0).any(axis=1)  # (N, T)
        last = np.where(used.any(axis=1), part.shape[axis] - np.argmax(used[:, ::-1], axis=1), 0)
        length = np.maximum(length, last)
    return np.maximum(length, 1)


def _fit(part: np.ndarray, axis: int | None, length: int) -> np.ndarray:
    """``part`` cut or zero-padded to ``length`` along ``axis``."""
    if axis is None:
        return part
    have = part.shape[axis]
    if have >= length:
        return np.ascontiguousarray(np.take(part, np.arange(length), axis=axis))
    pad = [(0, 0)] * part.ndim
    pad[axis] = (0, length - have)
    return np.pad(part, pad)


def _feed(parts: tuple[np.ndarray, ...], axes: Sequence[int | None], rows: slice, length: int,
          single: bool) -> Inputs:
    out = tuple(_fit(p[rows], a, length) for p, a in zip(parts, axes))
    return out[0] if single else out


def own_lengths(samples: Inputs, axes: Sequence[int | None], batch_size: int = 1, limit: int | None = None) -> Workload:
    """Each batch of ``batch_size`` consecutive samples cut to the longest real length among them
    (batch 1: every sample at its own length, unpadded), for the first ``limit`` samples.

    ``axes`` gives each input's sequence axis (None for an input without one); a sample's real
    length ends at its last position where any of those inputs is non-zero (right padding with
    id 0 and attention mask 0, as BERT-style tokenizers pad)."""
    parts = _parts(samples)
    _check_axes(parts, axes)
    n = len(parts[0]) if limit is None else min(limit, len(parts[0]))
    real = _real_lengths(tuple(p[:n] for p in parts), axes)
    feeds, lens = [], []
    for i in range(0, n, batch_size):
        length = int(real[i:i + batch_size].max())
        feeds.append(_feed(parts, axes, slice(i, i + batch_size), length, not isinstance(samples, (tuple, list))))
        lens.append(length)
    return Workload(tuple(feeds), tuple(lens))


def fixed_lengths(samples: Inputs, axes: Sequence[int | None], lengths: Sequence[int], batch_size: int = 1,
                  limit: int | None = None) -> Workload:
    """Batches of ``batch_size`` samples (the first ``limit``), each cut or zero-padded to every
    one of ``lengths`` in turn; the figures are also reported per length."""
    parts = _parts(samples)
    _check_axes(parts, axes)
    n = len(parts[0]) if limit is None else min(limit, len(parts[0]))
    feeds, lens = [], []
    for i in range(0, n, batch_size):
        for length in lengths:
            feeds.append(_feed(parts, axes, slice(i, i + batch_size), int(length),
                               not isinstance(samples, (tuple, list))))
            lens.append(int(length))
    return Workload(tuple(feeds), tuple(lens), by_length=True)


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[None]:
    """Denormal floats flushed to zero on the calling thread inside the block (then back to IEEE).

    Uses torch's switch for the x86 MXCSR FTZ/DAZ bits; raises RuntimeToolError where the CPU has
    no such mode, so a number is never labelled "flushed" when it was not."""
    if not enabled:
        yield
        return
    import torch

    if not torch.set_flush_denormal(True):
        raise RuntimeToolError("flush_denormals: this CPU has no flush-to-zero mode (x86 SSE3 or newer needed)")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def input_memory_limit() -> int | None:
    """The most the inputs of one measured batch may take: a quarter of this machine's physical
    memory, leaving room for the model, its activations and ORT's arena (None where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: platform, CPU model, core count and library versions
    (the ``machine`` object of ``metrics.json`` and of every benchmark's JSON)."""
    import torch  # only for its version; kept out of the module imports (see runtime/__init__)

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__}


def _batch_size(feed: Mapping[str, np.ndarray]) -> int:
    first = next(iter(feed.values()))
    return int(first.shape[0]) if first.ndim > 0 else 1


def _check_counts(warmup: int, runs: int) -> None:
    if warmup < 0 or runs < 1:
        raise RuntimeToolError(f"need warmup >= 0 and runs >= 1, got warmup={warmup} runs={runs}")


def _timed(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return time.perf_counter() - start


def _warm(session: ort.InferenceSession, feed: dict[str, np.ndarray], warmup: int, label: str) -> None:
    # The first run also surfaces shape/type errors; report them once as a one-liner.
    try:
        for _ in range(max(warmup, 1)):
            session.run(None, feed)
    except Exception as exc:
        raise RuntimeToolError(f"ONNX Runtime failed to run {label}: {first_line(exc)}") from exc


def benchmark_latency(
    model: onnx.ModelProto | str | Path,
    inputs: np.ndarray | dict[str, np.ndarray],
    *,
    threads: int = 1,
    warmup: int = 20,
    runs: int = 200,
    min_seconds: float = 0.0,
    flush_denormals: bool = False,
) -> LatencyStats:
    """Time ``runs`` session calls (and at least ``min_seconds`` in total) after ``warmup`` calls."""
    _check_counts(warmup, runs)
    session = make_session(model, threads=threads, flush_denormals=flush_denormals)
    feed = input_feed(session, inputs)
    samples: list[float] = []
    with denormals_flushed(flush_denormals):
        _warm(session, feed, warmup, str(model) if not isinstance(model, onnx.ModelProto) else "the model")
        deadline = time.perf_counter() + min_seconds
        while len(samples) < runs or time.perf_counter() < deadline:
            samples.append(_timed(session, feed))
    return _stats(samples, warmup=warmup, batch_size=_batch_size(feed), threads=threads, flush=flush_denormals)


def compare_latency(
    models: Mapping[str, onnx.ModelProto | str | Path],
    inputs: np.ndarray | dict[str, np.ndarray] | Workload,
    *,
    threads: int = 1,
    warmup: int = 20,
    runs: int = 200,
    rounds: int = 5,
    flush_denormals: bool = False,
) -> dict[str, LatencyStats]:
    """Benchmark several models fairly: same inputs, interleaved rounds, pooled samples.

    Measuring model A then model B lets machine drift (thermal throttling, neighbours, turbo)
    masquerade as a speed difference; interleaving ``rounds`` blocks of ``runs // rounds`` calls
    spreads that drift evenly over all models. With a :class:`Workload` the calls cycle through
    its feeds, and every model gets the same feeds in the same order (warm-up: ``max(warmup,
    len(feeds))`` calls cycling through them, so every shape has run once). ``flush_denormals``:
    see the module docstring.
    """
    _check_counts(warmup, runs)
    if not models:
        raise RuntimeToolError("compare_latency needs at least one model")
    load = inputs if isinstance(inputs, Workload) else Workload((inputs,), (0,))
    rounds = max(1, min(int(rounds), runs))
    per_round = max(1, runs // rounds)
    sessions = {name: make_session(m, threads=threads, flush_denormals=flush_denormals) for name, m in models.items()}
    feeds = {name: [input_feed(s, f) for f in load.feeds] for name, s in sessions.items()}
    n = len(load.feeds)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    by_len: dict[str, dict[int, list[float]]] = {name: {} for name in sessions}
    with denormals_flushed(flush_denormals):
        for name, s in sessions.items():
            for i in range(max(warmup, n) if n > 1 else 1):  # every feed once (shapes, first-call costs)
                _warm(s, feeds[name][i % n], warmup if n == 1 else 1, repr(name))
        for r in range(rounds):
            for name, s in sessions.items():
                for j in range(per_round):
                    k = (r * per_round + j) % n
                    t = _timed(s, feeds[name][k])
                    samples[name].append(t)
                    by_len[name].setdefault(load.seq_lens[k], []).append(t)
    return {
        name: _stats(samples[name], warmup=warmup, batch_size=_batch_size(feeds[name][0]), threads=threads,
                     flush=flush_denormals, by_seq_len=by_len[name] if load.by_length else None)
        for name in sessions
    }


# Runs in a fresh interpreter: only onnxruntime + numpy, so the baseline is small and stable.
_MEMORY_SCRIPT = r"""
import json, os, resource, sys
import numpy as np
import onnxruntime as ort

path, shapes, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
types = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
         "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
         "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}
with open("/proc/self/statm") as fh:
    baseline = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
try:  # "5" resets VmHWM (Linux >= 4.0) so transient import peaks are not counted
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
except OSError:
    pass
opts = ort.SessionOptions()
opts.intra_op_num_threads = threads
opts.inter_op_num_threads = 1
opts.log_severity_level = 3
sess = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
rng = np.random.default_rng(0)
feed = {}
for i in sess.get_inputs():
    shape = shapes.get(i.name) or [d if isinstance(d, int) and d > 0 else 1 for d in i.shape]
    dtype = types.get(i.type, np.float32)
    if np.issubdtype(dtype, np.floating):
        feed[i.name] = rng.standard_normal(shape).astype(dtype)
    else:
        feed[i.name] = np.zeros(shape, dtype=dtype)
sess.run(None, feed)
# Quirk: Linux carries ru_maxrss across fork+exec, so a child of a big (torch-laden) parent
# reports the parent's peak. VmHWM is the high-water mark of this process image only.
peak = None
with open("/proc/self/status") as fh:
    for line in fh:
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) * 1024
if peak is None:  # kernels without VmHWM: fall back to ru_maxrss (KiB on Linux)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak - baseline}))
"""


def peak_memory_bytes(
    model_path: str | Path,
    input_shapes: dict[str, list[int]] | None = None,
    *,
    threads: int = 1,
) -> int:
    """Peak resident memory (bytes) added by loading ``model_path`` and running it once.

    Measured in a subprocess as ``peak RSS (VmHWM) - RSS after importing onnxruntime``; dynamic input
    dims become 1 unless ``input_shapes`` gives them. Linux only (reads /proc).
    """
    path = Path(model_path)
    if not path.is_file():
        raise RuntimeToolError(f"ONNX file not found: {path}")
    if not Path("/proc/self/statm").exists():
        raise RuntimeToolError("peak_memory_bytes needs Linux /proc (not available on this system)")
    cmd = [sys.executable, "-c", _MEMORY_SCRIPT, str(path.resolve()), json.dumps(input_shapes or {}), str(threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_MEMORY_TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeToolError(f"memory measurement of {path} timed out after {_MEMORY_TIMEOUT_S} s") from exc
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        raise RuntimeToolError(f"memory measurement of {path} failed: {lines[-1] if lines else proc.returncode}")
    try:
        return int(json.loads(proc.stdout.strip().splitlines()[-1])["peak"])
    except (ValueError, KeyError, IndexError) as exc:
        raise RuntimeToolError(f"memory measurement of {path} printed no result: {proc.stdout[-200:]!r}") from exc
