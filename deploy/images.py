"""Build fedseg's images with Podman on a machine that reaches no image registry, and inspect them.

``python -m deploy.images build`` (as root, Debian):

1. a Debian root filesystem from the Debian archive (``mmdebstrap --variant=minbase``), imported as
   :data:`DEBIAN_IMAGE` (kept between builds: it only changes with Debian);
2. a wheelhouse of every pinned Python package (``pip wheel``, through this machine's pip
   configuration: its indexes, find-links and cache), mounted read-only into the builds, so no build
   step needs a network;
3. :data:`BASE_IMAGE` from ``deploy/base/flwr-base.Dockerfile`` (Flower's official layout), then
   the SuperLink and SuperNode images from fedseg's own Dockerfiles with ``BASE_IMAGE`` set to it.

Podman runs with :data:`CONTAINERS_CONF` (its own file, through ``CONTAINERS_CONF``): ``runc``
(Debian's ``crun`` refuses hosts with cgroups in hybrid mode), ulimits below the usual hard limits
of small VMs, cgroupfs and file events (no systemd needed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import FedSegError

REPO = Path(__file__).resolve().parent.parent
FLWR_VERSION = "1.42.0"
DEBIAN_IMAGE = "localhost/fedseg/debian:bookworm"
BASE_IMAGE = f"localhost/fedseg/flwr-base:{FLWR_VERSION}"
IMAGES = {"superlink": "localhost/fedseg/superlink:0.1.0", "supernode": "localhost/fedseg/supernode:0.1.0"}
DEBIAN_PACKAGES = ("podman", "runc", "mmdebstrap")
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
# requirements.txt's mark on what only tests and the research harness use (never in an image)
NOT_IN_IMAGES = "# not in images"
# a Podman storage root of its own (graph and run directories) instead of the machine's, e.g. to time a build
# from nothing without removing the images kept there
STORAGE_ENV = "FEDSEG_PODMAN_STORAGE"


class ImageError(FedSegError):
    """A container engine or image build step failed; the message names the step and its output."""


@dataclass(frozen=True)
class Podman:
    """The ``podman`` command with fedseg's engine settings (:data:`CONTAINERS_CONF`)."""

    conf: Path
    storage_conf: Path | None = None  # None: the machine's image storage

    @classmethod
    def configured(cls, *, conf_dir: Path, storage_root: Path | None = None) -> Podman:
        """Write :data:`CONTAINERS_CONF` into ``conf_dir`` and return a Podman that uses it.

        ``storage_root`` (default ``$FEDSEG_PODMAN_STORAGE``, else the machine's storage): keep images,
        containers and volumes under this folder instead.
        """
        conf_dir = conf_dir.resolve()  # podman-compose runs podman from the compose file's folder
        conf_dir.mkdir(parents=True, exist_ok=True)
        conf = conf_dir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        root = storage_root or (Path(os.environ[STORAGE_ENV]) if os.environ.get(STORAGE_ENV) else None)
        if root is None:
            return cls(conf=conf)
        root = root.resolve()
        storage_conf = conf_dir / "storage.conf"
        storage_conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{root / "graph"}"\n'
                                f'runroot = "{root / "run"}"\n')
        return cls(conf=conf, storage_conf=storage_conf)

    @property
    def env(self) -> dict[str, str]:
        """The environment for podman and podman-compose."""
        storage = {} if self.storage_conf is None else {"CONTAINERS_STORAGE_CONF": str(self.storage_conf)}
        return {**os.environ, "CONTAINERS_CONF": str(self.conf), **storage}

    def run(self, args: list[str], *, timeout_s: float = 900.0, check: bool = True) -> str:
        """Run ``podman ARGS``; return its standard output; raise :class:`ImageError` on failure."""
        result = subprocess.run(["podman", *args], check=False, env=self.env, capture_output=True, text=True,
                                timeout=timeout_s)
        if check and result.returncode != 0:
            raise ImageError(f"`podman {' '.join(args[:3])} ...` failed ({result.returncode}):\n"
                             f"{result.stdout[-1500:]}{result.stderr[-3000:]}")
        return result.stdout

    def exists(self, image: str) -> bool:
        """Whether ``image`` is in local storage."""
        return subprocess.run(["podman", "image", "exists", image], env=self.env, check=False).returncode == 0


