"""A catalogue of bad inputs, through the CLI and the Python API.

Every case must fail with exit code 2 (CLI) or an ``EdgeslimError`` (API), with one line that
names the offending field, file, flag, layer or operator, and must leave every file outside the
run's own folder unchanged: the workspace (recipes, checkpoints and a folder of the user's own
files) is hashed before and after each case.
"""

from __future__ import annotations

import hashlib
import json
import os
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeslim.cli import main
from edgeslim.errors import ConfigError, DataError, EdgeslimError, ModelError, NumericalError, OutputError

FAST = {"threads": 1, "warmup": 1, "runs": 5, "rounds": 1, "measure_memory": False}
BASE = {
    "model": {"name": "lenet300", "train": {"epochs": 1}},
    "data": {"dataset": "digits", "calibration_samples": 64},
    "steps": [{"technique": "ptq_int8", "progress": False}],
    "runtime": FAST,
    "output": "out",
}

# User code the factory cases import (a recipe's factory runs Python code, like trust_remote_code).
USER_MODELS = textwrap.dedent("""
    import torch
    from torch import nn

    class Eigh(nn.Module):
        def forward(self, x):
            return torch.linalg.eigh(x @ x.transpose(-1, -2))[0]

    class WithEigh(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 16)
            self.odd = Eigh()

        def forward(self, x):
            h = self.fc(x.flatten(1)).reshape(x.shape[0], 4, 4)
            return self.odd(h).repeat(1, 3)[:, :10]

    class Log(nn.Module):
        def forward(self, x):
            return x.log()  # NaN for negative inputs: the loss diverges at once

    def eigh():
        return WithEigh()

    def diverges():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 10), Log())

    def wrong_input():
        return nn.Sequential(nn.Flatten(), nn.Linear(10, 2))

    def raises():
        raise RuntimeError("no GPU here")

    def not_a_module():
        return 42

    def rgb2(pretrained=True):
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))  # two classes

    def data_raises():
        raise FileNotFoundError("my_dataset.h5")

    def data_ragged():
        return [[1.0, 2.0]], [0, 1, 2]
""")


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for every folder) under ``root``."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        if rel.parts and rel.parts[0] in skip:
            continue
        for d in dirs:
            out[str(rel / d)] = "<dir>"
        for f in files:
            out[str(rel / f)] = hashlib.sha256((Path(dirpath) / f).read_bytes()).hexdigest()
    return out


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project folder: the user's own files in ``mydata/``, user models, a few checkpoints."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "notes.txt").write_text("my notes")
    (tmp_path / "mydata" / "metrics.json").write_text('{"mine": true}')
    (tmp_path / "usermodels.py").write_text(USER_MODELS)
    (tmp_path / "afile").write_text("a file, not a folder")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("an earlier thing of the user's")
    os.symlink(tmp_path / "mydata", tmp_path / "link")
    from edgeslim.models import build_model

    from safetensors.torch import save_file

    good = build_model("lenet300", input_size=8, num_classes=10)
    torch.save(good, tmp_path / "pickled.pt")  # a whole pickled module: must be refused
    bad_shape = {k: torch.zeros(3, 3) if k.endswith("weight") else v for k, v in good.state_dict().items()}
    save_file({k: v.contiguous() for k, v in bad_shape.items()}, tmp_path / "wrong_shape.safetensors")
    nan_state = {k: v.clone().contiguous() for k, v in good.state_dict().items()}
    first = next(iter(nan_state))
    nan_state[first][0] = float("nan")
    save_file(nan_state, tmp_path / "nan.safetensors")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    _images(tmp_path)
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    return tmp_path


def _images(root: Path) -> None:
    """Image folders: ``imgs/`` (two classes of 8x8 PNGs), one with an undecodable JPEG, one with an
    empty class folder; labels files without the columns and with a label the model lacks."""
    from PIL import Image

    for name, value in (("a", 40), ("b", 200)):
        for k in range(3):
            for folder in ("imgs", "broken", "empty_class"):
                (root / folder / name).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (value, k, 0)).save(root / folder / name / f"{k}.png")
    (root / "broken" / "b" / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "empty_class" / "c").mkdir()
    (root / "no_columns.csv").write_text("filename,class\na/0.png,0\n")
    (root / "label_range.csv").write_text("file,label\n" + "".join(f"a/{k}.png,{k + 3}\n" for k in range(3))
                                          + "".join(f"b/{k}.png,1\n" for k in range(3)))
    (root / "bad.npz").write_bytes(b"not a zip")
    np.savez(root / "no_y.npz", x=np.zeros((4, 3, 8, 8), np.float32))


