"""The hospital and server images, built and run for real: Podman, the compose file as shipped, one federation.

Builds the Debian base (kept between runs: it changes only with Debian), Flower's layout on it and both
fedseg images from the shipped Dockerfiles, then runs ``deploy/compose/compose.yaml`` (TLS, node
authentication, warm ClientApp executors, read-only root filesystems) for two rounds with DP on, and takes
it down. Podman, runc and mmdebstrap are installed when missing (root with apt-get, as on CI, whose
``.ci/run`` installs them too); where no engine can run the tests are skipped with the reason, and under
CI (``CI`` set) they fail instead. Containers, volumes and networks are removed afterwards; the images
are kept between runs on one machine (the issue asks for cached builds): the Debian base and Flower-layout
images, the fedseg images (a later build reuses their dependency layer and rebuilds only fedseg's code)
and the wheelhouse (``~/.cache/fedseg/image-wheels``), which change only with Debian or requirements.txt.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from client.commands.audit import summarise_audit_log
from client.training.privacy_ledger import PrivacyLedger
from deploy.compose_federation import HOSPITALS, run_compose_federation
from deploy.images import (
    IMAGES,
    Podman,
    build_debian_image,
    build_images,
    build_wheelhouse,
    engine_problem,
    image_size_mb,
    private_keys_in_layers,
    wheel_cache_dir,
)
from shared.config import DEFAULT_DP_DELTA
from tests.conftest import TINY_RUN_CONFIG

pytestmark = pytest.mark.containers
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0+cpu")
# third-party packages ship test keys of their own (not fedseg's secrets)
THIRD_PARTY = ("/python/venv/lib/", "/usr/lib/", "/usr/share/")


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    problem = engine_problem(install=True)
    if problem:
        reason = f"no container engine can run here: {problem}"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("images")
    engine = Podman.configured(conf_dir=work / "engine")
    start = time.monotonic()
    timings = {"debian base": build_debian_image(engine, work=work / "debian"),
               "wheelhouse": build_wheelhouse(wheel_cache_dir(), torch_spec=TORCH_SPEC)}
    timings.update(build_images(engine, wheels=wheel_cache_dir(), torch_spec=TORCH_SPEC))
    print(f"\n[fedseg] image builds in {time.monotonic() - start:.0f} s: "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items()))
    return engine


def test_images_run_as_the_app_user_and_hold_no_private_key(podman):
    for name, tag in IMAGES.items():
        config = json.loads(podman.run(["image", "inspect", tag]))[0]["Config"]
        assert config["User"] == "app"
        assert {"FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1"} <= set(config["Env"])
        assert private_keys_in_layers(podman, tag, ignore=THIRD_PARTY) == [], name
        history = podman.run(["history", "--no-trunc", "--format", "{{.CreatedBy}}", tag])
        assert "PRIVATE KEY" not in history and "supernode_key" not in history
        print(f"\n[fedseg] {tag}: {image_size_mb(podman, tag):.0f} MB")


def test_private_key_scan_finds_a_key_in_a_layer(podman, tmp_path):
    """The scan above can fail: an image with a key in one layer, deleted in the next, is caught."""
    (tmp_path / "Dockerfile").write_text(
        f"FROM {IMAGES['superlink']}\nCOPY supernode_key /app/supernode_key\nRUN rm /app/supernode_key\n")
    (tmp_path / "supernode_key").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nnot a real key\n")
    tag = "localhost/fedseg/key-scan-probe:test"
    podman.run(["build", "-q", "-t", tag, str(tmp_path)])
    try:
        found = private_keys_in_layers(podman, tag, ignore=THIRD_PARTY)
    finally:
        podman.run(["rmi", "--force", tag], check=False)
    assert [f for f in found if f.startswith("/app/supernode_key")]


def test_compose_file_runs_a_federation_with_tls_node_auth_and_dp(podman, tmp_path):
    config = {k: v for k, v in TINY_RUN_CONFIG.items() if k not in ("num-rounds", "dp")}  # DP on: a ledger
    result = run_compose_federation(tmp_path / "compose", podman, rounds=2, run_config=config)
    print(f"\n[fedseg] compose federation: {result.seconds:.0f} s")
    assert result.leftovers == []  # every container, volume and network is gone
    assert result.summary["rounds"] == 2
    for name in ("metrics.jsonl", "global_model.pt", "summary.json"):
        assert (result.run_dir / name).is_file(), name
    sites = {json.loads(line)["site"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()}
    assert set(HOSPITALS) <= sites
    assert len(result.containers) == 5
    for name, check in result.containers.items():
        assert check == {"uid": "49999", "root_fs": "read-only"}, name
    for hospital, state_dir in result.state_dirs.items():
        audit = summarise_audit_log(path=state_dir / "egress-audit.jsonl")
        (run,) = audit.runs.values()
        assert run.rounds_trained == [1, 2] and run.blocked == 0 and run.array_bytes > 0, hospital
        ledger = PrivacyLedger(state_dir, delta=DEFAULT_DP_DELTA).entries()
        assert [e.server_round for e in ledger] == [1, 2] and ledger[-1].epsilon_after > 0, hospital
