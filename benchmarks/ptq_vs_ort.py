"""edgeslim int8 PTQ vs ONNX Runtime's quantize_static, same model, same calibration data, one run.

    python benchmarks/ptq_vs_ort.py [--quick] [--data-dir ../shared/data/mnist] [--json OUT]

Model: the bundled `vgg_small` CNN trained on MNIST (full MNIST from IDX files in --data-dir, or the
bundled 5k sample without it). Both quantizers get the same 512 calibration images; ORT runs
`quant_pre_process` then `quantize_static` (QDQ, per-channel, MinMax, S8S8: its defaults for QDQ).
All models are timed side by side, interleaved, at 1 intra-op thread, batch 1.
Targets: edgeslim latency p50 <= 1.05x ORT's; accuracy >= ORT's.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import finish, parser  # noqa: E402
from _peers import ort_quantize_static  # noqa: E402


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    import onnx

    from edgeslim.pipeline import evaluate_onnx
    from edgeslim.quantize import PTQInt8Config, quantize_static
    from edgeslim.recipe import build_task, parse_recipe
    from edgeslim.runtime import compare_latency, export_onnx, inspect_optimized, size_bytes

    data = {"dataset": "mnist", "dir": str(args.data_dir)} if args.data_dir else {"dataset": "mnist_sample"}
    recipe = parse_recipe({
        # One epoch over the 60k full-MNIST images matches three over the 4k sample (2 cores).
        "model": {"name": "vgg_small", "train": {"epochs": 1 if args.data_dir else 3, "lr": 2e-3, "batch_size": 64,
                                                 "seed": 0}},
        "data": {**data, "calibration_samples": 512, "eval_samples": 2000 if args.quick else None},
        "steps": [],
    })
    task = build_task(recipe)
    calib = task.calibration[0][:512].astype(np.float32)
    tmp = Path(tempfile.mkdtemp(prefix="ptq_vs_ort."))
    fp32 = export_onnx(task.model, task.example_inputs)
    paths = {"fp32": tmp / "fp32.onnx"}
    onnx.save(fp32, paths["fp32"])
    seconds = {"fp32": 0.0}

    t0 = time.perf_counter()
    paths["ort_quantize_static"] = tmp / "ort.onnx"
    onnx.save(ort_quantize_static(fp32, [calib[i : i + 32] for i in range(0, len(calib), 32)]), paths["ort_quantize_static"])
    seconds["ort_quantize_static"] = time.perf_counter() - t0
    for dtype in ("int8", "uint8"):
        name = f"edgeslim_ptq_minmax_{dtype}"
        t0 = time.perf_counter()
        cfg = PTQInt8Config(activation_dtype=dtype, progress=False)
        q = quantize_static(fp32, (calib[i : i + 32] for i in range(0, len(calib), 32)), cfg)
        seconds[name] = time.perf_counter() - t0
        paths[name] = tmp / f"{name}.onnx"
        onnx.save(q, paths[name])

    runs = 300 if args.quick else 1000
    x = task.example_inputs[0].numpy()
    lat = compare_latency(paths, x, threads=1, warmup=50, runs=runs, rounds=10)
    n_eval = len(task.evaluation[0])
    rows = []
    for name, path in paths.items():
        acc = evaluate_onnx(path, task)
        report = inspect_optimized(path)
        rows.append({
            "model": "vgg_small", "method": name, "metric_name": "accuracy", "metric": acc,
            "errors": int(round((1 - acc) * n_eval)), "eval_samples": n_eval,
            "size_bytes": size_bytes(path), "latency_ms_p50": lat[name].p50_ms, "latency_ms_p90": lat[name].p90_ms,
            "speedup_vs_fp32": lat["fp32"].p50_ms / lat[name].p50_ms, "int8_op_fraction": report.int8_op_fraction,
            "seconds": round(seconds[name], 2),
        })
    ort_row = next(r for r in rows if r["method"] == "ort_quantize_static")
    best = max((r for r in rows if r["method"].startswith("edgeslim")), key=lambda r: (r["metric"], -r["latency_ms_p50"]))
    verdict = {
        "edgeslim_best": best["method"],
        "latency_ratio_vs_ort": best["latency_ms_p50"] / ort_row["latency_ms_p50"],
        "accuracy_delta_vs_ort": best["metric"] - ort_row["metric"],
        "targets_met": bool(best["latency_ms_p50"] <= 1.05 * ort_row["latency_ms_p50"] and best["metric"] >= ort_row["metric"]),
    }
    finish("ptq_vs_ort", rows, args, {"verdict": verdict, "data": recipe.data.dataset})
    print(verdict)


if __name__ == "__main__":
    main()