IMAGE_BASE = {"model": {"factory": "usermodels:rgb2", "pretrained": True},
              "data": {"images": "imgs", "calibration_samples": 2, "preprocess": {"resize": 8, "crop": 8}}}


def recipe_with(**changes) -> dict:
    """BASE with top-level fields replaced; ``model__train`` style keys change nested fields."""
    recipe = json.loads(json.dumps(BASE))
    for key, value in changes.items():
        *path, last = key.split("__")
        node = recipe
        for part in path:
            node = node.setdefault(part, {})
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = json.loads(json.dumps(value))  # a copy: later changes leave ``value`` as it is
    return recipe


DROP = object()
BIG = 10**12

# (case id, recipe as a dict or raw YAML text, extra CLI args, what the message must name)
RECIPE_CASES = [
    ("unknown-top-field", recipe_with(modle=1), [], "modle"),
    ("missing-model", recipe_with(model=DROP), [], "model"),
    ("top-level-list", "- model\n- data\n", [], "top level"),
    ("duplicate-key", "model: {name: lenet300}\nmodel: {name: lenet5}\noutput: out\n", [], "duplicate key 'model'"),
    ("duplicate-nested-key", "model: {name: lenet300, train: {epochs: 1, epochs: 5}}\n", [], "duplicate key 'epochs'"),
    ("python-tag", "model: !!python/object/apply:os.system ['echo pwned']\n", [], "YAML"),
    ("unclosed-yaml", "model: [unclosed\n", [], "not valid YAML"),
    ("unknown-technique", recipe_with(steps=[{"technique": "magic"}]), [], "steps[0].technique"),
    ("unknown-step-field", recipe_with(steps=[{"technique": "ptq_int8", "bogus": 1}]), [], "steps[0].bogus"),
    ("step-field-type", recipe_with(steps=[{"technique": "ptq_int8", "calibration_samples": "many"}]), [],
     "steps[0].calibration_samples"),
    ("observer", recipe_with(steps=[{"technique": "ptq_int8", "observer": "bogus"}]), [], "steps[0].observer"),
    ("percentile", recipe_with(steps=[{"technique": "ptq_int8", "percentile": 10.0}]), [], "percentile"),
    ("step-batch-huge", recipe_with(steps=[{"technique": "ptq_int8", "batch_size": BIG}]), [], "batch_size"),
    ("sparsity", recipe_with(steps=[{"technique": "prune_magnitude", "sparsity": 1.5}]), [], "sparsity"),
    ("prune-lr-nan", recipe_with(steps=[{"technique": "prune_magnitude", "fine_tune": {"epochs": 1, "lr": float("nan")}}]),
     [], "steps[0].fine_tune.lr"),
    ("distill-epochs-huge", recipe_with(steps=[{"technique": "distill", "fine_tune": {"epochs": BIG}}]), [],
     "steps[0].fine_tune.epochs"),
    ("fine-tune-flat", recipe_with(steps=[{"technique": "prune_magnitude", "epochs": 1}]), [],
     "steps[0].epochs: moved into fine_tune (write fine_tune: {epochs: 1})"),
    ("steps-not-list", recipe_with(steps={"technique": "ptq_int8"}), [], "steps"),
    ("runs-huge", recipe_with(runtime__runs=BIG), [], "runtime.runs"),
    ("runs-zero", recipe_with(runtime__runs=0), [], "runtime.runs"),
    ("threads-huge", recipe_with(runtime__threads=BIG), [], "runtime.threads"),
    ("threads-more-than-cores", recipe_with(runtime__threads=(os.cpu_count() or 1) + 1), [], "runtime.threads"),
    ("threads-string", recipe_with(runtime__threads="two"), [], "runtime.threads"),
    ("batch-huge", recipe_with(runtime__batch_size=BIG), [], "runtime.batch_size"),
    ("warmup-negative", recipe_with(runtime__warmup=-1), [], "runtime.warmup"),
    ("rounds-huge", recipe_with(runtime__rounds=BIG), [], "runtime.rounds"),
    ("runtime-unknown", recipe_with(runtime__bogus=1), [], "runtime.bogus"),
    ("train-epochs-zero", recipe_with(model__train__epochs=0), [], "epochs"),
    ("train-epochs-huge", recipe_with(model__train__epochs=BIG), [], "epochs"),
    ("train-lr-negative", recipe_with(model__train__lr=-1.0), [], "lr"),
    ("train-lr-inf", recipe_with(model__train__lr=float("inf")), [], "lr"),
    ("train-seed-negative", recipe_with(model__train__seed=-3), [], "seed"),
    ("dataset", recipe_with(data__dataset="imagenet21k"), [], "dataset"),
    ("calibration-zero", recipe_with(data__calibration_samples=0), [], "calibration_samples"),
    ("data-dir-missing", recipe_with(data__dataset="mnist", data__dir="no_such_dir"), [], "no_such_dir"),
    ("model-name", recipe_with(model={"name": "resnet9000"}), [], "resnet9000"),
    ("name-and-factory", recipe_with(model={"name": "lenet300", "factory": "a:b"}), [], "exactly one"),
    ("factory-no-colon", recipe_with(model={"factory": "usermodels"}), [], "factory"),
    ("factory-missing-module", recipe_with(model={"factory": "nosuchmodule:make"}), [], "nosuchmodule"),
    ("factory-raises", recipe_with(model={"factory": "usermodels:raises"}), [], "no GPU here"),
    ("factory-not-module", recipe_with(model={"factory": "usermodels:not_a_module"}), [], "not a torch.nn.Module"),
    ("factory-forward-fails", recipe_with(model={"factory": "usermodels:wrong_input"}), [], "(1, 1, 8, 8)"),
    ("unsupported-op", recipe_with(model={"factory": "usermodels:eigh", "train": {"epochs": 1}}), [],
     "linalg_eigh"),
    ("training-diverges", recipe_with(model={"factory": "usermodels:diverges", "train": {"epochs": 1}}), [],
     "training diverged"),
    ("checkpoint-missing", recipe_with(model={"name": "lenet300", "checkpoint": "gone.safetensors"}), [],
     "gone.safetensors"),
    ("checkpoint-pickle", recipe_with(model={"name": "lenet300", "checkpoint": "pickled.pt"}), [], "pickled.pt"),
    ("checkpoint-shapes", recipe_with(model={"name": "lenet300", "checkpoint": "wrong_shape.safetensors"}), [],
     "shape mismatch"),
    ("checkpoint-nan", recipe_with(model={"name": "lenet300", "checkpoint": "nan.safetensors"}), [], "NaN"),
    ("metric", recipe_with(metric="f1"), [], "metric"),
    ("seed-negative", recipe_with(seed=-1), [], "seed"),
    ("seed-string", recipe_with(seed="zero"), [], "seed"),
    ("output-list", recipe_with(output=["a", "b"]), [], "output"),
    ("out-is-file", recipe_with(), ["--out", "afile"], "afile"),
    ("out-user-folder", recipe_with(), ["--out", "mydata"], "mydata"),
    ("out-cwd", recipe_with(), ["--out", "."], "output ."),
    ("out-folder-of-runs", recipe_with(), ["--out", "runs"], "runs"),
    ("out-under-file", recipe_with(), ["--out", "afile/sub"], "afile"),
    ("out-symlink", recipe_with(), ["--out", "link"], "symbolic link"),
    ("unknown-flag", recipe_with(), ["--frobnicate"], "--frobnicate"),
    ("images-missing", recipe_with(**IMAGE_BASE, data__images="no_such_images"), [], "no_such_images"),
    ("image-undecodable", recipe_with(**IMAGE_BASE, data__images="broken", data__calibration_samples=6), [],
     "bad.jpg: cannot decode image"),
    ("class-folder-empty", recipe_with(**IMAGE_BASE, data__images="empty_class"), [], "empty_class/c"),
    ("labels-no-columns", recipe_with(**IMAGE_BASE, data__labels="no_columns.csv"), [],
     "no_columns.csv:1: missing column(s) file, label"),
    ("labels-file-missing", recipe_with(**IMAGE_BASE, data__labels="gone.csv"), [], "gone.csv"),
    ("label-out-of-range", recipe_with(**IMAGE_BASE, data__labels="label_range.csv"), [],
     "label_range.csv: label 5 is not one of the model's 2 outputs"),
    ("calibration-takes-all-images", recipe_with(**IMAGE_BASE, data__calibration_samples=6), [], "leaves none"),
    ("preprocess-crop-over-resize", recipe_with(**IMAGE_BASE, data__preprocess={"resize": 8, "crop": 16}), [],
     "data.preprocess.crop"),
    ("preprocess-field", recipe_with(**IMAGE_BASE, data__preprocess={"size": 8}), [], "data.preprocess.size"),
    ("input-shape-mismatch", recipe_with(**IMAGE_BASE, model__input_shape=[3, 16, 16]), [],
     "model.input_shape [3, 16, 16] does not fit the data"),
    ("two-data-sources", recipe_with(**IMAGE_BASE, data__arrays="x.npz"), [], "one data source"),
    ("npz-not-zip", recipe_with(model=IMAGE_BASE["model"], data={"arrays": "bad.npz"}), [], "bad.npz"),
    ("npz-without-y", recipe_with(model=IMAGE_BASE["model"], data={"arrays": "no_y.npz"}), [], "no array named 'y'"),
    ("data-factory-raises", recipe_with(model=IMAGE_BASE["model"], data={"factory": "usermodels:data_raises"}), [],
     "my_dataset.h5"),
    ("data-factory-ragged", recipe_with(model=IMAGE_BASE["model"], data={"factory": "usermodels:data_ragged"}), [],
     "data.factory usermodels:data_ragged"),
    ("data-factory-missing", recipe_with(model=IMAGE_BASE["model"], data={"factory": "nomodule:load"}), [],
     "nomodule"),
    ("vision-model-on-digits", recipe_with(model={"name": "efficientnet_lite1"}), [], "takes RGB images"),
    ("pretrained-and-train", recipe_with(model={"factory": "usermodels:rgb2", "pretrained": True,
                                                "train": {"epochs": 1}}), [], "pretrained"),
    ("metric-list-unknown", recipe_with(metric=["accuracy", "f1"]), [], "'f1'"),
]


