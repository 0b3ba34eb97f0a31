"""One way to start a SuperLink and check its health, shared by the harness and the deployment."""

from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

import pytest

from shared import superlink
from shared.processes import flower_env, free_port, stop_process_group
from shared.superlink import HOST, ServerCredentials, SuperLinkError, superlink_command, wait_healthy

REPO = Path(__file__).resolve().parent.parent


def test_the_command_is_tls_with_node_auth_or_explicitly_insecure(tmp_path):
    tls = superlink_command(port=9, credentials=ServerCredentials(tmp_path / "ca", tmp_path / "crt", tmp_path / "key"),
                            database=tmp_path / "state.db")
    assert "--insecure" not in tls and "--enable-supernode-auth" in tls and "--simulation" not in tls
    assert tls[tls.index("--ssl-keyfile") + 1] == str(tmp_path / "key")
    assert tls[tls.index("--database") + 1] == str(tmp_path / "state.db")
    simulation = superlink_command(port=9, credentials=None, simulation=True)
    assert "--insecure" in simulation and "--simulation" in simulation and "--database" not in simulation
    assert simulation[simulation.index("--host") + 1] == HOST  # loopback only


def test_a_superlink_starts_answers_and_a_dead_one_is_reported_at_once(tmp_path):
    env = flower_env(tmp_path / "flwr-home")
    port = free_port()
    process = superlink.spawn_logged(superlink_command(port=port, credentials=None, database=tmp_path / "db"), env=env,
                           log_path=tmp_path / "superlink.log", cwd=tmp_path)
    try:
        wait_healthy(f"{HOST}:{port}", ca_cert=None, failure=superlink.exited(process))
        superlink.write_connection(tmp_path / "flwr-home", name="here", address=f"{HOST}:{port}", ca_cert=None)
        assert 'address = "127.0.0.1:' in (tmp_path / "flwr-home" / "config.toml").read_text()
    finally:
        stop_process_group(process, grace_s=10.0)
    dead = superlink.spawn_logged([sys.executable, "-c", "raise SystemExit(3)"], env=env, log_path=tmp_path / "dead.log")
    started = time.monotonic()
    with pytest.raises(SuperLinkError, match="exited with code 3"):
        wait_healthy(f"{HOST}:{free_port()}", ca_cert=None, failure=superlink.exited(dead), timeout_s=30)
    assert time.monotonic() - started < 10


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}


def test_the_deployment_does_not_import_the_harness_command_line():
    found = {str(path.relative_to(REPO)) for path in (REPO / "deploy").rglob("*.py")
             if "simulations.__main__" in _imports(path)}
    assert found == set()


def test_only_shared_superlink_starts_a_superlink_or_asks_its_health():
    found = []
    for package in ("client", "server", "simulations", "deploy", "shared"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            if path != REPO / "shared" / "superlink.py" and ('"flower-superlink"' in text or '/health"' in text):
                found.append(str(path.relative_to(REPO)))
    assert found == []
