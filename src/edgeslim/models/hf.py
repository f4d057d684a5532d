"""Models saved by Hugging Face ``transformers`` in a local folder, as plain ``nn.Module``s.

``load_hf(DIR)`` reads the folder's ``config.json`` and returns what the recipe line
``model: {hf: DIR}`` needs, offline (``local_files_only``):

- an image classifier (``*ForImageClassification``): ``pixel_values -> logits``, with the
  preprocessing its ``preprocessor_config.json`` declares (resize, crop, mean, std);
- a sequence classifier (``*ForSequenceClassification``): ``(input_ids, attention_mask) -> logits``;
- any other encoder: a sentence encoder ``(input_ids, attention_mask) -> (B, hidden)`` with the
  pooling of a sentence-transformers folder (``modules.json``), else masked mean pooling.

Attention runs ``eager``: its ONNX graph is the plain ``MatMul -> Softmax -> MatMul`` pattern
the quantizers and pruners recognise (see :mod:`edgeslim.models.minilm`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from edgeslim.errors import ConfigError, ModelError, first_line

__all__ = ["HFModel", "SentenceEncoder", "hf_kind", "load_hf", "quiet_transformers", "sentence_pipeline"]

_POOLING_MODES = ("mean", "cls", "max")
INSTALL_HINT = "pip install 'edgeslim[transformers]'"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {path}: {exc}") from None


def sentence_pipeline(path: Path) -> tuple[str, bool]:
    """Pooling mode and whether to L2-normalise, from the sentence-transformers ``modules.json``."""
    modules = _read_json(path / "modules.json")
    kinds = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in modules if isinstance(m, dict)}
    if "Pooling" not in kinds:
        raise ModelError(f"{path / 'modules.json'} has no Pooling module")
    cfg_path = path / kinds["Pooling"].get("path", "1_Pooling") / "config.json"
    cfg = _read_json(cfg_path)
    modes = [k.removeprefix("pooling_mode_").removesuffix("_token").removesuffix("_tokens") for k, v in cfg.items()
             if k.startswith("pooling_mode_") and v is True]
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        raise ModelError(f"{cfg_path}: pooling {modes or 'none'} is not supported; use one of {', '.join(_POOLING_MODES)}")
    return modes[0], "Normalize" in kinds


class SentenceEncoder(nn.Module):
    """A BERT encoder plus masked pooling and L2 normalisation: ``(ids, mask) -> (B, hidden)``.

    Mirrors sentence-transformers' Pooling/Normalize modules with tensor ops only (no Python
    control flow on data), so the dynamo exporter keeps batch and sequence length symbolic.
    ``token_type_ids`` are zeros, as for single-sentence inputs.
    """

    def __init__(self, bert: nn.Module, pooling: str = "mean", normalize: bool = True) -> None:
        super().__init__()
        if pooling not in _POOLING_MODES:
            raise ConfigError(f"pooling must be one of {', '.join(_POOLING_MODES)}, got {pooling!r}")
        self.bert = bert
        self.pooling = pooling
        self.normalize = normalize

    @property
    def dim(self) -> int:
        """Embedding size (384 for MiniLM-L6)."""
        return int(self.bert.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "mean":
            # clamp as sentence-transformers does: an all-padding row gives zeros, not NaN
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            pooled = hidden[:, 0]
        if self.normalize:
            pooled = nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide the weight-loading progress bar and load report; restore the user's settings after."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


class ImageLogits(nn.Module):
    """A ``transformers`` image classifier as ``pixel_values -> logits`` (a tensor, not a
    ModelOutput), so it exports as one graph with one output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


class TextLogits(nn.Module):
    """A ``transformers`` sequence classifier as ``(input_ids, attention_mask) -> logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@dataclass(frozen=True)
class HFModel:
    """What ``load_hf`` found: the module, what it takes, and how to prepare its inputs."""

    module: nn.Module
    kind: Literal["image", "text_classifier", "text_encoder"]
    tokenizer: Any = None  # text kinds
    preprocess: dict[str, Any] | None = None  # image kind: resize, crop, mean, std (from the folder)
    max_length: int | None = None  # text kinds: the position embeddings' length

    @property
    def input_names(self) -> tuple[str, ...]:
        return ("pixel_values",) if self.kind == "image" else ("input_ids", "attention_mask")


def _image_preprocess(path: Path) -> dict[str, Any] | None:
    """Resize/crop/mean/std from ``preprocessor_config.json`` (None where the folder has none)."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return None
    cfg = _read_json(file)
    size = cfg.get("size", {})
    crop = cfg.get("crop_size", {}) if cfg.get("do_center_crop", False) else {}
    side = size.get("shortest_edge") or size.get("height") if isinstance(size, dict) else size
    crop_side = (crop.get("height") if isinstance(crop, dict) else crop) or side
    out: dict[str, Any] = {"resize": side, "crop": crop_side}
    if cfg.get("do_normalize", True) and "image_mean" in cfg and "image_std" in cfg:
        out |= {"mean": list(cfg["image_mean"]), "std": list(cfg["image_std"])}
    return {k: v for k, v in out.items() if v is not None}


def hf_kind(path: str | Path) -> Literal["image", "text_classifier", "text_encoder"]:
    """What the model saved in ``path`` is, from its ``config.json`` alone (no transformers import):
    what a recipe needs to check its data and pick its default metric before any work."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"model.hf: {path} is not a saved transformers model (no config.json)")
    config = _read_json(path / "config.json")
    arch = " ".join(config.get("architectures") or []) if isinstance(config, dict) else ""
    return "image" if "ForImageClassification" in arch else "text_classifier" if "ForSequenceClassification" in arch \
        else "text_encoder"


def load_hf(path: str | Path) -> HFModel:
    """The model saved in folder ``path`` as an eval-mode module, loaded offline; ModelError with
    one line where the folder is missing, incomplete or of an unsupported kind."""
    path = Path(path)
    if importlib.util.find_spec("transformers") is None:
        raise ModelError(f"model.hf needs the transformers package, which is not installed; run: {INSTALL_HINT}")
    kind = hf_kind(path)
    import transformers

    auto = {"image": transformers.AutoModelForImageClassification,
            "text_classifier": transformers.AutoModelForSequenceClassification,
            "text_encoder": transformers.AutoModel}[kind]
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32, "output_loading_info": True}
    if kind != "image":
        kwargs["attn_implementation"] = "eager"
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(str(path), **kwargs)
            tokenizer = None if kind == "image" else transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # corrupt files, an architecture this transformers does not know
        raise ModelError(f"model.hf: cannot load {path}: {first_line(exc)}") from None
    missing = sorted(info.get("missing_keys", ()))
    if missing:  # these weights would be random: refuse rather than compress a broken model
        raise ModelError(f"model.hf: {path} lacks {len(missing)} weight(s), e.g. {missing[0]}")
    model.eval()
    if kind == "image":
        return HFModel(ImageLogits(model).eval(), kind, preprocess=_image_preprocess(path))
    max_length = getattr(model.config, "max_position_embeddings", None)
    if kind == "text_classifier":
        return HFModel(TextLogits(model).eval(), kind, tokenizer, max_length=max_length)
    pooling, normalize = sentence_pipeline(path) if (path / "modules.json").is_file() else ("mean", False)
    return HFModel(SentenceEncoder(model, pooling, normalize).eval(), kind, tokenizer, max_length=max_length)
