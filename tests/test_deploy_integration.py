"""The federation as real processes on loopback: TLS, node authentication, and who gets refused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from client.commands.keygen import make_node_keys
from deploy.processes import DeploymentError, LocalSuperLink, NodeSettings, ServerCredentials
from deploy.run_federation import DeploymentSpec, run_local_federation
from server.certs import make_certificates
from shared.model_file import load_model
from tests.conftest import TINY_RUN_CONFIG, live_processes_mentioning

REFUSAL_TIMEOUT_S = 60.0


@pytest.mark.integration
@pytest.mark.parametrize("overlap", [False, True], ids=["sequential-secure-aggregation", "overlapped-evaluation"])
def test_two_hospitals_two_rounds_over_tls_with_node_auth(tmp_path, overlap):
    # overlapped: round 1's evaluation and round 2's training reach each node together;
    # sequential: every training round is secure aggregation (which cannot overlap)
    spec = DeploymentSpec(out=tmp_path / "deploy", sites=2, rounds=2, seed=1, min_cases=3, max_cases=4,
                          isolation="process",  # the warm ClientApp executor; subprocess is Flower's default
                          run_config=dict(TINY_RUN_CONFIG, **{"num-rounds": 2, "overlap-evaluation": overlap,
                                                              "secure-aggregation": not overlap}),
                          timeout_s=900)
    summary = run_local_federation(spec, echo=False)

    work_dir = next((tmp_path / "deploy").iterdir())
    assert summary["rounds"] == 2 and summary["sites"] == ["hospital-01", "hospital-02"]
    rows = [json.loads(line) for line in (work_dir / "run" / "metrics.jsonl").read_text().splitlines()]
    site_rows = [r for r in rows if r["site"] != "global"]
    assert {(r["round"], r["site"]) for r in site_rows} == {(n, s) for n in (1, 2) for s in summary["sites"]}
    assert all(r["train-status"] == "ok" and r["evaluate-status"] == "ok" for r in site_rows)
    _, payload = load_model(work_dir / "run" / "global_model.pt")
    assert payload["round"] == 2 and payload["model_config"]["channels"] == [4, 8]
    assert (work_dir / "superlink-state.db").stat().st_size > 0
    server_steps = [line for line in (work_dir / "logs" / "flwr-run.log").read_text().splitlines()
                    if "configure_train" in line or "aggregate_evaluate" in line]
    training_2_out_before_evaluation_1_in = "configure_train" in server_steps[1]
    assert training_2_out_before_evaluation_1_in == overlap, server_steps
    superlink_log = (work_dir / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink_log  # the SuperLink served TLS only
    for site in summary["sites"]:  # each node ran Flower's SuperNode with the shortened waits
        assert "fedseg: SuperNode polls every 0.25 s" in (work_dir / "logs" / f"supernode-{site}.log").read_text()
    for site in summary["sites"]:
        assert (work_dir / "nodes" / site / "keys" / "supernode_key").stat().st_mode & 0o077 == 0
        audit = [json.loads(line) for line in (work_dir / "nodes" / site / "state" / "egress-audit.jsonl").open()]
        stages = [e.get("secagg-stage") for e in audit if e["message-type"] == "train"]
        assert stages == (["setup", "share_keys", "collect_masked_vectors", "unmask"] * 2 if not overlap
                          else [None, None])
        assert all(e["array-bytes"] == 0 for e in audit if e["message-type"] == "train") != overlap
    time.sleep(1.0)
    assert live_processes_mentioning(str(work_dir)) == []


@pytest.fixture(scope="module")
def secured_superlink(tmp_path_factory):
    """A SuperLink with TLS and node auth, one registered node key, and an unregistered one."""
    work_dir = tmp_path_factory.mktemp("superlink")
    certs = make_certificates(out=work_dir / "certs", hosts=["127.0.0.1"])
    registered = make_node_keys(out=work_dir / "registered")
    unregistered = make_node_keys(out=work_dir / "unregistered")
    with LocalSuperLink(work_dir, credentials=ServerCredentials(certs.ca_cert, certs.server_cert,
                                                                 certs.server_key)) as link:
        link.register_node(registered.public_key, name="registered")
        yield link, certs.ca_cert, registered.private_key, unregistered.private_key
    assert live_processes_mentioning(str(work_dir)) == []


def _node(link: LocalSuperLink, name: str, datalist: Path, **options) -> NodeSettings:
    return NodeSettings(site_id=name, datalist=datalist, state_dir=link.work_dir / name, max_retries=1, **options)


def _exit_code_and_log(link: LocalSuperLink, node: NodeSettings) -> tuple[int | None, str]:
    process = link.start_supernode(node)
    deadline = time.monotonic() + REFUSAL_TIMEOUT_S
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return process.poll(), link.log_path(f"supernode-{node.site_id}").read_text()


@pytest.mark.integration
def test_a_node_with_an_unregistered_key_is_refused(secured_superlink, two_sites):
    link, ca_cert, _, unregistered_key = secured_superlink
    code, log = _exit_code_and_log(link, _node(link, "stranger", two_sites[0], private_key=unregistered_key,
                                                root_certificates=ca_cert))
    assert code not in (None, 0)
    assert "Failed to activate SuperNode" in log


@pytest.mark.integration
def test_a_node_without_the_consortium_ca_cannot_connect(secured_superlink, two_sites):
    link, _, registered_key, _ = secured_superlink
    code, log = _exit_code_and_log(link, _node(link, "no-ca", two_sites[0], private_key=registered_key,
                                                root_certificates=None))
    assert code not in (None, 0)
    assert "CERTIFICATE_VERIFY_FAILED" in log


@pytest.mark.integration
def test_plain_text_clients_cannot_connect(secured_superlink, two_sites):
    link, _, _, _ = secured_superlink
    code, log = _exit_code_and_log(link, _node(link, "plain", two_sites[0], private_key=None,
                                                root_certificates=None, insecure=True))
    assert code not in (None, 0)
    assert "SuperNode ID" not in log
    # the operator's CLI in plain text is refused as well
    config = link.flwr_home / "config.toml"
    config.write_text(config.read_text() + f'\n[superlink.plain]\naddress = "{link.address}"\ninsecure = true\n')
    with pytest.raises(DeploymentError, match="supernode list"):
        link.flwr(["supernode", "list", "plain"], timeout_s=60)


@pytest.mark.integration
def test_the_registered_node_is_accepted(secured_superlink, two_sites):
    link, ca_cert, registered_key, _ = secured_superlink
    process = link.start_supernode(_node(link, "member", two_sites[0], private_key=registered_key,
                                         root_certificates=ca_cert))
    deadline = time.monotonic() + REFUSAL_TIMEOUT_S
    while "SuperNode ID" not in link.log_path("supernode-member").read_text() and time.monotonic() < deadline:
        assert process.poll() is None, link.log_path("supernode-member").read_text()
        time.sleep(0.2)
    listed = json.loads(link.flwr(["supernode", "list", "--format", "json"]))
    assert any(node["status"] == "online" for node in listed["nodes"])


def test_plain_text_needs_an_explicit_flag(tmp_path):
    with pytest.raises(DeploymentError, match="insecure=True"):
        LocalSuperLink(tmp_path, credentials=None)


def test_deployment_spec_names_bad_options(tmp_path):
    from shared.errors import ConfigError

    with pytest.raises(ConfigError, match="'isolation'"):
        DeploymentSpec(out=tmp_path, isolation="thread")
    with pytest.raises(ConfigError, match="no such file"):
        DeploymentSpec(out=tmp_path, datalists=(tmp_path / "missing.json",))
    with pytest.raises(ConfigError, match="'poll_interval_s'"):
        DeploymentSpec(out=tmp_path, poll_interval_s=0.0)
    with pytest.raises(ConfigError, match="'node_threads'"):
        DeploymentSpec(out=tmp_path, node_threads=0)


@pytest.mark.integration
@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_a_stopped_deployment_runner_stops_every_process_of_the_federation(tmp_path, signal_name):
    import signal
    import subprocess
    import sys

    signum = getattr(signal, signal_name)
    out = tmp_path / "deploy"
    command = [sys.executable, "-m", "deploy.run_federation", "--sites", "2", "--rounds", "50", "--out", str(out),
               "--isolation", "process", "--run-config", 'model="unet"', "--run-config", 'channels="4,8"',
               "--run-config", 'strides="2"',
               "--run-config", "batch-size=2", "--run-config", "dp=false", "--run-config", "local-steps=2"]
    runner = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        for line in runner.stdout:
            if "round 1/50" in line:
                break
        assert live_processes_mentioning(str(out))
        runner.send_signal(signum)
        assert runner.wait(timeout=120) == 128 + signum
        rest = runner.stdout.read()
        assert "Traceback" not in rest
        assert ("interrupted: the federation's processes were stopped" in rest) == (signum == signal.SIGINT)
        deadline = time.monotonic() + 30
        while live_processes_mentioning(str(out)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert live_processes_mentioning(str(out)) == []
    finally:
        runner.kill()
        runner.wait()