def engine_problem(*, install: bool) -> str | None:
    """Why no container engine can build and run fedseg's images here, or None when one can.

    With ``install``, missing Debian packages (:data:`DEBIAN_PACKAGES`) are installed first when this
    process is root and has apt-get.
    """
    missing = [p for p in ("podman", "runc", "mmdebstrap") if shutil.which(p) is None
               and not Path(f"/usr/sbin/{p}").exists()]
    if missing and install and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES], check=False, env=env,
                       capture_output=True)
        missing = [p for p in missing if shutil.which(p) is None and not Path(f"/usr/sbin/{p}").exists()]
    if missing:
        return (f"{', '.join(missing)} missing and not installable here (as root on Debian: "
                f"apt-get install {' '.join(DEBIAN_PACKAGES)})")
    if os.geteuid() != 0:
        return "not root: the test runs rootful Podman (runc, cgroupfs); rootless Podman is not set up for it"
    if importlib.util.find_spec("podman_compose") is None:
        return "podman-compose missing in this Python (pip install -r requirements.txt)"
    return None


def build_debian_image(podman: Podman, *, work: Path) -> float:
    """:data:`DEBIAN_IMAGE` from the Debian archive unless it exists; returns the seconds it took."""
    if podman.exists(DEBIAN_IMAGE):
        return 0.0
    start = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    rootfs = work / "rootfs.tar"
    _run(["mmdebstrap", "--quiet", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
          "bookworm", str(rootfs)], step="mmdebstrap")
    podman.run(["import", "--change", 'CMD ["/bin/bash"]', str(rootfs), DEBIAN_IMAGE])
    rootfs.unlink()
    return time.monotonic() - start


def build_wheelhouse(out: Path, *, torch_spec: str) -> float:
    """Every package the images install, as wheels in ``out`` (this machine's pip settings and cache).

    Skipped when ``out`` already holds the wheels of the same requirements (its ``requirements.txt``).
    Returns the seconds it took.
    """
    requirements = image_requirements(torch_spec=torch_spec)
    stamp = out / "requirements.txt"
    if stamp.is_file() and stamp.read_text().split() == requirements:
        return 0.0
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "-w", str(out),
          *requirements], step="pip wheel")
    stamp.write_text("\n".join(requirements) + "\n")  # only once every wheel is there
    return time.monotonic() - start


def image_requirements(*, torch_spec: str) -> list[str]:
    """What the images install: ``torch_spec``, then requirements.txt without its :data:`NOT_IN_IMAGES` lines.

    flwr without the simulation extra (Ray): the images run deployments only.
    """
    lines = (REPO / "requirements.txt").read_text().splitlines()
    return [torch_spec, *(line.split("#")[0].strip().replace("flwr[simulation]", "flwr") for line in lines
                          if line.split("#")[0].strip() and NOT_IN_IMAGES not in line)]


