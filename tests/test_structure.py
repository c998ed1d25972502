"""The import graph follows the data flow: networks -> quant -> search -> {compile, sim} -> report.

Read from the source with ``ast`` (nothing is imported): every import statement, at module level
or inside a function, plus imports by name (``importlib.import_module("releq_tvm.sim")``). The
top-level ``kernels/`` and ``networks/`` folders are the packages ``releq_tvm.kernels`` and
``releq_tvm.networks``. Two rules:

* no import cycle among the modules (a package's ``__init__`` is a module of its own);
* no stage imports a stage that comes after it (see :data:`RANK`); the leaf packages import
  nothing else of ``releq_tvm``, ``networks`` nothing of TVM and ``kernels`` nothing of torch or RL.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folder -> the package it is installed as (pyproject.toml's package-dir).
SOURCE_FOLDERS = {"releq_tvm": "releq_tvm", "kernels": "releq_tvm.kernels", "networks": "releq_tvm.networks"}

#: Where each stage sits in the data flow. A module may import its own stage and the stages of a
#: lower rank; two stages of one rank (compile and sim; kernels and networks) import neither.
RANK = {
    "networks": 0,  # leaf packages
    "kernels": 0,
    "base": 1,  # config, errors, bits, io, machine, data, store: what every stage shares
    "quant": 2,
    "search": 3,
    "compile": 4,  # the cost backends
    "sim": 4,
    "report": 5,
    "cli": 6,  # drivers: may import anything, imported by nothing but drivers
}
#: Stages whose every module is theirs (the ``cli`` modules inside them excepted).
PACKAGE_STAGES = ("networks", "kernels", "quant", "search", "compile", "sim", "report")
#: The modules directly under releq_tvm/ and their stage; a new one must be placed here.
TOP_LEVEL_STAGES = {
    "config": "base",
    "errors": "base",
    "bits": "base",
    "io": "base",
    "machine": "base",
    "data": "base",
    "store": "base",  # the one on-disk cache (namespace, key) -> JSON
    "config_fields": "base",  # settings dataclass fields: help, option name, choices and range
    "progress": "base",  # progress bars on a terminal (latency tables, long fine-tunes, Pareto scoring)
    "timing": "base",  # the one timing protocol (compile's kernels and networks, report's peers)
    "train": "quant",  # the fine-tune loop behind quant's accuracy (short and long fine-tunes)
    "peers": "report",  # our builds against other engines, written under results/
    "api": "cli",  # the Python API: search, compile and simulate for scripts and notebooks (the CLI calls it)
    "cli": "cli",
    "cli_options": "cli",
    "config_cli": "cli",  # click options generated from a settings dataclass
    "train_cli": "cli",
    "bench_cli": "cli",
    "demo": "cli",
    "__main__": "cli",
}
#: Imports against the data flow that are meant, with the reason. Each must stay a lazy import by
#: name (never a plain import statement), so search imports and runs without TVM or the simulator.
ALLOWED_LATER_STAGE = {
    ("releq_tvm.search.cost", "releq_tvm.compile"):
        "the cost-backend seam: --measure cpu resolves compile's cpu_cost_ratio by name on first use",
    ("releq_tvm.search.cost", "releq_tvm.sim"):
        "the cost-backend seam: --measure stripes resolves sim's stripes_cost_ratio by name on first use",
    ("releq_tvm.search.run", "releq_tvm.compile.graph"):
        "a --model's operators are checked by the integer lowering's graph tracer before any search work",
    ("releq_tvm", "releq_tvm.api"):
        "the package face: releq_tvm.search/compile/simulate import the API by name on first use",
}
#: Third-party packages a leaf package must not import (STYLE.md: what each folder knows nothing of).
FORBIDDEN_THIRD_PARTY = {
    "releq_tvm.networks": {"tvm"},
    "releq_tvm.kernels": {"torch", "torchvision", "stable_baselines3", "sb3_contrib", "gymnasium"},
}


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (a releq_tvm module) or third-party top-level name
    where: str  # path:line
    kind: str  # "module" (module level), "function" (inside a def / class) or "by name" (importlib)

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.kind} import at {self.where})"


def _module_files() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``)."""
    modules = {}
    for folder, package in SOURCE_FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts.pop()
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _resolve(name: str, modules) -> str | None:
    """The longest prefix of dotted ``name`` that is one of ``modules`` (None: not ours)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports_of(module: str, path: Path, is_package: bool, modules) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    where = lambda node: f"{path.relative_to(ROOT)}:{node.lineno}"  # noqa: E731
    found: list[Import] = []

    def add(names, node, kind):
        for name in names:
            if name.split(".")[0] != "releq_tvm":
                found.append(Import(module, name.split(".")[0], where(node), kind))
                continue
            target = _resolve(name, modules)
            if target and target != module:
                found.append(Import(module, target, where(node), kind))

    def visit(node, inside_function: bool):
        kind = "function" if inside_function else "module"
        if isinstance(node, ast.Import):
            add([a.name for a in node.names], node, kind)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module or ""])
            else:
                base = node.module
            base = base.rstrip(".")
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            add([f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names], node, kind)
        elif isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            first = node.args[0] if node.args else None
            if "import" in callee and isinstance(first, ast.Constant) and isinstance(first.value, str):
                add([first.value], node, "by name")
        nested = inside_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    visit(tree, False)
    return list(dict.fromkeys(found))  # `from m import a, b` is one import of m


@functools.cache
def import_graph() -> tuple[dict[str, tuple[Path, bool]], tuple[Import, ...]]:
    modules = _module_files()
    imports = [imp for name, (path, pkg) in modules.items() for imp in _imports_of(name, path, pkg, modules)]
    return modules, tuple(imports)


def stage_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "base"  # releq_tvm/__init__.py
    if parts[1] in PACKAGE_STAGES:
        return "cli" if parts[-1] == "cli" else parts[1]
    return TOP_LEVEL_STAGES.get(parts[1], "unplaced")


def _internal(imports) -> list[Import]:
    return [imp for imp in imports if imp.target.startswith("releq_tvm")]


def test_the_walk_sees_every_kind_of_import():
    """Guards the test itself: a module-level, a function-level and a by-name import are all found."""
    _, imports = import_graph()
    edges = {(imp.source, imp.target, imp.kind) for imp in imports}
    assert ("releq_tvm.compile.lower", "releq_tvm.kernels.shapes", "module") in edges
    assert ("releq_tvm.report.build", "releq_tvm.report.runs", "function") in edges
    assert ("releq_tvm.search.cost", "releq_tvm.sim", "by name") in edges
    assert ("releq_tvm.kernels.int8", "releq_tvm.kernels.shapes", "module") in edges  # `from .shapes import`
    assert ("releq_tvm.compile.lower", "tvm", "module") in edges  # third party, by its top-level name


def test_every_module_has_a_stage():
    modules, _ = import_graph()
    unplaced = sorted(m for m in modules if stage_of(m) == "unplaced")
    assert not unplaced, f"place {', '.join(unplaced)} in TOP_LEVEL_STAGES of tests/test_structure.py (its data-flow stage)"


def test_no_import_cycle():
    modules, imports = import_graph()
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in _internal(imports):
        graph[imp.source].setdefault(imp.target, imp)

    # depth-first search; a grey node met again closes a cycle
    state: dict[str, str] = {}
    path: list[Import] = []
    cycles: list[list[Import]] = []

    def visit(node: str) -> None:
        state[node] = "grey"
        for target, imp in sorted(graph[node].items()):
            if state.get(target) == "grey":
                start = next((i for i, e in enumerate(path) if e.source == target), len(path))
                cycles.append(path[start:] + [imp])
            elif target not in state:
                path.append(imp)
                visit(target)
                path.pop()
        state[node] = "black"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join("  " + "; ".join(map(str, cycle)) for cycle in cycles)


def test_no_stage_imports_a_later_stage():
    _, imports = import_graph()
    bad = []
    for imp in _internal(imports):
        src, dst = stage_of(imp.source), stage_of(imp.target)
        if src == dst or src == "cli" or "unplaced" in (src, dst):  # unplaced: see the test above
            continue
        if RANK[dst] < RANK[src] and src not in ("networks", "kernels"):
            continue
        if (imp.source, imp.target) in ALLOWED_LATER_STAGE and imp.kind == "by name":
            continue
        if src in ("networks", "kernels"):
            bad.append(f"{imp}: the leaf package {src} imports nothing else of releq_tvm")
        else:
            relation = "comes after" if RANK[dst] > RANK[src] else "sits beside"
            bad.append(f"{imp}: {dst} {relation} {src} in the data flow")
    assert not bad, "imports against the data flow:\n" + "\n".join(f"  {line}" for line in bad)


def test_the_allowed_exceptions_still_exist():
    """An exception nobody needs any more is removed, so the allow-list says only what is true."""
    _, imports = import_graph()
    lazy = {(imp.source, imp.target) for imp in imports if imp.kind == "by name"}
    stale = sorted(set(ALLOWED_LATER_STAGE) - lazy)
    assert not stale, f"remove from ALLOWED_LATER_STAGE (no such import by name any more): {stale}"


def test_leaf_packages_know_nothing_of_the_stack_above_them():
    _, imports = import_graph()
    bad = [
        f"{imp}: {package} knows nothing of {imp.target}"
        for imp in imports
        for package, forbidden in FORBIDDEN_THIRD_PARTY.items()
        if (imp.source == package or imp.source.startswith(package + ".")) and imp.target in forbidden
    ]
    assert not bad, "\n".join(bad)
