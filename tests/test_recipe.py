"""Recipes map one-to-one to the configs and fail up front with the field named."""

import pytest

from edgeslim.errors import CheckpointError, ConfigError
from edgeslim.quantize import PTQInt8Config
from edgeslim.recipe import load_recipe, parse_recipe

BASE = {"model": {"name": "lenet300"}, "data": {"dataset": "digits"}}


def test_valid_recipe_maps_to_configs(tmp_path):
    r = parse_recipe({**BASE, "steps": [{"technique": "ptq_int8", "activation_dtype": "uint8"}],
                      "runtime": {"threads": 2}, "output": "out"}, tmp_path)
    assert r.steps == (PTQInt8Config(activation_dtype="uint8"),)
    assert r.runtime.threads == 2
    assert r.output == str(tmp_path / "out")
    again = parse_recipe({**r.to_dict(), "output": "out"}, tmp_path)
    assert again == r


@pytest.mark.parametrize("recipe, field", [
    ({**BASE, "stepz": []}, "stepz"),
    ({**BASE, "steps": [{"technique": "ptq_int9"}]}, r"steps\[0\]\.technique"),
    ({**BASE, "steps": [{"technique": "ptq_int8", "bitz": 4}]}, r"steps\[0\]\.bitz"),
    ({**BASE, "steps": [{"technique": "ptq_int8", "calibration_samples": "many"}]}, r"steps\[0\]\.calibration_samples"),
    ({**BASE, "steps": [{"technique": "ptq_int8", "calibration_samples": 0}]}, r"steps\[0\]\.calibration_samples"),
    ({**BASE, "runtime": {"threads": 0}}, r"runtime\.threads"),
    ({**BASE, "runtime": {"thread": 1}}, r"runtime\.thread"),
    ({"model": {"name": "resnet1000"}}, r"model\.name"),
    ({"model": {"factory": "nocolon"}}, r"model\.factory"),
    ({"model": {}}, "model"),
    ({**BASE, "data": {"dataset": "imagenet"}}, r"data\.dataset"),
    ({**BASE, "data": {"dataset": "digits", "calibration_samples": 0}}, r"data\.calibration_samples"),
    ({**BASE, "metric": "bleu"}, "metric"),
    ({"data": {"dataset": "digits"}}, "model"),
    ({"model": {"name": "minilm"}, "data": {"dataset": "digits"}}, r"data\.dataset"),
    ({"model": {"name": "lenet300"}, "data": {"dataset": "sentences"}}, r"data\.dataset"),
    ({"model": {"name": "minilm", "train": {"epochs": 1}}, "data": {"dataset": "sentences"}}, "pretrained"),
    ({"model": {"name": "minilm"}, "data": {"dataset": "sentences", "seq_len": 0}}, r"data\.seq_len"),
])
def test_bad_recipes_name_the_field(recipe, field, tmp_path):
    with pytest.raises(ConfigError, match=field):
        parse_recipe(recipe, tmp_path)


def test_missing_checkpoint_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothere.safetensors"):
        parse_recipe({"model": {"name": "lenet300", "checkpoint": "nothere.safetensors"}}, tmp_path)


def test_load_recipe_reports_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_text_recipe_defaults_to_cosine(tmp_path):
    r = parse_recipe({"model": {"name": "minilm"}, "data": {"dataset": "sentences", "seq_len": 64},
                      "steps": [{"technique": "ptq_int8", "op_types": ["MatMul"]}]}, tmp_path)
    assert r.metric == "cosine" and r.data.seq_len == 64 and r.steps[0].op_types == ("MatMul",)