def wheel_cache_dir() -> Path:
    """Where the tests keep the wheelhouse between runs (``$XDG_CACHE_HOME/fedseg/image-wheels``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fedseg" / "image-wheels"


def build_images(podman: Podman, *, wheels: Path, torch_spec: str) -> dict[str, float]:
    """Build :data:`BASE_IMAGE` and :data:`IMAGES` with the wheelhouse ``wheels``; seconds per image."""
    offline = ["-v", f"{wheels.resolve()}:/wheels:ro", "--build-arg", "PIP_ARGS=--no-index --find-links /wheels"]
    timings = {}
    start = time.monotonic()
    podman.run(["build", "-q", "-f", str(REPO / "deploy/base/flwr-base.Dockerfile"), *offline,
                "--build-arg", f"DEBIAN_IMAGE={DEBIAN_IMAGE}", "--build-arg", f"FLWR_VERSION={FLWR_VERSION}",
                "-t", BASE_IMAGE, str(REPO / "deploy/base")], timeout_s=1800)
    timings["flwr-base"] = time.monotonic() - start
    for name, tag in IMAGES.items():
        start = time.monotonic()
        podman.run(["build", "-q", "-f", str(REPO / f"deploy/{name}.Dockerfile"), *offline,
                    "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--build-arg", f"TORCH_SPEC={torch_spec}",
                    "-t", tag, str(REPO)], timeout_s=1800)
        timings[name] = time.monotonic() - start
    return timings


def image_size_mb(podman: Podman, image: str) -> float:
    """The image's size on disk (all its layers), in MB."""
    return int(podman.run(["image", "inspect", "--format", "{{.Size}}", image]).strip()) / 1e6


def layer_dirs(podman: Podman, image: str) -> list[Path]:
    """Every layer's own files (overlay ``diff`` directories), lowest first."""
    data = json.loads(podman.run(["image", "inspect", image]))[0]["GraphDriver"]
    if data.get("Name") != "overlay":
        raise ImageError(f"{image}: layers can be listed on the overlay storage driver only, not {data.get('Name')}")
    lower = [Path(p) for p in data["Data"].get("LowerDir", "").split(":") if p]
    return [*reversed(lower), Path(data["Data"]["UpperDir"])]


def private_keys_in_layers(podman: Podman, image: str, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """Files holding a private key in any layer of ``image`` (also ones a later layer deletes).

    ``ignore``: path prefixes inside the image to skip (third-party packages' own test keys).
    """
    found = []
    for layer in layer_dirs(podman, image):
        for root, _, files in os.walk(layer):
            inside = "/" + os.path.relpath(root, layer).removeprefix(".").lstrip("/")
            if inside.startswith(ignore):
                continue
            for name in files:
                path = Path(root, name)
                if path.is_symlink() or not path.is_file() or path.stat().st_size > 1_000_000:
                    continue
                with open(path, "rb") as handle:
                    if b"PRIVATE KEY-----" in handle.read() or name in ("supernode_key", "server.key", "ca.key"):
                        found.append(f"{inside.rstrip('/')}/{name} (layer {layer.parent.name[:12]})")
    return found


def _run(command: list[str], *, step: str) -> None:
    result = subprocess.run(command, check=False, capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"{step} failed ({result.returncode}):\n{result.stdout[-1500:]}{result.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> int:
    """``python -m deploy.images build``: the Debian base, the wheelhouse and both images; prints timings."""
    parser = argparse.ArgumentParser(prog="python -m deploy.images", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--work", type=Path, default=Path("runs/images"), help="engine settings, Debian root fs")
    parser.add_argument("--wheels", type=Path, default=None, help="wheelhouse (default: the tests' cache)")
    parser.add_argument("--torch-spec", default=os.environ.get("TORCH_SPEC", "torch==2.13.0+cpu"))
    args = parser.parse_args(argv)
    try:
        problem = engine_problem(install=True)
        if problem:
            raise ImageError(problem)
        podman = Podman.configured(conf_dir=args.work)
        print(f"debian base: {build_debian_image(podman, work=args.work):.0f} s")
        wheels = args.wheels or wheel_cache_dir()
        print(f"wheelhouse: {build_wheelhouse(wheels, torch_spec=args.torch_spec):.0f} s")
        for name, seconds in build_images(podman, wheels=wheels, torch_spec=args.torch_spec).items():
            print(f"{name}: {seconds:.0f} s")
        for tag in IMAGES.values():
            print(f"{tag}: {image_size_mb(podman, tag):.0f} MB")
    except FedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
