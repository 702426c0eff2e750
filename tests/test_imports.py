"""Module layering of the decoder and capture packages: no import cycles (issue 7, item 5).

Read from the source with ``ast`` (imports inside functions count too: a lazy import hides a cycle,
it does not remove it). ``protocols`` is sans-I/O and imports nothing of ours outside itself;
``capture`` may use ``protocols`` but never the node (``proxy``) or the peer link (``sync``).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _graph(packages: list[str]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for pkg in packages:
        for path in sorted((ROOT / pkg).glob("*.py")):
            mod = f"{pkg}.{path.stem}" if path.stem != "__init__" else pkg
            deps: set[str] = set()
            tree = ast.parse(path.read_text(), str(path))
            # imports under `if TYPE_CHECKING:` are for annotations only and never run
            typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                           and "TYPE_CHECKING" in ast.unparse(block.test) for n in ast.walk(block)}
            for node in ast.walk(tree):
                if id(node) in typing_only:
                    continue
                if isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = pkg if node.level == 1 else ""
                        target = f"{base}.{node.module}" if node.module else base
                    else:
                        target = node.module or ""
                    deps.add(target)
                    deps.update(f"{target}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
            graph[mod] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()} | {
        f"{m}!ext": deps for m, deps in graph.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        stack.pop()
        return None

    for m in sorted(k for k in graph if not k.endswith("!ext")):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles_in_protocols_and_capture():
    graph = _graph(["protocols", "capture"])
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_protocols_and_capture_do_not_import_the_node_or_the_peer_link():
    graph = _graph(["protocols", "capture"])
    for mod, deps in graph.items():
        if not mod.endswith("!ext"):
            continue
        bad = sorted(d for d in deps if d.split(".")[0] in ("proxy", "sync", "deploy"))  # schema is allowed
        assert not bad, f"{mod[:-4]} imports {bad}"
        if mod.startswith("protocols"):
            assert not [d for d in deps if d.split(".")[0] == "capture"], f"{mod[:-4]} imports capture"


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


PACKAGES = ["proxy", "protocols", "capture", "schema", "sync"]


def test_no_import_cycles_between_any_modules():
    graph = _graph(PACKAGES)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_import_cycles_between_packages():
    """Packages are layered: schema and protocols at the bottom, the node (proxy) at the top; the
    product never imports its lab (deploy)."""
    graph = _graph(PACKAGES)
    packages: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for mod, deps in graph.items():
        if mod.endswith("!ext"):
            pkg = mod.split(".")[0].removesuffix("!ext")
            packages[pkg] |= {d.split(".")[0] for d in deps if d.split(".")[0] in PACKAGES + ["deploy"]} - {pkg}
    assert "deploy" not in set().union(*packages.values())
    assert packages["schema"] == set() and packages["protocols"] <= {"schema"}
    assert _cycle(packages) is None, " -> ".join(_cycle(packages))
