"""Import ``cppo_diag.analyses`` and ``cppo_diag.app`` from a source checkout that is not installed.

The repository keeps the ``analyses/`` and ``app/`` folders at its top level (the product's layout); an install
(a wheel, or ``pip install -e .``) maps them into the package as ``cppo_diag.analyses`` and ``cppo_diag.app``
(``pyproject.toml``, ``[tool.setuptools] package-dir``). A checkout used with ``PYTHONPATH=<checkout>`` (a GPU
machine running the prepared scripts, a second git worktree) has no such mapping; this finder provides the
same one, for those two names only, and only when ``cppo_diag`` itself was imported from a checkout (a
``pyproject.toml`` of cppo-diag beside it). Placed first, it also makes a worktree use its own folders rather
than those of another checkout that is installed in editable mode. It touches no ``sys.path``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

MAPPED = ("analyses", "app")


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """``cppo_diag.<name>`` -> ``<root>/<name>/`` for the names in ``MAPPED``."""

    def __init__(self, root: Path):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package != "cppo_diag" or name not in MAPPED:
            return None
        folder = self.root / name
        return importlib.util.spec_from_file_location(fullname, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])


def checkout_root(package_dir: Path) -> Path | None:
    """The checkout ``cppo_diag`` was imported from, or None for an installed wheel."""
    root = package_dir.parent
    pyproject = root / "pyproject.toml"
    if (package_dir / "analyses").exists() or not pyproject.is_file():
        return None
    if 'name = "cppo-diag"' not in pyproject.read_text(errors="replace"):
        return None
    if not all((root / name / "__init__.py").is_file() for name in MAPPED):
        return None
    return root


def install(package_dir: Path) -> None:
    root = checkout_root(package_dir)
    if root is not None and not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder(root))
