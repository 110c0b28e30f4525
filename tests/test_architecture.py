"""The shape of the house (STYLE.md): no import cycle inside lit_dpo, the core never imports the
experiments, and every module imports.

The import graph is read from the source with `ast`, not by importing: an edge A -> B for every
`import`/`from ... import` of B anywhere in A's file (module level, inside functions, under
`if TYPE_CHECKING`). `from pkg.x import y` is an edge to `pkg.x.y` if that is a module, else to
`pkg.x`. A package's `__init__.py` is the node of the package itself. Importing a submodule is not
counted as importing its parent package (Python runs the parent's `__init__` first, but that only
closes a cycle when the submodule imports the package back, which is an edge of its own), so a
package `__init__` that re-exports its submodules is fine as long as none of them imports it.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "lit_dpo"

Graph = dict[str, set[str]]


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Module name -> file, for every module of `package` (a directory under `root`).

    Only directories holding an `__init__.py` are packages (as for `pkgutil.walk_packages`), so
    a folder of loose scripts is skipped. Where `x.py` and `x/__init__.py` both exist (a module
    turning into a package), the package wins, as it does for Python's import system.
    """
    found: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        folders = [root.joinpath(*rel.parts[:i]) for i in range(1, len(rel.parts))]
        if not all((folder / "__init__.py").is_file() for folder in folders):
            continue
        parts = rel.with_suffix("").parts
        if parts[-1] == "__init__":
            found[".".join(parts[:-1])] = path
        elif ".".join(parts) not in found or found[".".join(parts)].name != "__init__.py":
            found[".".join(parts)] = path
    return found


def absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module name of `from <node.module> import ...` written in `module`."""
    if not node.level:
        return node.module or ""
    package = module if is_package else module.rpartition(".")[0]
    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


def longest_known(name: str, modules: set[str]) -> str | None:
    """The module an imported dotted name lands in: its longest prefix that is a module."""
    parts = name.split(".")
    return next(
        (".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
        None,
    )


def import_targets(tree: ast.AST, module: str, is_package: bool, modules: set[str]) -> set[str]:
    """The modules (of `modules`) that a file imports anywhere, itself left out."""
    targets: set[str | None] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(longest_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node, module, is_package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"  # `from a import b` with a.b a module -> a.b
                targets.add(sub if sub in modules else longest_known(base, modules))
    return {t for t in targets if t is not None and t != module}


def import_graph(root: Path, package: str) -> Graph:
    """Module -> the modules of `package` that it imports."""
    modules = find_modules(root, package)
    graph: Graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = import_targets(tree, name, path.name == "__init__.py", set(modules))
    return graph


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None: depth-first search, where an edge back
    to a node still on the path closes a cycle. Nodes and edges are visited in sorted order, so
    the cycle reported is the same on every run."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)) is not None:
            return cycle
    return None


# ------------------------------------------------------------------------- the checker itself


def test_find_cycle_on_hand_made_graphs():
    """A diamond (a -> b, c -> d) has no cycle; a -> b -> c -> a has one, reported from the first
    node in sorted order; a self-import is a cycle of one."""
    diamond = {"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert find_cycle(diamond) is None
    assert find_cycle({}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    # The cycle need not pass through the start: d -> b -> c -> b.
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    # Edges to nodes outside the graph (third-party modules) are followed harmlessly.
    assert find_cycle({"a": {"torch"}}) is None


def write_package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_import_graph_on_a_toy_package(tmp_path):
    """Every import form lands on the right node: function-level imports, relative imports,
    `from pkg import submodule`, `from pkg.mod import name`, `import pkg.sub.mod`, a subpackage's
    `__init__` as its own node, and `x.py` beside `x/__init__.py` (the package wins)."""
    write_package(
        tmp_path,
        {
            "toy/__init__.py": "from toy.low import helper\n",
            "toy/low.py": "import os\n\ndef helper():\n    pass\n",
            "toy/mid.py": "def f():\n    from . import low\n    from .sub import leaf\n",
            "toy/high.py": "import toy.sub.leaf\nfrom toy.mid import f\nfrom toy import sub\n",
            "toy/sub/__init__.py": "from .leaf import thing\n",
            "toy/sub/leaf.py": "from ..low import helper\nthing = 1\n",
            "toy/data.py": "import toy.high\n",  # shadowed by toy/data/: never imported
            "toy/data/__init__.py": "from toy.data.parts import x\n",
            "toy/data/parts.py": "from toy.sub import thing\nx = 1\n",
            "toy/scripts/run.py": "import toy.high\n",  # no __init__.py: not a module
        },
    )
    graph = import_graph(tmp_path, "toy")
    assert graph == {
        "toy": {"toy.low"},
        "toy.low": set(),
        "toy.mid": {"toy.low", "toy.sub.leaf"},
        "toy.high": {"toy.sub.leaf", "toy.mid", "toy.sub"},
        "toy.sub": {"toy.sub.leaf"},
        "toy.sub.leaf": {"toy.low"},
        "toy.data": {"toy.data.parts"},
        "toy.data.parts": {"toy.sub"},
    }
    assert find_cycle(graph) is None
    # A submodule importing its package back closes a cycle through the package's __init__,
    # even from inside a function.
    (tmp_path / "toy/low.py").write_text("def helper():\n    from toy import mid\n    import toy\n")
    assert find_cycle(import_graph(tmp_path, "toy")) == ["toy", "toy.low", "toy"]


# ---------------------------------------------------------------------------------- lit_dpo


def test_no_import_cycle_in_lit_dpo():
    cycle = find_cycle(import_graph(ROOT, CORE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def experiment_imports(tree: ast.AST) -> list[str]:
    """Every way a file reaches the `experiments` package: import statements at any level and
    `importlib.import_module("experiments...")` / `__import__("experiments...")` calls."""

    def is_experiments(name: object) -> bool:
        return isinstance(name, str) and (name == "experiments" or name.startswith("experiments."))

    found: list[tuple[int, str]] = []  # (line, what), sorted by line at the end
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"import {a.name}") for a in node.names if is_experiments(a.name)
            ]
        elif isinstance(node, ast.ImportFrom) and not node.level and is_experiments(node.module):
            found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0].value
            if called in ("import_module", "__import__") and is_experiments(arg):
                found.append((node.lineno, f"{called}({arg!r})"))
    return [what for _, what in sorted(found)]


def test_experiment_imports_are_found():
    code = (
        "import os\nimport experiments.sentiment\n"
        "def f():\n    from experiments import sentiment\n"
        "    importlib.import_module('experiments.sentiment')\n    __import__('experiments')\n"
        "from experimentsx import y\nimport_module('lit_dpo.losses')\n"
    )
    assert experiment_imports(ast.parse(code)) == [
        "import experiments.sentiment",
        "from experiments import ...",
        "import_module('experiments.sentiment')",
        "__import__('experiments')",
    ]


@pytest.mark.parametrize("name, path", sorted(find_modules(ROOT, CORE).items()))
def test_core_never_imports_experiments(name, path):
    found = experiment_imports(ast.parse(path.read_text(encoding="utf-8")))
    assert not found, f"{name} imports the experiments: {found}"


@pytest.mark.parametrize("name", sorted(find_modules(ROOT, CORE)))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_core_file_is_over_450_lines():
    """One job per file (STYLE.md): a file past ~450 lines is doing two."""
    sizes = {p: len(p.read_text().splitlines()) for p in (ROOT / CORE).rglob("*.py")}
    assert not {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > 450}
