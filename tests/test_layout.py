"""The package's layout holds: every module sits on one floor, imports go one way, down

    ops -> models -> loading -> generate/measure -> pareto/train -> bench/tour -> cli

with no cycles (counting imports inside functions, which run later but bind the modules as
surely), and no module imports another's private names. Read from the source, not by
importing it, so optional dependencies do not matter.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "archopt"

# Floors, lowest first: a module may import its own floor and those below, never above.
FLOORS = [
    {"errors", "io", "report", "choices"},  # files, tables, plots, progress lines, the names
    # a user chooses among: nothing of torch's
    {"ops"},  # building blocks, no model knowledge
    {"models"},  # one file per family, and the registry table they fill
    {"loading", "registry"},  # checkpoints (loading a pretrained model is a registry lookup)
    {
        "generate",
        "sampling",
        "perplexity",
        "decode_step",
        "background_build",
        "cuda_graph_step",
        "step_graphs",
        "measure",
        "optimize",
        "export",
        "references",
    },
    {"pareto", "train", "serve", "search"},
    {"bench", "tour"},
    {"cli"},
]
# The registry table is private to the model files that fill it, and read by the lookups
# (archopt.registry) and the door for language models (archopt.loading.llm).
PRIVATE_MODULES_ALLOWED = {"archopt.models._registry"}


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _resolve(target: str) -> str:
    """The module an import binds: the longest prefix of ``target`` that is a module."""
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def _imports(name: str) -> list[tuple[int, str, str | None]]:
    """(line, module imported, name taken from it or None) for each archopt import in
    ``name``'s source, wherever it stands (top level, functions, conditionals)."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                found.append(
                    (node.lineno, full, None) if full in MODULES else (node.lineno, base, a.name)
                )
    return [(line, _resolve(m), n) for line, m, n in found if m.split(".")[0] == "archopt"]


def _floor(module: str) -> int:
    """The floor of ``module``, -1 for none. The package itself (the public API) stands on
    the highest floor it re-exports from."""
    parts = module.split(".")
    if len(parts) == 1:
        return max(_floor(t) for _, t, _ in _imports(module) if t != module)
    return next((i for i, names in enumerate(FLOORS) if parts[1] in names), -1)


def test_every_module_has_a_floor():
    lost = [m for m in MODULES if _floor(m) == -1]
    assert not lost, f"modules on no floor (add them to FLOORS and the README's Layout): {lost}"


def test_imports_go_one_way():
    upward = []
    for name in MODULES:
        here = _floor(name)
        for line, target, _ in _imports(name):
            if _floor(target) > here:
                upward.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {target}")
    assert not upward, "imports going up a floor:\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = {n: {t for _, t, _ in _imports(n) if t != n} for n in MODULES}
    cycles, done, stack = [], set(), []

    def visit(n: str) -> None:
        if n in stack:
            cycles.append([*stack[stack.index(n) :], n])
            return
        if n in done:
            return
        stack.append(n)
        for m in sorted(graph[n]):
            visit(m)
        stack.pop()
        done.add(n)

    for n in sorted(graph):
        visit(n)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    private = []
    for name in MODULES:
        for line, target, taken in _imports(name):
            hidden = any(p.startswith("_") for p in target.split("."))
            if hidden and target not in PRIVATE_MODULES_ALLOWED and target != name:
                private.append(f"{name}:{line}: module {target}")
            if taken is not None and taken.startswith("_") and target != name:
                private.append(f"{name}:{line}: {target}.{taken}")
    assert not private, "private names imported across modules:\n" + "\n".join(private)
