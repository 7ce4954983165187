"""The install layout: one import name (``cppo_diag``), and no import cycle between its packages."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# the repository's folders and the package each one is installed as (pyproject.toml [tool.setuptools])
SOURCES = {"cppo_diag": "cppo_diag", "analyses": "cppo_diag.analyses", "app": "cppo_diag.app"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    parts[0] = SOURCES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(module: str) -> str:
    """The package a module belongs to for the layering check: ``cppo_diag.<sub>`` (top-level modules of
    cppo_diag such as ``cppo_diag.loss`` are their own unit)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _imports(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, at the top or inside functions (lazy imports count too)."""
    out: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names)
    return {m for m in out if m == "cppo_diag" or m.startswith("cppo_diag.")}


def package_graph() -> dict[str, set[str]]:
    """unit -> the units it imports (names re-exported by the root package, ``from cppo_diag import open_run``,
    are not units and are left out: the root package imports its re-exports lazily)."""
    files = [p for folder in SOURCES for p in sorted((REPO / folder).rglob("*.py"))]
    units = {_unit(_module_name(p)) for p in files}
    graph: dict[str, set[str]] = {}
    for path in files:
        mod = _module_name(path)
        src = _unit(mod)
        for imp in _imports(path, mod):
            dst = _unit(imp)
            if dst != src and dst in units and dst != "cppo_diag":
                graph.setdefault(src, set()).add(dst)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_between_packages():
    graph = package_graph()
    assert "cppo_diag.analyses" in graph and "cppo_diag.app" in graph
    assert find_cycle(graph) is None, f"import cycle between packages: {' -> '.join(find_cycle(graph))}"
    # the core imports nothing above it
    for core in ("cppo_diag.masks", "cppo_diag.storage", "cppo_diag.capture", "cppo_diag.loss"):
        above = graph.get(core, set()) & {"cppo_diag.analyses", "cppo_diag.app", "cppo_diag.cli", "cppo_diag.study",
                                          "cppo_diag.train"}
        assert not above, f"{core} imports {sorted(above)}"


# The floors of docs/architecture.md: a package imports only packages on its own floor or lower ones (no cycle).
FLOORS = {
    "cppo_diag._lazy": 0, "cppo_diag._checkout": 0, "cppo_diag.metric_names": 0, "cppo_diag.masks": 0,
    "cppo_diag": 1,  # the root package: imports _lazy and _checkout; its re-exports load lazily, on first use
    "cppo_diag.storage": 1, "cppo_diag.loss": 1,
    "cppo_diag.capture": 2,
    "cppo_diag.analyses": 3, "cppo_diag.importers": 3,
    "cppo_diag.train": 4, "cppo_diag.study": 4, "cppo_diag.app": 4,
    "cppo_diag.integrations": 5,
    "cppo_diag.cli": 6,
}


def test_packages_import_only_lower_floors():
    graph = package_graph()
    assert set(graph) <= set(FLOORS), f"packages without a floor (docs/architecture.md): {sorted(set(graph) - set(FLOORS))}"
    upward = sorted(f"{src} (floor {FLOORS[src]}) imports {dst} (floor {FLOORS[dst]})"
                    for src, dsts in graph.items() for dst in dsts if FLOORS[dst] > FLOORS[src])
    assert not upward, "\n".join(upward)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None


@pytest.mark.slow
def test_wheel_installs_one_import_name(tmp_path):
    """The built wheel holds only the ``cppo_diag`` package (analyses and app inside it) and its metadata."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("cppo_diag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"cppo_diag", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    for must in ("cppo_diag/analyses/__init__.py", "cppo_diag/app/streamlit_app.py", "cppo_diag/app/views/runs.py",
                 "cppo_diag/study/presets/long.toml", "cppo_diag/train/assets/warmstart_chain_forks/model.safetensors"):
        assert must in names, must
    assert not any(n.startswith(("analyses/", "app/", "tests/")) for n in names)


def test_an_uninstalled_checkout_imports_its_own_analyses_and_app(tmp_path):
    """``PYTHONPATH=<checkout>`` (no install): ``cppo_diag.analyses`` and ``cppo_diag.app`` come from that
    checkout's top-level folders, even when another checkout is installed in editable mode."""
    import shutil

    copy = tmp_path / "checkout"
    for name in ("cppo_diag", "analyses", "app"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "assets"))
    shutil.copy(REPO / "pyproject.toml", copy / "pyproject.toml")
    code = ("import cppo_diag.analyses.tokens as t, cppo_diag.app.roots as r, cppo_diag; "
            "print(cppo_diag.__file__); print(t.__file__); print(r.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={"PYTHONPATH": str(copy), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    files = out.stdout.split()
    assert all(f.startswith(str(copy)) for f in files), files
