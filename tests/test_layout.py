"""The package layers, checked from the source: outbox/ (the engine's data and SQL) imports none of
the others, stages/ (images, boxes and text) knows no engine, workers/ runs stages but shows nothing,
and console/ (what a person looks at) sits on top. A wrong import here is how a data module starts
rendering terminals or a stage starts opening connections."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "outbox": {"workers", "stages", "console", "cli"},
    "stages": {"outbox", "workers", "console", "cli"},
    "workers": {"console", "cli"},
    "console": {"cli"},
}


def imported_packages(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_a_package_imports_only_the_layers_below_it(package):
    offenders = {str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package])
                 for path in sorted((ROOT / package).rglob("*.py"))}
    assert not {p: names for p, names in offenders.items() if names}


def test_the_forbidden_names_are_real_packages():
    """A renamed package would make the check above pass vacuously."""
    for names in FORBIDDEN.values():
        for name in names:
            assert (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file(), name
