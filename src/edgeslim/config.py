"""Frozen technique configs and their one-to-one mapping to recipe dictionaries.

A recipe step is ``{"technique": NAME, field: value, ...}``; the fields are exactly the config
dataclass's fields. Unknown fields and wrong types are rejected up front, naming the field.
Settings shared by several techniques are one nested value (:class:`Partial`, e.g.
``fine_tune: {epochs: 1}``) whose unset fields take the step's own defaults.
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


class Partial(Checked):
    """Mixin for settings nested in several configs (``fine_tune``): a field left ``None`` is unset
    and takes the value of the enclosing config's default for that settings field. So
    ``DistillConfig(fine_tune=FineTune(epochs=1))`` and the recipe ``fine_tune: {epochs: 1}`` change
    the epochs only, keeping distill's own learning rate and temperature, and the config stores
    the complete settings (see :func:`check_fields`). To change one field of a config you hold,
    replace it in that config's settings: ``replace(cfg, fine_tune=replace(cfg.fine_tune, epochs=0))``
    (a partial ``FineTune`` is completed from the class default, not from ``cfg``)."""

    def over(self, base: "Partial") -> "Partial":
        """These settings with every unset (None) field taken from ``base``."""
        given = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def check_fields(obj: Any) -> None:
    """Check every init field of dataclass ``obj`` against its type hint and range; a nested
    :class:`Partial` value is completed from the field's default."""
    import math

    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = coerce(getattr(obj, f.name), hints[f.name], f.name)
        if isinstance(value, Partial) and isinstance(_default(f), type(value)):
            value = value.over(_default(f))
        object.__setattr__(obj, f.name, value)  # frozen dataclasses too: this is construction
        for v in _numbers(value):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name}: must be a finite number, got {v}")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            check_int(f.name, value)
        elif isinstance(value, float) and f.name in FLOAT_RANGES:
            low, high = FLOAT_RANGES[f.name]
            if not low <= value <= high or (f.name in _POSITIVE and value == 0):
                bound = f"> 0 and <= {high:g}" if f.name in _POSITIVE else f"in [{low:g}, {high:g}]"
                raise ConfigError(f"{f.name}: must be {bound}, got {value}")


def check_int(name: str, value: Any) -> int:
    """``value`` as the integer setting ``name`` (not a config field, e.g. a run's ``seed``), held
    to the same type check and range (:data:`INT_RANGES`) as every config field of that name."""
    value = coerce(value, int, name)
    low, high = INT_RANGES.get(name, (-INT_LIMIT, INT_LIMIT))
    if not low <= value <= high:
        raise ConfigError(f"{name}: must be in [{low}, {high:,}], got {value:,}")
    return value


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
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        _refuse_moved(unknown[0], data[unknown[0]], fields, hints, where)
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"{where}.{unknown[0]}: unknown field (known: {known})")
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


def _refuse_moved(name: str, value: Any, fields: dict[str, dataclasses.Field], hints: dict[str, Any],
                  where: str) -> None:
    """ConfigError with the new spelling when ``name`` is a field of a nested :class:`Partial`
    (the flat ``epochs: 1`` of a fine-tuning step, now ``fine_tune: {epochs: 1}``)."""
    import json

    for field in fields:
        hint = hints[field]
        if isinstance(hint, type) and issubclass(hint, Partial) and name in {f.name for f in dataclasses.fields(hint)}:
            try:
                shown = json.dumps(value)
            except (TypeError, ValueError):
                shown = repr(value)
            raise ConfigError(f"{where}.{name}: moved into {field} (write {field}: {{{name}: {shown}}})")


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
