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
