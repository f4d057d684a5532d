"""Frozen technique configs and their one-to-one mapping to recipe dictionaries.

A recipe step is ``{"technique": NAME, field: value, ...}``; the fields are exactly the config
dataclass's fields. Unknown fields and wrong types are rejected up front, naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, Union

from edgeslim.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TechniqueConfig:
    """Base for technique configs: frozen value objects validated on construction."""

    technique: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field when a value is out of range."""

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
        raise ConfigError(msg if msg.startswith((f"{where}.", f"{where}:")) else f"{where}.{msg}") from None
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
        return build_dataclass(hint, value, where)
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
