"""Models saved by transformers in a local folder (``model: {hf: DIR}``), loaded offline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import edgeslim as es  # noqa: E402
from edgeslim.errors import ModelError  # noqa: E402
from edgeslim.models.hf import SentenceEncoder, load_hf  # noqa: E402

FAST = es.RuntimeConfig(warmup=1, runs=5, rounds=1, measure_memory=False)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(59)]


def _save_tokenizer(path) -> None:
    (path / "vocab.txt").write_text("\n".join(VOCAB))
    transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(str(path))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-image")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
                                    architectures=["ResNetForImageClassification"])
    transformers.ResNetForImageClassification(cfg).save_pretrained(str(path))
    (path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 40}, "do_center_crop": True, "crop_size": {"height": 32, "width": 32},
        "do_normalize": True, "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}))
    return path


def test_image_classifier_loads_with_its_preprocessing_and_quantizes(image_dir, tmp_path):
    hf = load_hf(image_dir)
    assert hf.kind == "image" and hf.input_names == ("pixel_values",)
    assert hf.preprocess == {"resize": 40, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    reference = transformers.ResNetForImageClassification.from_pretrained(str(image_dir)).eval()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        logits = hf.module(x)
        assert torch.equal(logits, reference(pixel_values=x).logits)  # the saved weights, not random ones
    y = logits.argmax(1).numpy()
    task = es.Task(hf.module, (x[:1],), calibration=(x[:32].numpy(), y[:32]), evaluation=(x[32:].numpy(), y[32:]),
                   input_names=hf.input_names)
    result = es.compress(task, [es.PTQInt8Config(progress=False)], runtime=FAST, out_dir=tmp_path / "run",
                         progress=False)
    assert result.stages[1].metrics["int8_op_fraction"] == 1.0


def test_text_models_load_as_classifier_or_pooled_encoder(tmp_path):
    torch.manual_seed(0)
    small = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64)
    classifier = tmp_path / "classifier"
    cfg = transformers.BertConfig(**small, num_labels=3, architectures=["BertForSequenceClassification"])
    transformers.BertForSequenceClassification(cfg).save_pretrained(str(classifier))
    _save_tokenizer(classifier)
    encoder = tmp_path / "encoder"
    transformers.BertModel(transformers.BertConfig(**small, architectures=["BertModel"])).save_pretrained(str(encoder))
    _save_tokenizer(encoder)

    ids = torch.tensor([[2, 7, 8, 9, 3, 0]])
    mask = (ids != 0).long()
    hf = load_hf(classifier)
    assert hf.kind == "text_classifier" and hf.input_names == ("input_ids", "attention_mask")
    assert hf.module(ids, mask).shape == (1, 3)
    hf = load_hf(encoder)
    assert hf.kind == "text_encoder" and isinstance(hf.module, SentenceEncoder)
    assert hf.module.pooling == "mean" and not hf.module.normalize  # no sentence-transformers modules.json
    assert hf.max_length == 512
    emb = hf.module(ids, mask)
    # Masked mean pooling: the padding token does not change the embedding.
    np.testing.assert_allclose(emb.detach().numpy(), hf.module(ids[:, :5], mask[:, :5]).detach().numpy(), atol=1e-5)


def test_bad_folders_fail_with_one_line(tmp_path, image_dir):
    with pytest.raises(ModelError, match="no config.json"):
        load_hf(tmp_path)
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text((image_dir / "config.json").read_text())
    with pytest.raises(ModelError, match="cannot load"):
        load_hf(config_only)


def test_recipe_with_a_text_encoder_folder_scores_cosine_on_the_sentences(tmp_path, monkeypatch):
    from edgeslim.recipe import load_recipe, run_recipe

    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    cfg = transformers.BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, architectures=["BertModel"])
    transformers.BertModel(cfg).save_pretrained(str(encoder))
    _save_tokenizer(encoder)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(json.dumps({
        "model": {"hf": "encoder"}, "data": {"dataset": "sentences", "seq_len": 16, "calibration_samples": 16,
                                             "eval_samples": 16},
        "steps": [{"technique": "dynamic_int8"}], "output": "out",
        "runtime": {"warmup": 1, "runs": 3, "rounds": 1, "measure_memory": False}}))
    recipe = load_recipe(tmp_path / "recipe.yaml")
    assert recipe.metric == "cosine"  # an encoder's default: fidelity to its fp32 embeddings
    fp32, int8 = run_recipe(recipe, progress=False).stages
    assert fp32.metrics["cosine"] > 0.9999 and int8.metrics["cosine"] > 0.9
    (tmp_path / "recipe.yaml").write_text(json.dumps({"model": {"hf": "encoder"}, "data": {"dataset": "digits"}}))
    with pytest.raises(es.errors.ConfigError, match="does not fit model"):
        load_recipe(tmp_path / "recipe.yaml")
