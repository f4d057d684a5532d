"""YAML recipes: a file that maps one-to-one to the Python API, validated before any work starts.

```yaml
model: {name: vgg_small, train: {epochs: 3}}       # or factory: "pkg.mod:fn" + checkpoint: w.safetensors
data: {dataset: mnist_sample, calibration_samples: 512}
metric: accuracy
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
from edgeslim.errors import CheckpointError, ConfigError, ModelError, NumericalError
from edgeslim.pipeline import RuntimeConfig
from edgeslim.task import METRICS, Task, check_finite, check_forward


TEXT_MODELS = ("minilm",)  # pretrained, shipped by a package; their data set is "sentences"
TEXT_DATASETS = ("sentences",)


def known_models() -> list[str]:
    from edgeslim.models import list_models

    return list_models() + list(TEXT_MODELS)


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
    """A bundled model ``name``, or a ``factory`` ("module:function") called with ``kwargs``."""

    name: str | None = None
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None
    train: TrainSpec | None = None

    def validate(self) -> None:
        if (self.name is None) == (self.factory is None):
            raise ConfigError("give exactly one of name (a bundled model) or factory ('module:function')")
        if self.name is not None and self.name not in known_models():
            raise ConfigError(f"name: unknown model {self.name!r} (known: {', '.join(known_models())})")
        if self.name in TEXT_MODELS and (self.checkpoint or self.train):
            raise ConfigError(f"{self.name} is pretrained: it takes neither checkpoint nor train")
        if self.factory is not None and ":" not in self.factory:
            raise ConfigError(f"factory: expected 'module:function', got {self.factory!r}")


@dataclass(frozen=True)
class DataSpec(Checked):
    """A data set by name (bundled, or loaded from ``dir``); calibration comes from its train split."""

    dataset: str = "mnist_sample"
    dir: str | None = None
    seed: int = 0
    calibration_samples: int = 512
    eval_samples: int | None = None
    seq_len: int = 128  # text data sets: tokens per sentence (padded / truncated)

    def validate(self) -> None:
        from edgeslim.data import DATASETS

        if self.dataset not in DATASETS + TEXT_DATASETS:
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
    # The recipe file's folder: a factory module beside the recipe is importable (not a recipe field).
    base_dir: str = field(default=".", compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The recipe as YAML-ready data (what a run folder saves as ``recipe.yaml``)."""
        return {"model": asdict(self.model), "data": asdict(self.data), "metric": self.metric,
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
    spec = build_dataclass(DataSpec, data.get("data"), "data")
    if spec.dir is not None:
        spec = replace(spec, dir=str(_resolve(base, spec.dir)))
    metric = data.get("metric", "cosine" if model.name in TEXT_MODELS else "accuracy")
    if (model.name in TEXT_MODELS) != (spec.dataset in TEXT_DATASETS):
        raise ConfigError(f"data.dataset: {spec.dataset!r} does not fit model {model.name or model.factory!r} "
                          f"(text models {', '.join(TEXT_MODELS)} take {', '.join(TEXT_DATASETS)})")
    if metric not in METRICS:
        raise ConfigError(f"metric: unknown metric {metric!r} (known: {', '.join(METRICS)})")
    steps_data = data.get("steps") or []
    if not isinstance(steps_data, list):
        raise ConfigError("steps: expected a list of {technique: NAME, ...} mappings")
    steps = tuple(parse_step(s, f"steps[{i}]") for i, s in enumerate(steps_data))
    runtime = build_dataclass(RuntimeConfig, data.get("runtime"), "runtime")
    output = data.get("output", "runs/run")
    if not isinstance(output, str):
        raise ConfigError(f"output: expected a folder path, got {output!r}")
    seed = check_int("seed", data.get("seed", 0))
    return Recipe(model, spec, metric, steps, runtime, str(_resolve(base, output)), seed, str(base))


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
    from edgeslim.data import load_dataset

    spec = recipe.data
    from edgeslim.train import seed_everything

    if recipe.model.name in TEXT_MODELS:
        from edgeslim.models.minilm import build_minilm_task

        return build_minilm_task(seq_len=spec.seq_len, calibration_samples=spec.calibration_samples,
                                 eval_samples=spec.eval_samples or 256, seed=spec.seed)
    split = load_dataset(spec.dataset, spec.dir, seed=spec.seed)
    seed_everything(recipe.seed)  # before the model is built: its initial weights come from it
    model = _build_model(recipe.model, split, recipe.base_dir)
    check_forward(model, (torch.from_numpy(split.x_test[:1]),))  # fail before any training
    if recipe.model.checkpoint is not None:
        from edgeslim.train import load_checkpoint

        load_checkpoint(model, recipe.model.checkpoint)
        check_finite(model, f"model.checkpoint {recipe.model.checkpoint}")
    else:
        model = _trained(model, recipe.model, spec, split, progress)
    n_eval = len(split.x_test) if spec.eval_samples is None else min(spec.eval_samples, len(split.x_test))
    calib = (split.x_train[: spec.calibration_samples], split.y_train[: spec.calibration_samples])
    return Task(
        model=model.eval(),
        example_inputs=(torch.from_numpy(split.x_test[:1]),),
        calibration=calib,
        evaluation=(split.x_test[:n_eval], split.y_test[:n_eval]),
        metric=METRICS[recipe.metric],
        metric_name=recipe.metric,
        train=(split.x_train, split.y_train),
    )


def _build_model(spec: ModelSpec, split, base_dir: str = ".") -> torch.nn.Module:
    c, h, _ = split.x_train.shape[1:]
    if spec.name is not None:
        from edgeslim.models import build_model

        return build_model(spec.name, in_channels=c, num_classes=split.num_classes, input_size=h)
    module_name, fn_name = spec.factory.split(":", 1)
    # Like paths in a recipe, a factory module may sit beside the recipe file (or in the current
    # folder); both are searched first, for this import only.
    extra = [p for p in dict.fromkeys([str(Path(base_dir).resolve()), os.getcwd()]) if p not in sys.path]
    sys.path[:0] = extra
    try:
        fn = getattr(importlib.import_module(module_name), fn_name)
    except (ImportError, AttributeError) as err:
        raise ModelError(f"model.factory: cannot import {spec.factory!r}: {err}") from None
    finally:
        for p in extra:
            sys.path.remove(p)
    try:
        model = fn(**spec.kwargs)
    except Exception as err:
        raise ModelError(f"model.factory: {spec.factory}(**{spec.kwargs}) failed: {err}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"model.factory: {spec.factory} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _trained(model, spec: ModelSpec, data: DataSpec, split, progress: bool):
    """Train ``model`` per ``spec.train``, or load the checkpoint a previous identical run cached."""
    from edgeslim.train import load_checkpoint, save_checkpoint, train

    ts = spec.train or TrainSpec()
    data_dir = str(Path(data.dir).resolve()) if data.dir else None  # one key however the path was typed
    key = json.dumps({"model": asdict(spec), "dataset": data.dataset, "dir": data_dir, "seed": data.seed,
                      "train": asdict(ts), "shape": list(split.x_train.shape)}, sort_keys=True, default=str)
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
