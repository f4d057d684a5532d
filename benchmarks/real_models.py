"""Pretrained ImageNet models on real images: edgeslim's default int8 vs ONNX Runtime's and NNCF's.

    python benchmarks/real_models.py --data-dir ../shared/data/imagenet-sample [--quick] [--json OUT]

Models: EfficientNet-Lite1 and Lite2 (weights shipped offline by the `vision` extra), each at its
own preprocessing, built exactly as a recipe builds them (`model: {name: ...}`, `data: {images:,
labels:}`). The images are split by seed: a calibration part, and an evaluation part none of the
methods sees before scoring. Every method gets the same calibration batches.

- `edgeslim_default`: the registered `ptq_int8` technique with its default config, what
  `steps: [{technique: ptq_int8}]` runs; `seconds` is its whole wall time (export, calibration,
  lowering, parity check).
- `ort_quantize_static`: ONNX Runtime's quantize_static after quant_pre_process (QDQ, per-channel
  weights, MinMax, its default types); `nncf_quantize`: NNCF's ONNX post-training quantization.

Per method: top-1 on the labels, top-1 agreement with the fp32 graph, size, p50 latency at batch 1
and 1 intra-op thread with all methods of a model interleaved in one comparison. The verdict holds,
per model, `agreement` (edgeslim's), `latency_vs_ortq` (edgeslim int8 p50 / ORT int8 p50, measured
interleaved) and `calibration_seconds`, and whether each meets its target: agreement >= 0.99,
latency_vs_ortq <= 1.0, calibration <= 60 s.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from _common import build_graphs, parser, run_sections  # noqa: E402
from _peers import nncf_quantize, ort_quantize_static  # noqa: E402

from edgeslim.evaluate import agreement  # noqa: E402
from edgeslim.quantize import PTQInt8Config  # noqa: E402
from edgeslim.quantize.ptq_technique import ptq_int8  # noqa: E402
from edgeslim.runtime import compare_latency, inspect_optimized, make_session, run  # noqa: E402
from edgeslim.task import ModelArtifact, Task, iter_batches  # noqa: E402

MODELS = ("efficientnet_lite1", "efficientnet_lite2")
TARGETS = {"agreement": 0.99, "latency_vs_ortq": 1.0, "calibration_seconds": 60.0}


def _task(name: str, args) -> Task:
    from edgeslim.recipe import build_task, parse_recipe

    if args.data_dir is None:
        raise SystemExit("--data-dir is required (the imagenet-sample folder: images/ and labels.csv)")
    recipe = parse_recipe({
        "model": {"name": name},
        "data": {"images": str(args.data_dir / "images"), "labels": str(args.data_dir / "labels.csv"),
                 "calibration_samples": 100 if args.quick else 200, "eval_samples": 200 if args.quick else 800},
        "metric": "accuracy",
    })
    return build_task(recipe, progress=False)


def _outputs(path: Path, task: Task) -> tuple[np.ndarray, np.ndarray]:
    session = make_session(path, threads=None)
    outs, ys = zip(*((run(session, x)[0], y) for x, y in iter_batches(task.evaluation, 50)))
    return np.concatenate(outs), np.concatenate(ys)


def model_rows(name: str, args) -> list[dict[str, Any]]:
    task = _task(name, args)
    fp32 = task.export(task.model)
    calib = [x for x, _ in task.calibration_batches(32)]
    methods: dict[str, Callable[[], onnx.ModelProto | None]] = {
        "fp32": lambda: fp32,
        "edgeslim_default": lambda: ptq_int8(ModelArtifact(task.model), PTQInt8Config(progress=False), task).onnx,
        "ort_quantize_static": lambda: ort_quantize_static(fp32, calib),
        "nncf_quantize": lambda: nncf_quantize(fp32, calib),
    }
    paths, seconds = build_graphs(methods, f"real.{name}")
    x = task.example_inputs[0].numpy()
    lat = compare_latency(paths, x, threads=1, warmup=10, runs=60 if args.quick else 200, rounds=5)
    reference, labels = _outputs(paths["fp32"], task)
    rows = []
    for method, path in paths.items():
        out, _ = _outputs(path, task)
        rows.append({
            "model": name, "method": method, "metric_name": "accuracy",
            "metric": float((out.argmax(1) == labels).mean()), "agreement": agreement(out, reference),
            "size_bytes": path.stat().st_size, "latency_ms_p50": lat[method].p50_ms,
            "speedup_vs_fp32": lat["fp32"].p50_ms / lat[method].p50_ms,
            "latency_vs_ortq": lat[method].p50_ms / lat["ort_quantize_static"].p50_ms,
            "int8_op_fraction": inspect_optimized(path).int8_op_fraction, "seconds": round(seconds[method], 2),
            "eval_samples": len(labels), "calibration_samples": sum(len(b) for b in calib),
        })
    return rows


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: edgeslim default's agreement, latency vs ORT int8 and calibration seconds, each
    against its target; ``all_met`` when every model meets all three."""
    models = {}
    for name in dict.fromkeys(r["model"] for r in rows):
        ours = next(r for r in rows if r["model"] == name and r["method"] == "edgeslim_default")
        ort = next(r for r in rows if r["model"] == name and r["method"] == "ort_quantize_static")
        fig = {"agreement": ours["agreement"], "latency_vs_ortq": round(ours["latency_vs_ortq"], 3),
               "calibration_seconds": ours["seconds"], "top1_fp32": next(
                   r["metric"] for r in rows if r["model"] == name and r["method"] == "fp32"),
               "top1_int8": ours["metric"], "ort_agreement": ort["agreement"]}
        fig["met"] = {"agreement": fig["agreement"] >= TARGETS["agreement"],
                      "latency_vs_ortq": fig["latency_vs_ortq"] <= TARGETS["latency_vs_ortq"],
                      "calibration_seconds": fig["calibration_seconds"] <= TARGETS["calibration_seconds"]}
        models[name] = fig
    return {"models": models, "targets": TARGETS,
            "all_met": all(all(m["met"].values()) for m in models.values())}


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", choices=MODELS, default=None)
    args = p.parse_args()
    sections = {name: (name, lambda a, n=name: model_rows(n, a)) for name in MODELS}
    run_sections("real_models", args, sections, verdict)


if __name__ == "__main__":
    main()
