"""The one registry of techniques: a name and a config type for each transform function.

A technique is ``fn(model: ModelArtifact, config, task) -> ModelArtifact``; recipes name it by
string, the Python API by its config type (``compress(model, [PTQInt8Config()])``).

Where a technique lives: the module that declares a technique's config and registers its function
is ``technique.py`` in a package with one technique (distill/, cluster/, lowrank/, qat/), and
``<name>_technique.py`` in a package with several (prune/magnitude_technique.py,
quantize/ptq_technique.py, ...). That module holds the config, the registered function and what
only they need; the algorithm stays in the package's other modules, which name the config type for
annotations only (under ``typing.TYPE_CHECKING``), so the technique module imports the algorithm
and never the reverse. The package's ``__init__`` imports each technique module (that runs
``@register``) and re-exports its config; :func:`_load_builtin` imports each package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgeslim.config import TechniqueConfig
from edgeslim.errors import ConfigError


@dataclass(frozen=True)
class Technique:
    name: str
    config_type: type[TechniqueConfig]
    fn: Callable
    summary: str
    # True for a technique that works on the float ONNX graph alone (it lowers the graph), so it
    # also runs on a model given as an ONNX file; the others need the PyTorch module.
    graph_only: bool = False


_BY_NAME: dict[str, Technique] = {}
_BY_CONFIG: dict[type, Technique] = {}


def register(name: str, config_type: type[TechniqueConfig], *, graph_only: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as technique ``name`` driven by ``config_type``; ``graph_only``
    says it needs only the float ONNX graph (:meth:`edgeslim.task.ModelArtifact.float_graph`)."""

    def wrap(fn: Callable) -> Callable:
        if name in _BY_NAME:
            raise ValueError(f"technique {name!r} is registered twice")
        summary = (fn.__doc__ or config_type.__doc__ or "").strip().splitlines()[0] if (fn.__doc__ or config_type.__doc__) else ""
        tech = Technique(name, config_type, fn, summary, graph_only)
        config_type.technique = name
        _BY_NAME[name] = tech
        _BY_CONFIG[config_type] = tech
        return fn

    return wrap


def _load_builtin() -> None:
    # Importing the technique packages runs their @register decorators.
    import edgeslim.cluster  # noqa: F401
    import edgeslim.distill  # noqa: F401
    import edgeslim.lowrank  # noqa: F401
    import edgeslim.prune  # noqa: F401
    import edgeslim.qat  # noqa: F401
    import edgeslim.quantize  # noqa: F401


def get(name: str) -> Technique:
    """The technique registered as ``name``; ConfigError listing the known names otherwise."""
    _load_builtin()
    if name not in _BY_NAME:
        raise ConfigError(f"unknown technique {name!r} (known: {', '.join(sorted(_BY_NAME))})")
    return _BY_NAME[name]


def for_config(config: TechniqueConfig) -> Technique:
    """The technique that ``config``'s type drives."""
    _load_builtin()
    tech = _BY_CONFIG.get(type(config))
    if tech is None:
        raise ConfigError(f"{type(config).__name__} is not a registered technique config")
    return tech


def list_techniques() -> list[Technique]:
    """All registered techniques, sorted by name."""
    _load_builtin()
    return [_BY_NAME[k] for k in sorted(_BY_NAME)]
