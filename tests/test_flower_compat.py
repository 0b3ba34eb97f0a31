"""shared/flower_compat: the registry matches the installed Flower, nothing else replaces Flower internals,
and with the gate failing every process kind runs stock Flower with one warning (real runs).

This file backs the README's "Upgrading Flower" checklist.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from shared.flower_compat import gate
from shared.flower_compat.checked import CHECKED_SOURCES
from shared.flower_compat.registry import REGISTRY, entries_of
from tests.conftest import TINY_RUN_CONFIG

REPO = Path(__file__).resolve().parent.parent
COMPAT = REPO / "shared" / "flower_compat"
SCANNED = ("server", "client", "shared", "simulations", "deploy", "benchmarks")
CHANGED_FLOWER = Path(__file__).resolve().parent / "changed_flower"  # its sitecustomize alters flwr sources


def test_the_pinned_flower_is_a_checked_version_and_every_guard_passes_on_it():
    pins = (REPO / "requirements.txt").read_text()
    assert f"flwr[simulation]=={gate.PATCHED_FLWR_VERSION}\n" in pins and gate.PATCHED_FLWR_VERSION in CHECKED_SOURCES
    assert gate.installed_flwr_version() in CHECKED_SOURCES
    for process in gate.PROCESSES:
        assert gate.mismatch(entries_of(process)) is None, process


def test_the_node_scripts_load_this_package_under_its_private_name():
    from deploy import flower_patches
    from shared.flower_compat import PRIVATE_NAME

    assert flower_patches.PRIVATE_NAME == PRIVATE_NAME and flower_patches.PACKAGE_DIR == COMPAT
    assert flower_patches.compat("gate").__name__ == f"{PRIVATE_NAME}.gate"


def test_every_replacement_is_declared_with_its_guard_reason_and_target():
    assert len({entry.name for entry in REGISTRY}) == len(REGISTRY) == 13
    assert {entry.process for entry in REGISTRY} == set(gate.PROCESSES)
    relied_on = {path for entry in REGISTRY for path in entry.relies_on}
    for version, hashes in CHECKED_SOURCES.items():
        assert set(hashes) == relied_on, version  # every version checked covers exactly what is relied on
    for entry in REGISTRY:
        assert entry.kind in ("replace", "wrap", "add", "default") and entry.relies_on and len(entry.reason) > 40
        owner, attribute = gate.split_target(entry.target)
        assert hasattr(gate.resolve(owner), attribute) == (entry.kind != "add"), entry.name
        if entry.kind == "default":
            assert gate.DEFAULT_KWARG in gate.resolve(entry.target).__kwdefaults__


def test_a_refused_process_changes_nothing_and_says_so_once(monkeypatch, caplog):
    from flwr.supercore.inflatable import inflatable_utils

    from shared.flower_compat.nodes import install_serverapp

    before = dict(inflatable_utils.pull_objects.__kwdefaults__)
    monkeypatch.setattr(gate, "installed_flwr_version", lambda: "1.99.0")
    assert not install_serverapp(in_process=False, first_retry_s=0.01)
    assert inflatable_utils.pull_objects.__kwdefaults__ == before
    warnings = [r.getMessage() for r in caplog.records if gate.WARNING_PREFIX in r.getMessage()]
    expected = (f"{gate.WARNING_PREFIX} serverapp runs stock Flower (slower; none of its replacements made): "
                f"flwr 1.99.0 is installed; fedseg checked flwr {', '.join(sorted(CHECKED_SOURCES))}. "
                "See shared/flower_compat/registry.py and README 'Upgrading Flower'.")
    assert warnings == [expected]


def test_the_grid_extras_are_seen_as_they_are_added_and_taken_away():
    from flwr.superlink.grid import InMemoryGrid

    from shared.flower_compat import engine
    from shared.flower_compat.grid import OrdersForSampling, WaitsForReplies, offers

    grid = object.__new__(InMemoryGrid)
    assert not offers(grid, WaitsForReplies) and not offers(grid, OrdersForSampling)
    assert engine.install()
    try:
        assert offers(grid, WaitsForReplies) and offers(grid, OrdersForSampling)
    finally:
        gate.restore("simulation-engine")
    assert not offers(grid, WaitsForReplies) and not offers(grid, OrdersForSampling)


# -- grep: Flower internals are replaced only inside shared/flower_compat --------------------------------------


def flower_replacements(source: str) -> list[str]:
    """Lines of ``source`` that assign to, delete or setattr on a name bound to a Flower module or object."""
    tree = ast.parse(source)
    flower_names = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.Import) for alias in node.names if alias.name.startswith("flwr")}
    flower_names |= {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     and (node.module or "").startswith("flwr") for alias in node.names}

    def rooted_in_flower(node: ast.AST) -> bool:
        while isinstance(node, ast.Attribute | ast.Subscript):
            node = node.value
        return isinstance(node, ast.Name) and node.id in flower_names

    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        targets: list[ast.AST] = []
        if isinstance(node, ast.Assign | ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            targets = [ast.Attribute(value=node.args[0], attr="?")] if node.args else []
        hits = [t for t in targets if isinstance(t, ast.Attribute | ast.Subscript) and rooted_in_flower(t)]
        if hits or (isinstance(node, ast.Attribute) and node.attr == "__kwdefaults__"):
            found.append((node.lineno, f"line {node.lineno}: {ast.unparse(node)[:80]}"))
    return [text for _, text in sorted(found)]


def test_the_grep_finds_a_replacement_when_there_is_one():
    sample = ("from flwr.supernode import start_client_internal as loop\nimport flwr.supercore.superexec\n"
              "def f():\n    from flwr.superlink.grid import InMemoryGrid\n    InMemoryGrid.x = 1\n"
              "loop.time = None\nsetattr(flwr.supercore.superexec, 'y', 2)\nf.__kwdefaults__['a'] = 1\n"
              "other.time = 3\n")
    assert [hit.split(":")[0] for hit in flower_replacements(sample)] == ["line 5", "line 6", "line 7", "line 8"]


def _run_output(path: Path) -> bool:
    """A copy of the app inside a run's output (a benchmark's run folder, a FAB unpacked in its flwr-home)."""
    return any(part in ("out", "runs", "flwr-home") or part.startswith(".") for part in path.parts[:-1])


def test_flower_internals_are_replaced_only_inside_the_compatibility_package():
    offenders = {}
    for folder in SCANNED:
        for path in sorted((REPO / folder).rglob("*.py")):
            if COMPAT not in path.parents and not _run_output(path.relative_to(REPO)):
                hits = flower_replacements(path.read_text())
                if hits:
                    offenders[str(path.relative_to(REPO))] = hits
    assert offenders == {}


# -- the gate failing in real processes: stock Flower, one warning each, a completed run ------------------------


def one_warning(log: Path, process: str) -> str:
    """The one gate warning in ``log``, which must be ``process``'s and name the changed code.

    Counted by text: the warm executor's preloaded libraries give Flower's logger a second handler, so
    each of its log records appears twice in that log (Flower's own lines too).
    """
    lines = log.read_text(errors="replace").splitlines()
    warnings = sorted({line[line.index(gate.WARNING_PREFIX):] for line in lines if gate.WARNING_PREFIX in line})
    assert len(warnings) == 1, (log.name, warnings)
    assert f"{process} runs stock Flower" in warnings[0] and "is not the code fedseg checked" in warnings[0]
    return warnings[0]


@pytest.mark.integration
def test_a_changed_flower_runs_the_simulation_engine_stock_with_one_warning(tmp_path, monkeypatch):
    from shared.flower_compat.engine import ANNOUNCEMENT
    from simulations.api import SimulationSpec, run_simulation

    monkeypatch.setenv("PYTHONPATH", str(CHANGED_FLOWER))
    spec = SimulationSpec(sites=2, rounds=1, seed=1, out=tmp_path / "runs", min_cases=3, max_cases=3,
                          timeout_s=600, run_config=dict(TINY_RUN_CONFIG))
    summary = run_simulation(spec, echo=False)

    assert summary["rounds"] == 1 and 0.0 <= summary["final_dice"] <= 1.0
    engine_log = (tmp_path / "runs" / "latest" / "flower.log")
    assert "vce_api:add_messages_to_queue" in one_warning(engine_log, "simulation-engine")
    assert ANNOUNCEMENT not in engine_log.read_text()  # Flower's own sweep delivered the messages


@pytest.mark.integration
def test_a_changed_flower_runs_the_deployment_stock_with_one_warning_per_process(tmp_path, monkeypatch):
    from deploy.run_federation import DeploymentSpec, run_local_federation

    monkeypatch.setenv("PYTHONPATH", str(CHANGED_FLOWER))
    spec = DeploymentSpec(out=tmp_path / "deploy", sites=1, rounds=1, seed=1, min_cases=3, max_cases=3,
                          isolation="process", insecure=True, run_config=dict(TINY_RUN_CONFIG), timeout_s=600)
    summary = run_local_federation(spec, echo=False)

    assert summary["rounds"] == 1 and summary["sites"] == ["hospital-01"]
    logs = next((tmp_path / "deploy").iterdir()) / "logs"
    assert "start_client_internal" in one_warning(logs / "supernode-hospital-01.log", "supernode")
    assert "get_executor" in one_warning(logs / "clientapp-executor-hospital-01.log", "clientapp-executor")
    assert "pull_objects" in one_warning(logs / "flwr-run.log", "serverapp")
    assert not re.search(r"fedseg: (SuperNode polls|warm ClientApp executor)", "".join(
        path.read_text(errors="replace") for path in logs.glob("*.log")))
    rows = [json.loads(line) for line in (logs.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["round"], r["site"]) for r in rows if r["site"] != "global"} == {(1, "hospital-01")}
