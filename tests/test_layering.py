"""Layering (DESIGN.md §3): conversion depends only on adapters, attention and config; nothing imports
back into it in a circle. The graph counts every import statement, module-level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
BELOW_CONVERT = ("castle_convert.adapters", "castle_convert.attention", "castle_convert.config",
                 "castle_convert.recipes")        # recipes: parse_keep_softmax only; it imports config alone


def import_graph() -> dict[str, set[str]]:
    """castle_convert module -> the castle_convert modules it imports (the package root left out)."""
    mods = {}
    for f in sorted((ROOT / "castle_convert").rglob("*.py")):
        parts = list(f.relative_to(ROOT).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
                mod = ".".join(base[:len(base) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                    else node.module or ""
                subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in mods]
                targets = subs + ([mod] if len(subs) < len(node.names) else [])
            else:
                continue
            edges[m] |= {r for r in map(resolve, targets) if r.startswith("castle_convert.") and r != m}
    return edges


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in edges[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_convert_depends_only_on_adapters_attention_and_config():
    edges = import_graph()
    above = sorted(m for m in reachable(edges, "castle_convert.convert") if not m.startswith(BELOW_CONVERT))
    assert not above, f"castle_convert.convert reaches {above} through its imports"


def test_no_import_circle_through_conversion_or_measurement():
    edges = import_graph()
    for module in ("castle_convert.convert", "castle_convert.bench", "castle_convert.adapters.timm_grid",
                   "castle_convert.export.save", "castle_convert.export.guards"):
        assert module not in reachable(edges, module), f"{module} imports itself back through a circle"


def circles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each is an import circle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


# The circles that remain, each inside one room: a package's __init__ re-exporting its own submodules, and the
# attention kinds with the CastlingConfig they are built from (config looks the kind registry up lazily).
ALLOWED_CIRCLES = ({"castle_convert.adapters"}, {"castle_convert.attention", "castle_convert.config"})


def test_no_import_circle_between_rooms():
    """data → natural → zoo → data / models → export.load → export.source → data was one circle: the cache path
    (castle_convert.cache) and the data config (castle_convert.preprocess) now sit below everything that reads
    them, and the built-ins (zoo) below the MODEL resolver (models). No circle may span two rooms again."""
    def within(module: str, room: set[str]) -> bool:
        return any(module == a or module.startswith(a + ".") for a in room)

    for component in circles(import_graph()):
        assert any(all(within(m, room) for m in component) for room in ALLOWED_CIRCLES), \
            f"import circle across rooms: {' -> '.join(sorted(component))}"


def test_the_data_circle_stays_cut():
    edges = import_graph()
    for module in ("castle_convert.data", "castle_convert.natural", "castle_convert.zoo", "castle_convert.models",
                   "castle_convert.export.load", "castle_convert.export.source", "castle_convert.preprocess",
                   "castle_convert.cache"):
        assert module not in reachable(edges, module), f"{module} imports itself back through a circle"
    assert reachable(edges, "castle_convert.cache") == set()                   # a leaf
    assert "castle_convert.data" not in reachable(edges, "castle_convert.export.source")
    assert "castle_convert.models" not in reachable(edges, "castle_convert.zoo")
