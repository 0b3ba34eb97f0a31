"""Static checks of the container files: hardened Flower settings, pinned images, mounted data and state.

No container engine runs on CI machines, so the images are not built here; the
compose file is parsed with PyYAML (and checked by `docker compose config` when
a Compose plugin is installed).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from flwr.common.config import parse_config_args

from client.runtime.site_config import SiteConfig
from deploy.images import STORAGE_ENV, Podman, image_requirements
from deploy.processes import TASK_POLL_INTERVAL_S
from shared.protocol import NODE_CONFIG_KEYS

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
HARDENED_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def _flwr_version() -> str:
    pins = dict(line.split("==") for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    return pins["flwr[simulation]"]


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _flags(service: dict) -> dict[str, str]:
    flags = {}
    for item in service["command"]:
        key, _, value = item.partition("=")
        flags[key] = value
    return flags


def _mounts(service: dict) -> dict[str, str]:
    """container path -> 'source[:ro]'."""
    mounts = {}
    for volume in service["volumes"]:
        parts = volume.split(":")
        mounts[parts[1]] = parts[0] + (":ro" if parts[2:] == ["ro"] else "")
    return mounts


@pytest.mark.parametrize("dockerfile,image,entrypoint", [
    ("superlink.Dockerfile", "superlink", '["flower-superlink"]'),
    # Flower's own SuperNode main, run through the launcher that shortens its fixed waits
    ("supernode.Dockerfile", "supernode", '["python", "/app/deploy/supernode.py"]')])
def test_dockerfiles_build_on_the_pinned_official_flower_image(dockerfile, image, entrypoint):
    text = (DEPLOY / dockerfile).read_text()
    # the base is a build argument whose default is Flower's official image (deploy/images.py passes the
    # Debian-built equivalent where no registry is reachable)
    assert re.search(r"^FROM\s+\$\{BASE_IMAGE\}$", text, re.MULTILINE)
    base = re.search(r"^ARG\s+BASE_IMAGE=(\S+)", text, re.MULTILINE).group(1)
    assert base == f"flwr/{image}:{_flwr_version()}"
    assert f"ENTRYPOINT {entrypoint}" in text
    for key, value in HARDENED_ENV.items():
        assert re.search(rf"{key}={value}\b", text), f"{dockerfile} does not set {key}={value}"
    assert "pip install" in text and "allow-runtime-dependency-installation" not in text
    assert "/state" in text  # the state volume's mount point exists, owned by `app`
    for line in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), f"{dockerfile} copies {source}, which does not exist"


def test_compose_superlink_runs_with_tls_node_auth_and_a_persistent_database():
    service = _services()["superlink"]
    flags, mounts = _flags(service), _mounts(service)
    assert "--insecure" not in flags and "--enable-supernode-auth" in flags
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile"):
        assert flags[flag] in mounts and mounts[flags[flag]].endswith(":ro")
    assert str(Path(flags["--database"]).parent) in mounts
    assert "--disable-runtime-dependency-installation" in flags
    assert (DEPLOY / "compose" / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("hospital", ["hospital-a", "hospital-b"])
def test_compose_hospitals_verify_the_server_and_authenticate_with_their_own_key(hospital):
    service = _services()[hospital]
    flags, mounts = _flags(service), _mounts(service)
    assert "--insecure" not in flags and "--allow-runtime-dependency-installation" not in flags
    assert mounts[flags["--root-certificates"]] == "./certs/ca.crt:ro"
    key_dir = str(Path(flags["--auth-supernode-private-key"]).parent)
    assert mounts[key_dir] == f"./keys/{hospital}:ro"
    node_config = dict(re.findall(r"([\w-]+)='([^']*)'", flags["--node-config"]))
    assert node_config["site-id"] == hospital
    # what Flower parses from the flag is what a site reads (shared/protocol.py's schema, nothing else)
    parsed = parse_config_args([flags["--node-config"]])
    assert set(parsed) <= set(NODE_CONFIG_KEYS) and SiteConfig.from_node_config(parsed).site_id == hospital
    assert mounts[str(Path(node_config["datalist"]).parent)].endswith(":ro")  # data is read-only
    assert not mounts[node_config["state-dir"]].endswith(":ro")  # the state (privacy ledger) persists
    assert "certs/server.key" not in " ".join(service["volumes"])  # server secrets stay on the server


def test_compose_services_all_run_hardened():
    services = _services()
    assert set(services) == {"superlink", "hospital-a", "hospital-b", "hospital-a-clientapps", "hospital-b-clientapps"}
    for name, service in services.items():
        for key, value in HARDENED_ENV.items():
            assert service["environment"][key] == value, f"{name}: {key}"
        # read-only root filesystem; Flower's FABs and Python's temporary files in memory
        assert service["read_only"] is True and set(service["tmpfs"]) == {"/tmp", "/app/.flwr"}, name
    keys = {_mounts(s)["/keys"] for n, s in services.items() if n in ("hospital-a", "hospital-b")}
    assert len(keys) == 2  # no two hospitals share a key


@pytest.mark.parametrize("hospital", ["hospital-a", "hospital-b"])
def test_compose_hospitals_run_their_clientapps_in_a_warm_executor_beside_the_node(hospital):
    services = _services()
    node, executor = services[hospital], services[f"{hospital}-clientapps"]
    assert _flags(node)["--isolation"] == "process"
    assert executor["network_mode"] == f"service:{hospital}"  # the node's Runtime API stays on its loopback
    assert executor["entrypoint"][-1] == "/app/deploy/clientapp_executor.py"
    assert "deploy/clientapp_executor.py" in (DEPLOY / "supernode.Dockerfile").read_text()
    assert _flags(executor)["--runtime-api-address"].startswith("127.0.0.1:")
    assert "--host" not in _flags(node)  # Flower's default: the Runtime API listens on 127.0.0.1 only
    node_mounts, executor_mounts = _mounts(node), _mounts(executor)
    assert "/keys" not in executor_mounts  # the node's private key is mounted into the node only
    for path in ("/data", "/state"):  # the ClientApps read the site's data and write its ledger
        assert executor_mounts[path] == node_mounts[path]
    # as deploy.run_federation's processes: the executor's task poll, and one training thread per hospital
    # sharing the host unless FEDSEG_NODE_THREADS says otherwise (unset, torch took every core in each
    # hospital and a train message took the ClientApp ~3x longer)
    assert executor["environment"]["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == TASK_POLL_INTERVAL_S
    assert executor["environment"]["OMP_NUM_THREADS"] == "${FEDSEG_NODE_THREADS:-1}"


def test_images_install_the_runtime_requirements_only():
    """deploy/images.py's wheelhouse and the Dockerfiles' own filter agree, and leave out tests' packages."""
    def names(lines):
        return {re.split(r"[=<>\[ ]", line.split("#")[0].strip())[0].lower() for line in lines
                if line.split("#")[0].strip()}

    wanted = names(image_requirements(torch_spec="torch==2.13.0+cpu"))
    assert {"torch", "flwr", "monai", "opacus", "cryptography"} <= wanted
    assert not wanted & {"pytest", "httpx", "selenium", "podman-compose", "matplotlib", "tensorboard"}
    for dockerfile in ("superlink.Dockerfile", "supernode.Dockerfile"):
        command = re.search(r"^RUN (grep .*?) /app/requirements.txt", (DEPLOY / dockerfile).read_text(), re.MULTILINE)
        result = subprocess.run([*shlex.split(command.group(1)), str(REPO / "requirements.txt")],
                                capture_output=True, text=True, check=True)
        assert names(result.stdout.splitlines()) == wanted - {"torch", "flwr"}, dockerfile  # both from elsewhere


def test_podman_can_keep_its_images_under_a_folder_of_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    podman = Podman.configured(conf_dir=tmp_path / "engine", storage_root=tmp_path / "store")
    storage = podman.env["CONTAINERS_STORAGE_CONF"]
    assert f'graphroot = "{tmp_path / "store" / "graph"}"' in Path(storage).read_text()
    assert "CONTAINERS_STORAGE_CONF" not in Podman.configured(conf_dir=tmp_path / "engine").env


@pytest.mark.skipif(subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0
                    if shutil.which("docker") else True, reason="no Docker Compose plugin on this machine")
def test_docker_compose_accepts_the_file():
    result = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
