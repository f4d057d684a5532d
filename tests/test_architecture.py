"""The layout keeps one home per idea: fine-tune settings live in FineTune only, modules use each
other's public names only, and the technique packages import one another without a cycle."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from edgeslim import registry
from edgeslim.config import TechniqueConfig

SRC = Path(__file__).resolve().parent.parent / "src" / "edgeslim"
FINE_TUNE_FIELDS = {"epochs", "lr", "temperature", "alpha", "augment_shift"}
TECHNIQUE_PACKAGES = ("prune", "distill", "quantize", "qat", "lowrank", "cluster")



def _modules() -> dict[str, tuple[Path, ast.Module]]:
    """Every module under src/edgeslim by dotted name, with its parsed source."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = ("edgeslim", *path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = (path, ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    return out


def _imports(module: str, path: Path, tree: ast.Module) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import in the file, those inside
    functions included; relative imports are resolved against ``module``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [(base, alias.name, node.lineno) for alias in node.names]
    return found


def _technique_configs() -> list[type]:
    registry.list_techniques()  # loads the built-in technique packages

    def below(cls: type) -> list[type]:
        return [c for sub in cls.__subclasses__() for c in (sub, *below(sub))]

    return sorted(set(below(TechniqueConfig)), key=lambda c: c.__name__)


def test_no_technique_config_declares_fine_tune_fields_itself():
    configs = _technique_configs()
    assert len(configs) >= 10
    offenders = [f"{cls.__name__}.{f.name}" for cls in configs for f in dataclasses.fields(cls)
                 if f.name in FINE_TUNE_FIELDS]
    assert not offenders, f"declare these in FineTune (a fine_tune field), not per config: {offenders}"


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for module, (path, tree) in _modules().items():
        rel = path.relative_to(SRC).as_posix()
        for target, name, line in _imports(module, path, tree):
            if not target.startswith("edgeslim") or name is None:
                continue
            private = name.startswith("_") and not (name.startswith("__") and name.endswith("__"))
            if private:
                offenders.append(f"{rel}:{line} imports {name} from {target}")
    assert not offenders, "make these public (no leading underscore) or keep them in one module:\n" + "\n".join(offenders)


def _package_graph() -> dict[str, dict[str, str]]:
    """Technique package -> {package it imports: 'file:line' of the first such import}."""
    modules = _modules()
    graph: dict[str, dict[str, str]] = {p: {} for p in TECHNIQUE_PACKAGES}
    for module, (path, tree) in modules.items():
        parts = module.split(".")
        if len(parts) < 2 or parts[1] not in TECHNIQUE_PACKAGES:
            continue
        source = parts[1]
        for target, name, line in _imports(module, path, tree):
            dotted = target.split(".")
            if dotted[0] != "edgeslim":
                continue
            # "from edgeslim import prune" names the package in the imported name
            pkg = dotted[1] if len(dotted) > 1 else name
            if pkg in TECHNIQUE_PACKAGES and pkg != source:
                graph[source].setdefault(pkg, f"{path.relative_to(SRC).as_posix()}:{line}")
    return graph


def test_technique_packages_import_each_other_without_a_cycle():
    graph = _package_graph()
    state: dict[str, str] = {}  # "active" while on the DFS stack, "done" after

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "active"
        for nxt in graph[node]:
            if state.get(nxt) == "active":
                return trail + [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, trail + [node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in TECHNIQUE_PACKAGES:
        if start not in state:
            cycle = visit(start, [])
            if cycle:
                first = cycle.index(cycle[-1])
                edges = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(cycle[first:], cycle[first + 1:])]
                raise AssertionError("import cycle between technique packages: " + "; ".join(edges))


def test_later_steps_read_sparsity_from_the_artifact_not_from_prune():
    """distill and qat (qat_int8) keep a pruned model's zeros through ModelArtifact.sparsity
    (edgeslim.sparsity), so neither needs the prune package; quantize trains nothing and needs neither."""
    graph = _package_graph()
    assert "prune" not in graph["distill"], graph["distill"]
    assert "prune" not in graph["qat"], graph["qat"]
    assert "prune" not in graph["quantize"], graph["quantize"]
    assert "qat" not in graph["quantize"], graph["quantize"]


def test_the_import_parser_sees_imports_inside_functions(tmp_path):
    source = "def f():\n    from edgeslim.prune.unstructured import _x\n    from ..distill import trainer\n"
    found = _imports("edgeslim.cluster.technique", tmp_path / "technique.py", ast.parse(source))
    assert ("edgeslim.prune.unstructured", "_x", 2) in found and ("edgeslim.distill", "trainer", 3) in found


def test_each_technique_registers_in_its_technique_module():
    """registry.py's rule: technique.py in a package with one technique, <name>_technique.py in a
    package with several; the config is declared in the same module."""
    by_package: dict[str, list[registry.Technique]] = {}
    for tech in registry.list_techniques():
        by_package.setdefault(tech.fn.__module__.split(".")[1], []).append(tech)
    offenders = []
    for package, techs in by_package.items():
        for tech in techs:
            leaf = tech.fn.__module__.rpartition(".")[2]
            ok = leaf == "technique" if len(techs) == 1 else leaf.endswith("_technique") and leaf != "_technique"
            if not ok or tech.config_type.__module__ != tech.fn.__module__:
                offenders.append(f"{tech.name}: {tech.fn.__module__} (config in {tech.config_type.__module__})")
    assert not offenders, "see registry.py's docstring for where a technique lives:\n" + "\n".join(offenders)
