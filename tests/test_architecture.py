"""The import graph of the repository's own code, read from the source (every import, including those inside
functions): stages are independent steps joined by files, the shared layer depends on no stage, the pipeline
never reaches into the entry points, and no two modules import each other, even by a detour
(docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
PACKAGES = ("infgen", "pipelines", "jobs")
STAGES = (
    "pipelines.ingest",
    "pipelines.latents",
    "pipelines.training",
    "pipelines.photos",
    "pipelines.evaluation",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPOSITORY).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules `path` imports ("from a.b import c" counts as a.b.c when that is a module)."""
    found = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base]).strip(".")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                     for alias in node.names]  # fmt: skip
        else:
            continue
        for name in names:
            while name and name not in modules:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    paths = [path for package in PACKAGES for path in (REPOSITORY / package).rglob("*.py")]
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) - {module_name(path)} for path in paths}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read(graph):
    # guards the checks below against a reader that finds nothing
    assert "pipelines.common.files" in graph["pipelines.latents.stage"]
    assert "jobs.registry" in graph["jobs.cli"]


def test_no_stage_imports_another_stage(graph):
    crossings = [(module, target) for module, targets in graph.items() for target in targets
                 for stage in STAGES for other in STAGES
                 if other != stage and in_package(module, stage) and in_package(target, other)]  # fmt: skip
    assert crossings == []


def test_stages_import_only_the_shared_layer_and_the_model_library(graph):
    allowed = ("pipelines.common", "infgen")
    outside = [(module, target) for module, targets in graph.items() for target in targets
               if any(in_package(module, stage) for stage in STAGES)
               and not any(in_package(target, stage) for stage in STAGES if in_package(module, stage))
               and not any(in_package(target, package) for package in allowed)
               and target != "pipelines"]  # fmt: skip
    assert outside == []


def test_the_shared_layer_and_the_library_stay_below(graph):
    upward = [(module, target) for module, targets in graph.items() for target in targets
              if (in_package(module, "pipelines.common") and (any(in_package(target, s) for s in STAGES)
                                                              or in_package(target, "jobs")))
              or (in_package(module, "pipelines") and in_package(target, "jobs"))
              or (in_package(module, "infgen") and not in_package(target, "infgen"))]  # fmt: skip
    assert upward == []


def test_the_import_graph_has_no_cycle(graph):
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
