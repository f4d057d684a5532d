"""YAML recipes: a file that maps one-to-one to the Python API, validated before any work starts.

```yaml
model: {name: vgg_small, train: {epochs: 3}}       # or factory: "pkg.mod:fn" + checkpoint: w.safetensors
data: {dataset: mnist_sample, calibration_samples: 512}   # or images: DIR (+ labels: CSV), arrays: F.npz, factory
metric: accuracy                                   # or a list: [accuracy, top5, agreement]
steps:
  - {technique: ptq_int8, activation_dtype: int8}
runtime: {threads: 1}
output: runs/demo
```
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import os
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from edgeslim import registry
from edgeslim.config import Checked, TechniqueConfig, build_dataclass, check_int
from edgeslim.data.images import IMAGENET, Preprocess
from edgeslim.errors import CheckpointError, ConfigError, DataError, EdgeslimError, ModelError, NumericalError, first_line
from edgeslim.models.efficientnet_lite import VISION_MODELS
from edgeslim.pipeline import RuntimeConfig
from edgeslim.task import METRICS, Task, check_finite, check_forward


TEXT_MODELS = ("minilm",)  # pretrained, shipped by a package; their data set is "sentences"
TEXT_DATASETS = ("sentences",)
PRETRAINED = TEXT_MODELS + tuple(VISION_MODELS)  # shipped with their weights: no train, no checkpoint


def known_models() -> list[str]:
    from edgeslim.models import list_models

    return list_models() + list(PRETRAINED)


@dataclass(frozen=True)
class TrainSpec(Checked):
    """Training used when a model has no checkpoint (the result is cached by content hash)."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"epochs: must be >= 1, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")


@dataclass(frozen=True)
class ModelSpec(Checked):
    """A bundled model ``name``; a ``factory`` ("module:function") called with ``kwargs``; a float
    ONNX file ``onnx`` (then only graph techniques apply: see :mod:`edgeslim.runtime.onnx_source`);
    or a folder ``hf`` saved by ``transformers`` (an image or sequence classifier, or an encoder:
    see :mod:`edgeslim.models.hf`). ONNX files and ``hf`` folders are pretrained.
    A model without a ``checkpoint`` is trained (``train``), unless it is ``pretrained``: a factory
    that returns trained weights, or a bundled pretrained model (their weights ship with them).
    ``input_shape`` (one sample, e.g. ``[3, 240, 240]``) is checked against the data, and gives an
    image folder's default crop (and so a factory model's input size)."""

    name: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    train: TrainSpec | None = None
    input_shape: tuple[int, ...] | None = None
    pretrained: bool = False
    onnx: str | None = None
    hf: str | None = None

    def validate(self) -> None:
        given = [f for f in ("name", "factory", "onnx", "hf") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one of name (a bundled model), factory ('module:function'), onnx "
                              f"(a float .onnx file) or hf (a transformers model folder){'; got ' + ', '.join(given) if given else ''}")
        if (self.onnx or self.hf) and (self.checkpoint or self.train or self.kwargs):
            extra = next(f for f in ("checkpoint", "train", "kwargs") if getattr(self, f))
            raise ConfigError(f"{extra}: a model given as {'onnx' if self.onnx else 'hf'} is used as it is (pretrained)")
        if self.name is not None and self.name not in known_models():
            raise ConfigError(f"name: unknown model {self.name!r} (known: {', '.join(known_models())})")
        if (self.name in PRETRAINED or self.pretrained) and (self.checkpoint or self.train):
            raise ConfigError(f"{self.name or self.factory} is pretrained: it takes neither checkpoint nor train")
        if self.name is not None and self.pretrained and self.name not in PRETRAINED:
            raise ConfigError(f"pretrained: {self.name} ships no weights (pretrained: {', '.join(PRETRAINED)})")
        if self.factory is not None and ":" not in self.factory:
            raise ConfigError(f"factory: expected 'module:function', got {self.factory!r}")
        if self.input_shape is not None and (not self.input_shape or min(self.input_shape) < 1):
            raise ConfigError(f"input_shape: expected the positive sizes of one sample, e.g. [3, 224, 224], "
                              f"got {list(self.input_shape)}")


