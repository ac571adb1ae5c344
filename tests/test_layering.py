"""Three floors, arrows one way: the engine (`costgraph/` outside `costgraph/app/`) imports no model and
no verifier; models (`graphs/`) import the engine; `verify/` imports engine and models; the app
(`costgraph/app/`) may import all of them. Read from the source (AST), every import included, those
inside functions too: a function-local import may defer a heavy package (torch, matplotlib) but never
close a cycle, so the whole import graph of the project must be acyclic. The engine also names no
model: no DeepSeek-OCR word appears in its source."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent


# the folders and the names they install under (pyproject.toml's package-dir)
PACKAGES = {"costgraph": "costgraph", "graphs": "costgraph.graphs", "verify": "costgraph.verify"}


def floor(module: str) -> str:
    # `python -m costgraph` is an entry point into the app, not part of the engine
    if module.startswith("costgraph.app") or module == "costgraph.__main__":
        return "app"
    if module.startswith("costgraph.graphs"):
        return "models"
    if module.startswith("costgraph.verify"):
        return "verify"
    return "engine"


# which floors each floor may import
ALLOWED = {"engine": {"engine"}, "models": {"engine", "models"}, "verify": {"engine", "models", "verify"},
           "app": {"engine", "models", "verify", "app"}}


def modules() -> dict[str, Path]:
    out = {}
    for folder, name in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([name] + parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local_nodes = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local_nodes |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import mod` imports the module pkg.mod when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            # the longest known module the target names
            parts = t.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts:
                out.append((".".join(parts), node.lineno, id(node) in local_nodes))
    return out


def edges():
    mods = modules()
    known = set(mods)
    return [(name, target, line, local) for name, path in mods.items()
            for target, line, local in imports(name, path, known) if target != name]


def test_arrows_point_one_way():
    bad = [f"{src}:{line} ({floor(src)}) imports {dst} ({floor(dst)})" for src, dst, line, _ in edges()
           if floor(dst) not in ALLOWED[floor(src)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = nx.DiGraph()
    for src, dst, line, local in edges():
        # a package's __init__ importing its own submodules is how a package is assembled, not a cycle
        if dst.startswith(src + "."):
            continue
        g.add_edge(src, dst, line=line, local=local)
    cycles = list(nx.simple_cycles(g))
    shown = [" -> ".join(c + [c[0]]) for c in cycles[:10]]
    assert not cycles, "import cycles:\n" + "\n".join(shown)


def test_the_layering_test_sees_a_violation(tmp_path, monkeypatch):
    """The checks above are not vacuous: an engine module importing a model is caught."""
    fake = ROOT / "costgraph" / "_layering_probe.py"
    fake.write_text("def f():\n    from costgraph.graphs.deepseek_ocr import layout\n")
    try:
        bad = [(s, d) for s, d, _, local in edges() if s == "costgraph._layering_probe"]
        assert bad == [("costgraph._layering_probe", "costgraph.graphs.deepseek_ocr.layout")]
        assert floor(bad[0][1]) not in ALLOWED[floor(bad[0][0])]
    finally:
        fake.unlink()


MODEL_WORDS = re.compile(r"w_crop|h_crop|\bSAM\b|\bCLIP\b|deepseek|DeepSeek|gundam|\bcrops?\b", re.IGNORECASE)


def test_engine_names_no_model():
    hits = []
    for name, path in modules().items():
        if floor(name) != "engine":
            continue
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if MODEL_WORDS.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{k}: {line.strip()}")
    assert not hits, "model words in the engine:\n" + "\n".join(hits)
