"""The package's layers hold: no import cycle between its modules (imports inside functions count), and
no import from a lower layer to a higher one. Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# top-level part of qksweep -> the parts it must never import
HIGH = {"trainables", "orchestrator", "tracking", "cluster", "api", "cli", "cli_browse", "cli_checks", "cli_cluster",
        "cli_tools"}
FORBIDDEN = {
    **{low: HIGH for low in ("models", "data", "spectral", "snn", "prune")},
    "tracking": HIGH - {"tracking"},
    "trainables": {"orchestrator", "api", "cli", "cli_browse", "cli_checks", "cli_cluster", "cli_tools"},
    "orchestrator": {"api", "cli", "cli_browse", "cli_checks", "cli_cluster", "cli_tools"},
}
LEAVES = {"config", "names", "kill_points"}  # import nothing else from the package


def modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "qksweep").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``mod`` imports, at any depth of its code."""
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            names = [f"{target}.{a.name}" if target else a.name for a in node.names]
            found |= {n if n in known else target for n in names}
            if node.level and not node.module:  # `from .. import x` runs the package's __init__ first
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    out = set()
    for t in found:
        while t not in known and "." in t:
            t = t.rsplit(".", 1)[0]
        if t in known and t != mod:
            out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def part(mod: str) -> str:
    bits = mod.split(".")
    return bits[1] if len(bits) > 1 else ""


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_lower_layers_never_import_higher_ones():
    bad = [f"{m} imports {t}" for m, targets in graph().items() for t in sorted(targets)
           if part(t) in FORBIDDEN.get(part(m), ()) or (part(m) in LEAVES and part(t) != part(m))]
    assert bad == []


@pytest.mark.parametrize("edges,expect", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set()}, []),
])
def test_the_cycle_finder_finds_cycles(edges, expect):
    assert cycles(edges) == expect


def test_the_walk_sees_imports_inside_functions(tmp_path):
    known = {"qksweep.x": tmp_path / "x.py", "qksweep.y": tmp_path / "y.py", "qksweep.p": tmp_path / "p" / "__init__.py",
             "qksweep.p.q": tmp_path / "p" / "q.py"}
    (tmp_path / "x.py").write_text("def f():\n    from .y import g\n    from .p import q\n")
    assert imports("qksweep.x", known["qksweep.x"], known) == {"qksweep.y", "qksweep.p.q"}