@dataclass(frozen=True)
class DataSpec(Checked):
    """Where the samples come from, one of: a data set by name (bundled, or read from ``dir``;
    calibration comes from its train split, evaluation from its test split); an image folder
    ``images`` (class folders, or the files a ``labels`` CSV lists) with ``preprocess``; a ``.npz``
    file ``arrays`` (``x`` inputs, ``y`` labels); or a ``factory`` ("module:function", called with
    ``kwargs``) returning ``(X, y)`` or an object with ``x_train, y_train, x_test, y_test``. Images,
    arrays and a factory's ``(X, y)`` are split by ``seed``: ``calibration_samples`` to calibrate
    on, up to ``eval_samples`` of the rest to evaluate on. Without a source: ``mnist_sample``."""

    dataset: str | None = None
    dir: str | None = None
    images: str | None = None
    labels: str | None = None
    preprocess: Preprocess | None = None
    arrays: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    calibration_samples: int = 512
    eval_samples: int | None = None
    seq_len: int = 128  # text data sets: tokens per sentence (padded / truncated)

    def validate(self) -> None:
        from edgeslim.data import DATASETS

        sources = [f for f in ("dataset", "images", "arrays", "factory") if getattr(self, f) is not None]
        if len(sources) > 1:
            raise ConfigError(f"give one data source, not both {sources[0]} and {sources[1]}")
        for needs, what in (("labels", "images"), ("preprocess", "images"), ("dir", "dataset"), ("kwargs", "factory")):
            if getattr(self, needs) and getattr(self, what) is None:
                raise ConfigError(f"{needs}: goes with {what}")
        if self.factory is not None and ":" not in self.factory:
            raise ConfigError(f"factory: expected 'module:function', got {self.factory!r}")
        if not sources:
            object.__setattr__(self, "dataset", "mnist_sample")  # construction: the default data set
        if self.dataset is not None and self.dataset not in DATASETS + TEXT_DATASETS:
            known = ", ".join(DATASETS + TEXT_DATASETS)
            raise ConfigError(f"dataset: unknown data set {self.dataset!r} (known: {known})")
        if self.seq_len < 1:
            raise ConfigError(f"seq_len: must be >= 1, got {self.seq_len}")
        if self.calibration_samples < 1:
            raise ConfigError(f"calibration_samples: must be >= 1, got {self.calibration_samples}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ConfigError(f"eval_samples: must be >= 1, got {self.eval_samples}")


@dataclass(frozen=True)
class Recipe:
    """A whole run; ``seed`` seeds every global generator before the model is built, so that a
    fresh process with a fresh cache produces the same bytes."""

    model: ModelSpec
    data: DataSpec = DataSpec()
    metric: str = "accuracy"  # "cosine" for embedding models
    steps: tuple[TechniqueConfig, ...] = ()
    runtime: RuntimeConfig = RuntimeConfig()
    output: str = "runs/run"
    seed: int = 0
    extra_metrics: tuple[str, ...] = ()  # reported beside ``metric`` (a recipe's metric list after the first)
    # The recipe file's folder: a factory module beside the recipe is importable (not a recipe field).
    base_dir: str = field(default=".", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-ready data (what a run folder saves as ``recipe.yaml``)."""
        metric: str | list[str] = [self.metric, *self.extra_metrics] if self.extra_metrics else self.metric
        return {"model": asdict(self.model), "data": asdict(self.data), "metric": metric,
                "steps": [s.to_dict() for s in self.steps], "runtime": asdict(self.runtime), "output": self.output, "seed": self.seed}


RECIPE_FIELDS = ("model", "data", "metric", "steps", "runtime", "output", "seed")


def parse_recipe(data: Any, base_dir: str | Path = ".") -> Recipe:
    """Validate a recipe mapping; every error names its field (``steps[0].bits``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"recipe: expected a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - set(RECIPE_FIELDS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown field (known: {', '.join(RECIPE_FIELDS)})")
    if "model" not in data:
        raise ConfigError("model: required (a bundled name or a factory)")
    base = Path(base_dir)
    model = build_dataclass(ModelSpec, data["model"], "model")
    if model.checkpoint is not None:
        ckpt = _resolve(base, model.checkpoint)
        if not ckpt.is_file():
            raise CheckpointError(f"model.checkpoint: file not found: {ckpt}")
        model = replace(model, checkpoint=str(ckpt))
    for f in ("onnx", "hf"):
        if getattr(model, f) is not None:
            model = replace(model, **{f: str(_resolve(base, getattr(model, f)))})
    spec = build_dataclass(DataSpec, data.get("data"), "data")
    paths = {f: str(_resolve(base, getattr(spec, f))) for f in ("dir", "images", "labels", "arrays")
             if getattr(spec, f) is not None}
    spec = replace(spec, **paths)  # checked when read: a recipe validates without its data at hand
    _check_pairing(model, spec)
    metric, extra = _metrics(data.get("metric", _default_metric(model)))
    steps_data = data.get("steps") or []
    if not isinstance(steps_data, list):
        raise ConfigError("steps: expected a list of {technique: NAME, ...} mappings")
    steps = tuple(parse_step(s, f"steps[{i}]") for i, s in enumerate(steps_data))
    runtime = build_dataclass(RuntimeConfig, data.get("runtime"), "runtime")
    output = data.get("output", "runs/run")
    if not isinstance(output, str):
        raise ConfigError(f"output: expected a folder path, got {output!r}")
    seed = check_int("seed", data.get("seed", 0))
    return Recipe(model, spec, metric, steps, runtime, str(_resolve(base, output)), seed, extra_metrics=extra,
                  base_dir=str(base))


def _hf_kind(model: ModelSpec) -> str | None:
    """What a recipe's ``hf`` folder holds ("image", "text_classifier", "text_encoder"), else None."""
    if model.hf is None:
        return None
    from edgeslim.models.hf import hf_kind

    return hf_kind(model.hf)


def _is_text(model: ModelSpec) -> bool:
    return model.name in TEXT_MODELS or (_hf_kind(model) or "").startswith("text")


def _default_metric(model: ModelSpec) -> str:
    """Cosine to the fp32 embeddings for encoders, agreement with fp32 for text classifiers (the
    bundled sentences have no labels), accuracy otherwise."""
    kind = "text_encoder" if model.name in TEXT_MODELS else _hf_kind(model)
    return {"text_encoder": "cosine", "text_classifier": "agreement"}.get(kind or "", "accuracy")


def _check_pairing(model: ModelSpec, data: DataSpec) -> None:
    """Text models take the sentences, pretrained image models images; ConfigError otherwise."""
    if _is_text(model) != (data.dataset in TEXT_DATASETS):
        given = data.dataset or next(f"{f} {getattr(data, f)}" for f in ("images", "arrays", "factory") if getattr(data, f))
        what = model.name or model.factory or model.onnx or model.hf
        raise ConfigError(f"data.dataset: {given!r} does not fit model {what!r} "
                          f"(text models ({', '.join(TEXT_MODELS)}, hf text folders) take {', '.join(TEXT_DATASETS)})")
    if model.name in VISION_MODELS and data.dataset is not None:
        raise ConfigError(f"data.dataset: {model.name} takes RGB images, not {data.dataset!r}: give data.images "
                          "(an image folder), data.arrays or data.factory")


def _metrics(value: Any) -> tuple[str, tuple[str, ...]]:
    """A recipe's ``metric``: one name, or a list whose first name is the run's metric (the one
    steps' budgets use) and whose others are reported beside it."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"metric: expected a metric name or a list of them, got {value!r}")
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"metric: unknown metric {name!r} (known: {', '.join(METRICS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"metric: {names} names a metric twice")
    return names[0], tuple(names[1:])


def parse_step(data: Any, where: str) -> TechniqueConfig:
    """One step mapping -> its technique config."""
    if not isinstance(data, dict) or "technique" not in data:
        raise ConfigError(f"{where}: expected a mapping with a 'technique' field")
    fields = dict(data)
    name = fields.pop("technique")
    try:
        tech = registry.get(str(name))
    except ConfigError as err:
        raise ConfigError(f"{where}.technique: {err}") from None
    return tech.config_type.from_dict(fields, where)


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a YAML recipe file; paths in it are relative to the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read recipe: {err}") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    return parse_recipe(data, path.parent)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (plain YAML keeps the last
    silently, so a typo'd second ``epochs:`` would win unnoticed)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            try:
                seen.add(key)
            except TypeError:
                pass  # unhashable keys are refused by the base loader
        return super().construct_mapping(node, deep)


def _resolve(base: Path, p: str) -> Path:
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else base / path


def cache_dir() -> Path:
    """Where trained checkpoints are cached (``$EDGESLIM_CACHE`` or ``~/.cache/edgeslim``)."""
    return Path(os.environ.get("EDGESLIM_CACHE", Path.home() / ".cache" / "edgeslim"))


def build_task(recipe: Recipe, progress: bool = True) -> Task:
    """Load the data, build (and train or load) the model, and assemble the Task."""
    spec = recipe.data
    from edgeslim.train import seed_everything

    hf = None
    if recipe.model.hf is not None:
        from edgeslim.models.hf import load_hf

        hf = load_hf(recipe.model.hf)
    if _is_text(recipe.model):
        from edgeslim.models.minilm import build_minilm_task, build_text_task

        sizes = {"seq_len": spec.seq_len, "calibration_samples": spec.calibration_samples,
                 "eval_samples": spec.eval_samples or 256, "seed": spec.seed}
        if hf is None:
            return build_minilm_task(**sizes)
        return build_text_task(hf.module, hf.tokenizer, hf.max_length, metric_name=recipe.metric, **sizes)
    split = load_data(recipe, None if hf is None or hf.preprocess is None else Preprocess(**hf.preprocess))
    example = (torch.from_numpy(split.x_test[:1]),)
    common = {"example_inputs": example, "metric": METRICS[recipe.metric], "metric_name": recipe.metric,
              "extra_metrics": recipe.extra_metrics, **_parts(split, spec)}
    if recipe.model.onnx is not None:  # the Task checks the graph against the data
        return Task(model=recipe.model.onnx, **common)
    seed_everything(recipe.seed)  # before the model is built: its initial weights come from it
    model = hf.module if hf is not None else _build_model(recipe.model, split, recipe.base_dir)
    check_forward(model, example)  # fail before any training
    _check_labels(model, example, split)
    if recipe.model.checkpoint is not None:
        from edgeslim.train import load_checkpoint

        load_checkpoint(model, recipe.model.checkpoint)
        check_finite(model, f"model.checkpoint {recipe.model.checkpoint}")
    elif recipe.model.name not in PRETRAINED and not recipe.model.pretrained and hf is None:
        model = _trained(model, recipe.model, spec, split, progress)
    return Task(model=model.eval(), input_names=None if hf is None else hf.input_names, **common)


def _parts(split, spec: DataSpec) -> dict[str, Any]:
    """A split's calibration, evaluation and training data as Task fields."""
    n_eval = len(split.x_test) if spec.eval_samples is None else min(spec.eval_samples, len(split.x_test))
    return {"calibration": (split.x_train[: spec.calibration_samples], split.y_train[: spec.calibration_samples]),
            "evaluation": (split.x_test[:n_eval], split.y_test[:n_eval]), "train": (split.x_train, split.y_train)}


def load_data(recipe: Recipe, model_preprocess: Preprocess | None = None):
    """The recipe's samples as a :class:`~edgeslim.data.Split` (calibration part, evaluation part),
    checked against ``model.input_shape`` when the recipe states it. ``model_preprocess`` is the
    model's own image preprocessing, where it declares one (an ``hf`` folder)."""
    from edgeslim.data import arrays_split, check_arrays, class_folders, image_split, labels_file, load_arrays, \
        load_dataset

    spec = recipe.data
    cut = {"calibration_samples": spec.calibration_samples, "eval_samples": spec.eval_samples, "seed": spec.seed}
    if spec.images is not None:
        preprocess, transform = _preprocessing(recipe, model_preprocess)
        if spec.labels is not None:
            files, labels = labels_file(spec.labels, spec.images)
        else:
            files, labels, _ = class_folders(spec.images)
        split = image_split(files, labels, preprocess, transform=transform, name=spec.labels or spec.images, **cut)
    elif spec.arrays is not None:
        split = arrays_split(*load_arrays(spec.arrays), name=spec.arrays, **cut)
    elif spec.factory is not None:
        fn = import_factory(spec.factory, recipe.base_dir, "data.factory", DataError)
        try:
            out = fn(**spec.kwargs)
        except EdgeslimError:
            raise
        except Exception as err:  # user code: its own message, on one line
            raise DataError(f"data.factory: {spec.factory}(**{spec.kwargs}) failed: {first_line(err)}") from None
        where = f"data.factory {spec.factory}"
        if all(hasattr(out, a) for a in ("x_train", "y_train", "x_test", "y_test")):
            from edgeslim.data import Split

            (xc, yc), (xe, ye) = (check_arrays(out.x_train, out.y_train, where),
                                  check_arrays(out.x_test, out.y_test, where))
            split = Split(x_train=xc, y_train=yc, x_test=xe, y_test=ye, name=where)
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            split = arrays_split(*check_arrays(*out, where), name=where, **cut)
        else:
            raise DataError(f"{where} returned {type(out).__name__}; expected (X, y) or an object with "
                            "x_train, y_train, x_test, y_test")
    else:
        split = load_dataset(spec.dataset, spec.dir, seed=spec.seed)
    shape = tuple(split.x_test.shape[1:])
    want = recipe.model.input_shape
    if want is not None and tuple(want) != shape:
        source = f"data.preprocess.crop {shape[-1]}" if spec.images is not None else split.name
        raise ConfigError(f"model.input_shape {list(want)} does not fit the data: its samples are {list(shape)} "
                          f"({source})")
    return split


def _preprocessing(recipe: Recipe, model_preprocess: Preprocess | None = None) -> tuple[Preprocess, Any]:
    """The image preprocessing: the recipe's fields over the model's own (a bundled pretrained
    model's, or ``model_preprocess`` from an ``hf`` folder, completed by ImageNet's; for others
    ImageNet's, at ``model.input_shape``'s size), or the recipe's factory."""
    given = recipe.data.preprocess or Preprocess()
    if given.factory is not None:
        return given, import_factory(given.factory, recipe.base_dir, "data.preprocess.factory", DataError)
    model = recipe.model
    size = model.input_shape[-1] if model.input_shape is not None and len(model.input_shape) == 3 else None
    if model.name in VISION_MODELS:
        from edgeslim.models.efficientnet_lite import preprocess

        default = preprocess(model.name, size)
    elif model_preprocess is not None:
        default = model_preprocess.over(IMAGENET)
    elif size is not None:  # ImageNet's crop fraction (224 of 256) at this size
        default = replace(IMAGENET, crop=size, resize=round(size * IMAGENET.resize / IMAGENET.crop))
    else:
        default = IMAGENET
    try:
        return given.over(default), None
    except ConfigError as err:  # a field given clashes with the model's own (crop > its resize)
        raise ConfigError(f"data.preprocess.{err} (fields left out are the model's: {default})") from None


def import_factory(target: str, base_dir: str, where: str, error: type[EdgeslimError] = ModelError):
    """The function ``target`` ("module:function") names. Like paths in a recipe, its module may
    sit beside the recipe file (``base_dir``) or in the current folder; both are searched first,
    for this import only. ``error`` (naming ``where``) if it cannot be imported or is not callable."""
    module_name, fn_name = target.split(":", 1)
    extra = [p for p in dict.fromkeys([str(Path(base_dir).resolve()), os.getcwd()]) if p not in sys.path]
    sys.path[:0] = extra
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise error(f"{where}: cannot import {target!r}: {err}") from None
    finally:
        for p in extra:
            sys.path.remove(p)
    if not callable(fn):
        raise error(f"{where}: {target} is a {type(fn).__name__}, not a function")
    return fn


def _build_model(spec: ModelSpec, split, base_dir: str = ".") -> torch.nn.Module:
    shape = tuple(split.x_test.shape[1:])
    if spec.name in VISION_MODELS:
        from edgeslim.models.efficientnet_lite import build_efficientnet_lite

        if len(shape) != 3 or shape[0] != 3 or shape[1] != shape[2]:
            raise ConfigError(f"model {spec.name} takes square RGB images (3, S, S); the data's samples are "
                              f"{list(shape)} ({split.name})")
        return build_efficientnet_lite(spec.name, image_size=shape[1])
    if spec.name is not None:
        from edgeslim.models import build_model

        if len(shape) != 3:
            raise ConfigError(f"model {spec.name} takes images (C, H, W); the data's samples are {list(shape)}")
        return build_model(spec.name, in_channels=shape[0], num_classes=split.num_classes, input_size=shape[1])
    fn = import_factory(spec.factory, base_dir, "model.factory")
    try:
        model = fn(**spec.kwargs)
    except Exception as err:
        raise ModelError(f"model.factory: {spec.factory}(**{spec.kwargs}) failed: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model.factory: {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _check_labels(model: torch.nn.Module, example: tuple[torch.Tensor, ...], split) -> None:
    """DataError naming the data's file when a label is not one of a classifier's outputs."""
    with torch.no_grad():
        out = model.eval()(*example)
    labels = [y for y in (split.y_train, split.y_test) if y is not None and len(y)]
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or not labels:
        return
    top = max(int(y.max()) for y in labels)
    if top >= out.shape[1]:
        raise DataError(f"{split.name}: label {top} is not one of the model's {out.shape[1]} outputs "
                        f"(0..{out.shape[1] - 1})")


def _trained(model, spec: ModelSpec, data: DataSpec, split, progress: bool):
    """Train ``model`` per ``spec.train``, or load the checkpoint a previous identical run cached."""
    from edgeslim.train import load_checkpoint, save_checkpoint, train

    ts = spec.train or TrainSpec()
    data_dir = str(Path(data.dir).resolve()) if data.dir else None  # one key however the path was typed
    fields = {"model": asdict(spec), "dataset": data.dataset, "dir": data_dir, "seed": data.seed,
              "train": asdict(ts), "shape": list(split.x_train.shape)}
    source = {f: getattr(data, f) for f in ("images", "labels", "preprocess", "arrays", "factory", "kwargs",
                                            "calibration_samples") if data.dataset is None}
    if source:  # images, arrays or a factory: the training samples depend on these too
        fields["source"] = {k: str(Path(v).resolve()) if k in ("images", "labels", "arrays") and v else v
                            for k, v in source.items()}
    key = json.dumps(fields, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = cache_dir() / "checkpoints" / f"{spec.name or spec.factory.replace(':', '.')}-{digest}.safetensors"
    if path.is_file():
        try:
            cached = load_checkpoint(copy.deepcopy(model), path).eval()
            check_finite(cached, f"cached checkpoint {path}")
            return cached
        except (CheckpointError, NumericalError):
            pass  # a stale or broken cache entry: train again and overwrite it
    from edgeslim.runtime import export_onnx

    example = (torch.from_numpy(split.x_test[:1]),)
    export_onnx(model.eval(), example)  # an unexportable model fails now, not after the training
    model = train(model, split.x_train, split.y_train, epochs=ts.epochs, lr=ts.lr, batch_size=ts.batch_size,
                  weight_decay=ts.weight_decay, seed=ts.seed, progress=progress)
    check_finite(model, "trained model")  # a diverged model is never cached
    save_checkpoint(model, path)
    return model.eval()


DEMO_RECIPE: dict[str, Any] = {
    "model": {"name": "vgg_small", "train": {"epochs": 3, "lr": 2e-3, "batch_size": 64, "seed": 0}},
    "data": {"dataset": "mnist_sample", "seed": 0, "calibration_samples": 512},
    "metric": "accuracy",
    "steps": [{"technique": "ptq_int8"}],
    "runtime": {"threads": 1, "batch_size": 1, "warmup": 30, "runs": 500, "rounds": 5},
    "output": "runs/demo",
}


def run_recipe(recipe: Recipe, progress: bool = True, overwrite: bool = False):
    """Claim the output folder, build the task and run the pipeline; returns the RunResult.

    The output folder is checked and locked before the model is built or trained, so a refused
    ``output`` costs nothing (see :class:`edgeslim.io.RunFolder`).
    """
    from edgeslim import io
    from edgeslim.pipeline import compress

    with io.RunFolder(recipe.output, overwrite=overwrite) as folder:
        task = build_task(recipe, progress)
        result = compress(task, recipe.steps, runtime=recipe.runtime, out_dir=folder, recipe=recipe.to_dict(),
                          seed=recipe.seed)
    result.moved_to(folder.target)
    return result
