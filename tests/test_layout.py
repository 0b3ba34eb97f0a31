"""Project rules: import direction between packages, thin apps, nothing shadows the app."""

from __future__ import annotations

import ast
import importlib.metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
APP_PACKAGES = ("server", "client", "shared")
FORBIDDEN = {"shared": {"client", "server"}, "client": {"server"}, "server": {"client"}}


def _imported_top_levels(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    for path in (REPO / package).rglob("*.py"):
        bad = _imported_top_levels(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_no_installed_distribution_shadows_the_app_packages():
    owners = importlib.metadata.packages_distributions()
    shadowing = {name: owners[name] for name in APP_PACKAGES if name in owners}
    assert not shadowing, f"installed distributions provide {shadowing}; uninstall them"


@pytest.mark.parametrize("app_file", ["server/server_app.py", "client/client_app.py"])
def test_app_modules_stay_thin(app_file):
    lines = [line for line in (REPO / app_file).read_text().splitlines() if line.strip()]
    assert len(lines) < 40


def test_app_modules_import_no_torch_at_import_time():
    for app_file in ("server/server_app.py", "client/client_app.py"):
        assert not {"torch", "monai", "opacus"} & _imported_top_levels(REPO / app_file)
