"""Shared fixtures: tiny models and tiny synthetic hospitals written to tmp dirs."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", message="nvImageCodec")

from shared.config import RunConfig  # noqa: E402
from simulations.synthetic import make_site_profiles, write_hospitals  # noqa: E402

TINY_RUN_CONFIG = {
    "model": "unet", "channels": "4,8", "strides": "2", "num-res-units": 0, "patch-size": 32,
    "local-steps": 2, "batch-size": 2, "num-rounds": 1, "plan": "manual",
    "dp": False,  # tests about DP switch it on explicitly
}


def tiny_config_with(overrides: dict | None = None) -> RunConfig:
    """:data:`TINY_RUN_CONFIG` with ``overrides`` (run-config keys)."""
    return RunConfig.from_mapping({**TINY_RUN_CONFIG, **(overrides or {})})


def tiny_plan(overrides: dict | None = None):  # noqa: ANN201 - shared.plan.Plan (imported lazily)
    """The manual plan of :data:`TINY_RUN_CONFIG` with ``overrides`` (run-config keys)."""
    from shared.plan import manual_plan

    return manual_plan(tiny_config_with(overrides))


def tiny_recorder(run_dir: Path):  # noqa: ANN201 - server.run_folder.RunRecorder (imported lazily)
    """A run recorder for :data:`TINY_RUN_CONFIG` and its manual plan, writing to ``run_dir``."""
    from server.run_folder import RunRecorder

    return RunRecorder(run_dir, config=tiny_config_with(), plan=tiny_plan())


def live_processes_mentioning(fragment: str) -> list[int]:
    """PIDs (not ours, not zombies) whose environment or command line mentions ``fragment``.

    Tests use it to prove that every Flower/Ray process a run started is gone.
    """
    import os

    from shared.processes import alive

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            text = (entry / "environ").read_bytes() + (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if fragment.encode() in text and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture
def tiny_config() -> RunConfig:
    """A run config with a two-level U-Net and small patches (fast on CPU)."""
    return RunConfig.from_mapping(TINY_RUN_CONFIG)


@pytest.fixture(scope="session")
def two_sites(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small synthetic 2D hospitals; returns their datalists (read-only for tests)."""
    out = tmp_path_factory.mktemp("sites")
    profiles = make_site_profiles(2, seed=3, min_cases=4, max_cases=5)
    return write_hospitals(profiles, out, spatial_dims=2, seed=3)


@pytest.fixture
def flower_identity():
    """Let tests build Flower Messages outside a Flower process."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def seconds_to_pull_a_late_object(pull_objects) -> float:  # noqa: ANN001 - a Flower pull function
    """Pull one object that is missing on the first try (pushed late) through ``pull_objects``; seconds taken."""
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    tries = []

    def pull(object_id: str) -> bytes:
        tries.append(object_id)
        if len(tries) == 1:
            raise ObjectUnavailableError(object_id)
        return b"content"

    started = time.monotonic()
    assert pull_objects(["late"], pull) == {"late": b"content"} and len(tries) == 2
    return time.monotonic() - started


@pytest.fixture(autouse=True)
def flower_pull_retry_restored():
    """Undo what an in-process ServerApp run (``server.federation.run_federation``, e.g. through
    ``tests/local_federation.py``) does to Flower's ``pull_objects`` retry default, so that the tests of
    that patch always see the pinned Flower's own value."""
    from flwr.supercore.inflatable import inflatable_utils

    defaults = inflatable_utils.pull_objects.__kwdefaults__
    saved = dict(defaults or {})
    yield
    if defaults is not None:
        defaults.clear()
        defaults.update(saved)
