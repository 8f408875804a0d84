"""The package's layering: lower layers never import upper ones, no import cycles, and light imports stay light.

Layers, bottom to top (issue 19): `paths`/`config` (with the pure helpers `anyres`, `cli` and `progress`), `models`, `weights`, `data`, `parallel`, `train`,
`inference`, `eval`, `serve` (the HTTP server, issue 21), then the entry points (`llava_jax/*.py`, every
`__main__`). A module may import its
own layer or any below it. Every import counts: module level or inside a function, `import x`,
`from x import y`, relative ones, `importlib.import_module("literal")`, and those under `TYPE_CHECKING`
(a type that names an upper layer is still a dependency on it).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "llava_jax")
# The floor of each top-level name under llava_jax/; anything not listed is an entry point.
LAYERS = {
    "paths": 0, "config": 0, "anyres": 0, "cli": 0, "progress": 0,
    "models": 1,
    "weights": 2,
    "data": 3,
    "parallel": 4,
    "train": 5,
    "inference": 6,
    "eval": 7,
    "serve": 8,
}
ENTRY = max(LAYERS.values()) + 1
# Edges the order above allows but the package keeps out anyway (the old test's rules):
# data is what Grain's worker processes unpickle, so it stays free of the (flax) models;
# parallel places arrays by the models' rules and has no business reading checkpoints.
FORBIDDEN = {
    "data": ("llava_jax.models",),
    "parallel": ("llava_jax.weights",),
}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted (the longest prefix of the import that is a module of ours)
    path: str  # the importing file, relative to the repository
    line: int
    text: str  # the import statement as written

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.source} -> {self.target} ({self.text})"


def _modules() -> dict[str, str]:
    """Every module under llava_jax/, dotted name -> file path (a package is its __init__.py)."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imported_names(module: str, path: str, node: ast.AST, modules: dict[str, str]) -> list[str]:
    """The dotted names one AST node imports (empty for a node that imports nothing)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against the importing module's package
            package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod.
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def import_graph() -> list[Edge]:
    """Every import of one of our modules by another, from the source (nothing is imported)."""
    modules, edges = _modules(), []
    for module, path in sorted(modules.items()):
        source, seen = open(path).read(), set()
        for node in ast.walk(ast.parse(source, path)):
            for name in _imported_names(module, path, node, modules):
                target = name
                while target and target not in modules:  # `import a.b.c` where c is a function
                    target = target.rpartition(".")[0]
                # The implicit import of parent packages is not an edge: llava_jax/__init__ exports lazily
                # (checked below), and the folders' __init__.py are empty.
                if target.startswith("llava_jax") and target != module and (target, node.lineno) not in seen:
                    seen.add((target, node.lineno))
                    edges.append(Edge(module, target, os.path.relpath(path, ROOT), node.lineno,
                                      ast.get_source_segment(source, node).splitlines()[0].strip()))
    return edges


def floor(module: str) -> int:
    """A module's layer: its top-level name's, or the entry points' for `llava_jax/*.py` and `__main__`s."""
    parts = module.split(".")
    if parts[-1] == "__main__" or len(parts) < 2:
        return ENTRY
    return LAYERS.get(parts[1], ENTRY)


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.source, set()).add(e.target)
        succ.setdefault(e.target, set())
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(out)


def test_graph_sees_every_kind_of_import():
    """The parser finds lazy, relative and importlib imports (a blind parser would pass everything)."""
    by_source: dict[str, set[str]] = {}
    for e in import_graph():
        by_source.setdefault(e.source, set()).add(e.target)
    # Inside a function, and under TYPE_CHECKING:
    assert "llava_jax.weights.load" in by_source["llava_jax"]
    assert "llava_jax.eval.suite" in by_source["llava_jax.train.__main__"]
    modules = _modules()
    relative = ast.parse("from . import image\nfrom ..models import llava\nfrom .records import x")
    names = [n for node in relative.body
             for n in _imported_names("llava_jax.data.pack", modules["llava_jax.data.pack"], node, modules)]
    assert names == ["llava_jax.data.image", "llava_jax.models.llava", "llava_jax.data.records"]
    call = ast.parse("importlib.import_module('llava_jax.models.clip')").body[0].value
    assert _imported_names("llava_jax.x", "x.py", call, modules) == ["llava_jax.models.clip"]


def test_cycles_are_found():
    """A three-module circle is one component; a chain is none."""
    def edge(a, b):
        return Edge(a, b, "f.py", 1, "import")
    assert cycles([edge("a", "b"), edge("b", "c"), edge("c", "a"), edge("c", "d")]) == [["a", "b", "c"]]
    assert cycles([edge("a", "b"), edge("b", "c")]) == []


def test_lower_layers_do_not_import_upper_ones():
    """Every import edge goes to the importer's own layer or one below; checking each edge checks every path."""
    bad = []
    for e in import_graph():
        if floor(e.target) > floor(e.source):
            bad.append(f"{e}: layer {floor(e.source)} imports layer {floor(e.target)}")
        folder = e.source.split(".")[1] if e.source.count(".") else ""
        if e.target.startswith(FORBIDDEN.get(folder, ())):
            bad.append(f"{e}: llava_jax/{folder} may not import {e.target}")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    """No two modules import each other, directly or through others (function-level imports included)."""
    edges = import_graph()
    report = []
    for component in cycles(edges):
        members = set(component)
        report.append("cycle among " + ", ".join(component) + ":\n  "
                      + "\n  ".join(str(e) for e in edges if e.source in members and e.target in members))
    assert not report, "\n".join(report)


# The server's web stack is the `serve` extra: only llava_jax/serve may import it (training never needs it).
WEB_STACK = ("fastapi", "starlette", "uvicorn")


def test_only_serve_imports_the_web_stack():
    """No module outside llava_jax/serve imports FastAPI, Starlette or uvicorn (any import form, as above)."""
    bad = []
    for module, path in sorted(_modules().items()):
        if module == "llava_jax.serve" or module.startswith("llava_jax.serve."):
            continue
        for node in ast.walk(ast.parse(open(path).read(), path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path}:{node.lineno}: {n}" for n in names if n.split(".")[0] in WEB_STACK]
    assert not bad, "the web stack imported outside llava_jax/serve:\n" + "\n".join(bad)


def test_package_and_data_modules_import_without_jax_or_flax():
    """What a Grain worker process unpickles (the data modules) needs neither jax nor flax from us."""
    code = ("import sys, llava_jax, llava_jax.data.records, llava_jax.data.templates, llava_jax.data.tokenizer, "
            "llava_jax.data.image; print(sorted(m for m in ('jax', 'flax') if m in sys.modules)); "
            # The public names still resolve (lazily).
            "print(llava_jax.load_pretrained.__name__, llava_jax.LlavaConfig.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["[]", "load_pretrained LlavaConfig"], out.stdout