@pytest.mark.parametrize("case, recipe, extra, needle", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_bad_recipe_exits_2_and_changes_nothing(workspace, capsys, case, recipe, extra, needle):
    path = workspace / "recipe.yaml"
    path.write_text(recipe if isinstance(recipe, str) else json.dumps(recipe))  # JSON is YAML
    before = snapshot(workspace)
    code = main(["run", str(path), "--quiet", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "\x1b[" not in err, err
    assert err.startswith("edgeslim: error: ") and needle in err, err
    assert snapshot(workspace) == before  # nothing created, changed or removed: not even an empty folder


def test_recipe_not_found_and_not_text(workspace, capsys):
    for argv, needle in ((["run", "missing.yaml"], "missing.yaml"), (["run", "binary.yaml"], "binary.yaml")):
        before = snapshot(workspace)
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
        assert snapshot(workspace) == before


def test_unsupported_op_names_the_module_and_trains_nothing(workspace, capsys):
    path = workspace / "recipe.yaml"
    path.write_text(json.dumps(recipe_with(model={"factory": "usermodels:eigh", "train": {"epochs": 1}})))
    assert main(["run", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "in module 'odd' (Eigh)" in err and "dynamic_batch" not in err
    assert not list(Path(os.environ["EDGESLIM_CACHE"]).glob("checkpoints/usermodels.eigh-*"))  # never trained


def test_diverged_training_is_never_cached(workspace, capsys):
    path = workspace / "recipe.yaml"
    path.write_text(json.dumps(recipe_with(model={"factory": "usermodels:diverges", "train": {"epochs": 1}})))
    for _ in range(2):  # the second run trains again (and fails again) instead of loading a NaN model
        assert main(["run", str(path), "--quiet"]) == 2
        assert "training diverged at epoch 1, batch 1: loss is nan" in capsys.readouterr().err
    assert not list(Path(os.environ["EDGESLIM_CACHE"]).glob("checkpoints/usermodels.diverges-*"))


@pytest.fixture(scope="module")
def onnx_files(tmp_path_factory):
    """A float model with a dynamic batch, and one with a dynamic sequence axis too."""
    from edgeslim.runtime import export_onnx

    tmp = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    export_onnx(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval(), (torch.rand(1, 1, 8, 8),), tmp / "cnn.onnx")

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 8)

        def forward(self, ids):
            return self.emb(ids).mean(1)

    export_onnx(Tokens().eval(), (torch.zeros(1, 5, dtype=torch.long),), tmp / "seq.onnx",
                dynamic_dims=[{1: "seq"}])
    return tmp


FLAG_CASES = [
    ("bench-missing-file", ["bench", "{w}/nope.onnx"], "nope.onnx"),
    ("bench-junk-file", ["bench", "{w}/junk.onnx"], "junk.onnx"),
    ("bench-threads-huge", ["bench", "{o}/cnn.onnx", "--threads", "1000000"], "--threads"),
    ("bench-threads-zero", ["bench", "{o}/cnn.onnx", "--threads", "0"], "--threads"),
    ("bench-runs-huge", ["bench", "{o}/cnn.onnx", "--runs", str(BIG)], "--runs"),
    ("bench-runs-zero", ["bench", "{o}/cnn.onnx", "--runs", "0"], "--runs"),
    ("bench-batch-huge", ["bench", "{o}/cnn.onnx", "--batch-size", str(BIG)], "--batch-size"),
    ("bench-warmup-negative", ["bench", "{o}/cnn.onnx", "--warmup", "-1"], "--warmup"),
    ("bench-shape-syntax", ["bench", "{o}/cnn.onnx", "--shape", "input=1by8"], "--shape"),
    ("bench-shape-unknown-input", ["bench", "{o}/cnn.onnx", "--shape", "pixels=1x1x8x8"], "pixels"),
    ("bench-shape-rank", ["bench", "{o}/cnn.onnx", "--shape", "input=1x64"], "4 axes"),
    ("bench-shape-fixed-axis", ["bench", "{o}/cnn.onnx", "--shape", "input=1x3x8x8"], "axis 1 is fixed to 1"),
    ("bench-dynamic-axis", ["bench", "{o}/seq.onnx"], "input 'input' axis 1"),
    ("bench-inputs-too-big", ["bench", "{o}/seq.onnx", "--shape", "input=65536x1000000"],
     "over a quarter of this machine's memory"),  # refused before the 500 TB are allocated
    ("inspect-threads-zero", ["inspect", "{o}/cnn.onnx", "--threads", "0"], "--threads"),
    ("inspect-missing", ["inspect", "{w}/nope.onnx"], "nope.onnx"),
    ("inspect-shape-unknown", ["inspect", "{o}/seq.onnx", "--shape", "ids=1x5"], "ids"),
    ("unknown-command", ["compresss"], "compresss"),
]


@pytest.mark.parametrize("case, argv, needle", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_flag_exits_2_and_changes_nothing(workspace, onnx_files, capsys, case, argv, needle):
    argv = [a.format(w=workspace, o=onnx_files) for a in argv]
    before, before_onnx = snapshot(workspace), snapshot(onnx_files)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err, err
    assert snapshot(workspace) == before and snapshot(onnx_files) == before_onnx


def test_shape_flag_measures_a_dynamic_sequence(onnx_files, capsys):
    assert main(["bench", str(onnx_files / "seq.onnx"), "--shape", "input=2x7", "--runs", "5", "--warmup", "1"]) == 0
    assert "p50" in capsys.readouterr().out
    assert main(["inspect", str(onnx_files / "seq.onnx"), "--shape", "input=1x7"]) == 0


# --------------------------------------------------------------------------------- Python API
def _data(n=32, nan=False):
    x = np.random.default_rng(0).random((n, 1, 8, 8), dtype=np.float32)
    if nan:
        x[3, 0, 2, 2] = np.nan
    return x, np.arange(n) % 10


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()


def _nan_model():
    m = _model()
    with torch.no_grad():
        m[1].weight[2, 3] = float("inf")
    return m


def _task(**changes):
    from edgeslim import Task

    x, y = _data()
    kwargs = {"model": _model(), "example_inputs": (torch.from_numpy(x[:1]),), "calibration": (x, y),
              "evaluation": (x, y)}
    kwargs.update(changes)
    return Task(**kwargs)


def _compress(**changes):
    from edgeslim import PTQInt8Config, RuntimeConfig, compress

    kwargs = {"task": _task(), "steps": [PTQInt8Config(progress=False)], "runtime": RuntimeConfig(**FAST)}
    kwargs.update(changes)
    return compress(kwargs.pop("task"), kwargs.pop("steps"), **kwargs)


def _config(name, **fields):
    from edgeslim import registry

    return lambda: registry.get(name).config_type(**fields)


API_CASES = [
    ("task-model-int", lambda: _task(model=42), ModelError, "model"),
    ("task-model-nan", lambda: _task(model=_nan_model()), NumericalError, "'1.weight'"),
    ("task-xy-lengths", lambda: _task(evaluation=(_data()[0], _data()[1][:-1])), DataError, "y has 31"),
    ("task-calibration-empty", lambda: _task(calibration=(_data()[0][:0], _data()[1][:0])), DataError, "calibration"),
    ("task-evaluation-nan", lambda: _task(evaluation=_data(nan=True)), DataError, "evaluation X"),
    ("task-evaluation-not-pair", lambda: _task(evaluation="data.csv"), DataError, "evaluation"),
    ("task-metric", lambda: _task(metric="accuracy"), ConfigError, "metric"),
    ("task-example-inputs", lambda: _task(example_inputs=()), DataError, "example_inputs"),
    ("task-eval-batch", lambda: _task(eval_batch_size=0), ConfigError, "eval_batch_size"),
    ("task-input-names", lambda: _task(input_names=("a", "b")), ConfigError, "input_names"),
    ("ptq-observer", _config("ptq_int8", observer="bogus"), ConfigError, "observer"),
    ("ptq-samples-str", _config("ptq_int8", calibration_samples="10"), ConfigError, "calibration_samples"),
    ("ptq-batch-huge", _config("ptq_int8", batch_size=BIG), ConfigError, "batch_size"),
    ("ptq-exclude-type", _config("ptq_int8", exclude="fc"), ConfigError, "exclude"),
    ("prune-lr-nan", _config("prune_magnitude", fine_tune={"lr": float("nan")}), ConfigError, "fine_tune.lr"),
    ("prune-sparsity", _config("prune_magnitude", sparsity=2.0), ConfigError, "sparsity"),
    ("distill-epochs", _config("distill", fine_tune={"epochs": -1}), ConfigError, "fine_tune.epochs"),
    ("cluster-bits", _config("cluster", conv_bits=99), ConfigError, "conv_bits"),
    ("lowrank-energy", _config("lowrank", energy=float("inf")), ConfigError, "energy"),
    ("runtime-threads", lambda: __import__("edgeslim").RuntimeConfig(threads=BIG), ConfigError, "threads"),
    ("runtime-runs", lambda: __import__("edgeslim").RuntimeConfig(runs=BIG), ConfigError, "runs"),
    ("runtime-seq-lens-zero", lambda: __import__("edgeslim").RuntimeConfig(seq_lens=(16, 0)), ConfigError,
     "seq_lens"),
    ("runtime-seq-lens-word", lambda: __import__("edgeslim").RuntimeConfig(seq_lens="padded"), ConfigError, "seq_lens"),
    ("compress-seq-lens-no-axis", lambda: _compress(runtime=__import__("edgeslim").RuntimeConfig(seq_lens=(16,))),
     ConfigError, "runtime.seq_lens"),
    ("compress-steps-str", lambda: _compress(steps="ptq_int8"), ConfigError, "steps"),
    ("compress-step-dict", lambda: _compress(steps=[{"technique": "ptq_int8"}]), ConfigError, "steps[0]"),
    ("compress-runtime-dict", lambda: _compress(runtime={"threads": 1}), ConfigError, "runtime"),
    ("compress-task", lambda: _compress(task="task"), ConfigError, "task"),
    ("compress-seed", lambda: _compress(seed=-1), ConfigError, "seed"),
    ("compress-out-user-folder", lambda: _compress(out_dir="mydata"), OutputError, "mydata"),
    ("compress-out-file", lambda: _compress(out_dir="afile", overwrite=True), OutputError, "afile"),
]


@pytest.mark.parametrize("case, call, error, needle", API_CASES, ids=[c[0] for c in API_CASES])
def test_bad_api_call_raises_edgeslim_error(workspace, case, call, error, needle):
    before = snapshot(workspace)
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, EdgeslimError)
    assert needle in str(info.value) and len(str(info.value).splitlines()) == 1, str(info.value)
    assert snapshot(workspace) == before


def test_catalogue_is_large():
    assert len(RECIPE_CASES) + len(FLAG_CASES) + len(API_CASES) >= 60
