"""Frozen technique configs and their one-to-one mapping to recipe dictionaries.

A recipe step is ``{"technique": NAME, field: value, ...}``; the fields are exactly the config
dataclass's fields. Unknown fields and wrong types are rejected up front, naming the field.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, ClassVar, Literal, Union

from edgeslim.errors import ConfigError


# Ranges every config field of that name must lie in, whichever config declares it: one rule for
# recipes and the Python API, checked on construction, before any work. A config's ``validate``
# adds what is specific to it. Upper bounds keep a typo (10**12 runs) from hanging a run for days
# or exhausting memory after the compression work is done.
INT_RANGES: dict[str, tuple[int, int]] = {
    "epochs": (0, 10_000), "final_epochs": (0, 10_000), "kd_epochs": (0, 10_000),
    "batch_size": (1, 65_536), "seed": (0, 2**32 - 1), "augment_shift": (0, 64),
    "calibration_samples": (1, 10_000_000), "eval_samples": (1, 10_000_000), "seq_len": (1, 1_000_000),
    "rounds": (1, 1_000), "updates": (1, 100_000), "taylor_batches": (1, 100_000),
    "adaround_iterations": (1, 1_000_000), "round_to": (1, 4_096), "rank": (1, 1_000_000),
    "min_rank": (1, 1_000_000), "runs": (1, 100_000), "warmup": (0, 10_000), "threads": (1, 1_024),
}
INT_LIMIT = 2**31 - 1  # any other integer field
FLOAT_RANGES: dict[str, tuple[float, float]] = {  # closed ranges; learning rates must also be > 0
    "lr": (0.0, 10.0), "kd_lr": (0.0, 10.0), "final_lr": (0.0, 10.0), "weight_decay": (0.0, 10.0),
    "temperature": (0.0, 1_000.0), "alpha": (0.0, 1.0),
}
_POSITIVE = ("lr", "kd_lr", "final_lr")


class Checked:
    """Mixin for config dataclasses: every field is type-checked (and normalised: a list becomes
    a tuple, an int a float where the field is a float) and range-checked on construction, then
    ``validate`` runs. A recipe and a Python call therefore get the same errors, naming the field."""

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range."""


def check_fields(obj: Any) -> None:
    """Check every init field of dataclass ``obj`` against its type hint and range."""
    import math

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = coerce(getattr(obj, f.name), hints[f.name], f.name)
        object.__setattr__(obj, f.name, value)  # frozen dataclasses too: this is construction
        for v in _numbers(value):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name}: must be a finite number, got {v}")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            low, high = INT_RANGES.get(f.name, (-INT_LIMIT, INT_LIMIT))
            if not low <= value <= high:
                raise ConfigError(f"{f.name}: must be in [{low}, {high:,}], got {value:,}")
        elif isinstance(value, float) and f.name in FLOAT_RANGES:
            low, high = FLOAT_RANGES[f.name]
            if not low <= value <= high or (f.name in _POSITIVE and value == 0):
                bound = f"> 0 and <= {high:g}" if f.name in _POSITIVE else f"in [{low:g}, {high:g}]"
                raise ConfigError(f"{f.name}: must be {bound}, got {value}")


def _numbers(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    return [value] if isinstance(value, float) else []


@dataclasses.dataclass(frozen=True)
class TechniqueConfig(Checked):
    """Base for technique configs: frozen value objects validated on construction."""

    technique: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The recipe form of this config: ``{"technique": name, **fields}``."""
        return {"technique": self.technique, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "step") -> "TechniqueConfig":
        """Build from a recipe mapping (without the ``technique`` key), checking names and types."""
        return build_dataclass(cls, data, where)


def build_dataclass(cls: type, data: Any, where: str) -> Any:
    """Construct dataclass ``cls`` from ``data``, with errors that name ``where.field``."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {known})")
    hints = typing.get_type_hints(cls)
    values = {name: coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        msg = str(err)
        if msg.startswith((f"{where}.", f"{where}:")):
            raise
        names_field = re.match(r"[\w\[\]]+(\.[\w\[\]]+)*: ", msg)  # "lr: must be > 0" -> "steps[0].lr: ..."
        raise ConfigError(f"{where}.{msg}" if names_field else f"{where}: {msg}") from None
    except TypeError as err:  # a required field is missing
        raise ConfigError(f"{where}: {err}") from None


def coerce(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a type hint (int, float, str, bool, Literal, Optional, tuple, list, dict)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build_dataclass(hint, value, where)
    return value


def check_fine_tune(config: Any) -> None:
    """The fields every fine-tuning technique shares (``epochs``, ``lr``, ``batch_size``,
    ``temperature``, ``alpha``, ``augment_shift``): ConfigError naming the first bad one."""
    import math

    for name, low in (("epochs", 0), ("batch_size", 1), ("augment_shift", 0)):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name}: must be an integer >= {low}, got {value!r}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"lr: must be > 0, got {config.lr}")
    if not (math.isfinite(config.temperature) and config.temperature >= 0):
        raise ConfigError(f"temperature: must be >= 0 (0 = plain fine-tune), got {config.temperature}")
    if not 0.0 <= config.alpha <= 1.0:
        raise ConfigError(f"alpha: must be in [0, 1], got {config.alpha}")
