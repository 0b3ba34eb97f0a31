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


#: ``client``'s sub-packages from the bottom up: a module imports only its own sub-package and those below it.
CLIENT_LAYERS = ("data", "inference", "training", "runtime", "commands")


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def test_client_sub_packages_import_only_downwards():
    assert {p.name for p in (REPO / "client").iterdir() if (p / "__init__.py").is_file()} == set(CLIENT_LAYERS)
    for path in (REPO / "client").rglob("*.py"):
        layer = path.relative_to(REPO / "client").parts[0]
        if layer not in CLIENT_LAYERS:
            continue  # client_app.py and __main__.py sit on top
        for name in _imported_modules(path):
            parts = name.split(".")
            if parts[0] == "client" and len(parts) > 1 and parts[1] in CLIENT_LAYERS:
                assert CLIENT_LAYERS.index(parts[1]) <= CLIENT_LAYERS.index(layer), \
                    f"{path.relative_to(REPO)} ({layer}) imports {name}, a layer above it"


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def test_deploy_never_imports_the_simulation_command():
    """The deployment tools share code with the simulation harness, never its command line (``simulations/__main__``):
    followed through every fedseg module they import, directly or not."""
    seen: dict[str, Path] = {}
    todo = [str(p.relative_to(REPO).with_suffix("")).replace("/", ".") for p in (REPO / "deploy").rglob("*.py")]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or name in seen:
            continue
        seen[name] = path
        todo.extend(_imported_modules(path))
    assert "simulations.__main__" not in seen and "simulations" in {n.split(".")[0] for n in seen}
