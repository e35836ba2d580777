"""The shape of the tree, read from its imports: ext_proc and xds_server share only kvgate/, no two
packages import each other (directly or around a loop), and library code never imports bench/ or
tests/. A change that breaks the shape fails here, before anyone has to follow the imports by hand."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The units of the graph, most specific first: a module belongs to the first that prefixes it. The CLI
# (kvgate.cli) starts every part, so it is apart from the kvgate library that the parts share.
PACKAGES = ("kvgate.cli", "kvgate", "xds_server", "ext_proc", "engines.sim", "engines.real", "engines", "bench",
            "tests")
LIBRARY = ("kvgate", "xds_server", "ext_proc", "engines", "engines.sim", "engines.real")


def package_of(module: str) -> str | None:
    return next((p for p in PACKAGES if module == p or module.startswith(p + ".")), None)


def modules() -> Iterator[tuple[str, Path]]:
    for top in ("kvgate", "xds_server", "ext_proc", "engines", "bench", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
            yield ".".join(parts), path


def imports_of(path: Path) -> set[str]:
    """Modules named by import statements anywhere in the file (a function-level import counts too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def package_graph() -> dict[str, dict[str, set[str]]]:
    """package -> imported package -> the modules that import it (for the failure message)."""
    graph: dict[str, dict[str, set[str]]] = {p: {} for p in PACKAGES}
    for module, path in modules():
        source = package_of(module)
        assert source is not None
        for imported in imports_of(path):
            target = package_of(imported)
            if target is not None and target != source:
                graph[source].setdefault(target, set()).add(module)
    return graph


def cycles(graph: dict[str, dict[str, set[str]]]) -> list[list[str]]:
    found: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == path[0]:
                found.append([*path, nxt])
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest member
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    return found


def test_no_cycle_between_packages() -> None:
    assert cycles(package_graph()) == []


def test_ext_proc_and_xds_server_share_only_kvgate() -> None:
    graph = package_graph()
    assert "xds_server" not in graph["ext_proc"], graph["ext_proc"].get("xds_server")
    assert "ext_proc" not in graph["xds_server"], graph["xds_server"].get("ext_proc")


def test_the_shared_library_depends_on_no_part() -> None:
    """kvgate/ (without its CLI) is what every part shares, so it imports none of them."""
    assert set(package_graph()["kvgate"]) == set(), package_graph()["kvgate"]


def test_library_code_never_imports_bench_or_tests() -> None:
    graph = package_graph()
    for package in LIBRARY:
        for banned in ("bench", "tests"):
            assert banned not in graph[package], (package, banned, graph[package].get(banned))


def test_bench_does_not_import_tests() -> None:
    assert "tests" not in package_graph()["bench"], package_graph()["bench"].get("tests")


def test_the_checker_sees_a_cycle() -> None:
    assert cycles({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b": set()}, "b": {}}) == []


def test_the_admission_service_loads_no_catalog() -> None:
    """ext_proc never reads the catalog (it learns policies over ADS), so importing its server must not
    pay for the catalog's validation stack: pydantic, yaml, the resource renderer."""
    probe = ("import sys, ext_proc.server, ext_proc.__main__; "
             "print(sorted(m for m in ('kvgate.catalog', 'pydantic', 'yaml', 'xds_server') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
