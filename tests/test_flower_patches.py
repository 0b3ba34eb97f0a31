"""The shortened fixed waits of Flower's node loops (shared/flower_compat/nodes.py, deploy/supernode.py).

They run Flower's real code: the SuperNode loop against a fake connection that
never has a message, and Flower's object pull against an object that arrives
on the second try. If the pinned Flower's loop changes, the first test fails.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from logging import WARNING
from pathlib import Path

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supernode import start_client_internal as loop

from deploy import flower_patches, supernode
from shared.flower_compat.gate import PATCHED_FLWR_VERSION, WARNING_PREFIX
from shared.flower_compat.nodes import FLOWER_PULL_BACKOFF_S
from tests.conftest import seconds_to_pull_a_late_object

# the copy the node scripts use: shared/flower_compat loaded by path under its private name
GATE, NODES = flower_patches.compat("gate"), flower_patches.compat("nodes")

REPO = Path(__file__).resolve().parent.parent


class _Stop(Exception):
    """Ends Flower's endless node loop from inside the fake connection."""


@pytest.fixture
def restore_flower(monkeypatch):
    """Undo every replacement after the test (the loop's ``time``, the pull functions' defaults, the executor)."""
    yield
    for process in ("supernode", "clientapp-executor"):
        GATE.restore(process)
    assert loop.time is time and inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == 1


def test_the_pinned_flower_is_the_code_the_patch_was_checked_against():
    pins = (REPO / "requirements.txt").read_text()
    assert f"flwr[simulation]=={PATCHED_FLWR_VERSION}" in pins
    from shared.flower_compat.registry import entries_of

    assert GATE.mismatch(entries_of("supernode") + entries_of("clientapp-executor")) is None
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == FLOWER_PULL_BACKOFF_S


def _idle_pull_gaps(monkeypatch, pulls: int) -> list[float]:
    """Run Flower's start_client_internal with a connection that never has a message; gaps between pulls."""
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode.nodestate import NodeStateFactory

    stamps: list[float] = []

    def receive():
        stamps.append(time.monotonic())
        if len(stamps) == pulls:
            raise _Stop

    @contextlib.contextmanager
    def fake_connection(**_):
        yield 1, receive, None, None, None, None, None, None

    monkeypatch.setattr(loop, "_init_connection", fake_connection)
    monkeypatch.setattr(loop, "register_signal_handlers", lambda **_: None)
    with pytest.raises(_Stop):
        loop.start_client_internal(state_factory=NodeStateFactory(objectstore_factory=ObjectStoreFactory()),
                                   server_address="127.0.0.1:1", node_config={}, insecure=True, isolation="process")
    return [b - a for a, b in itertools.pairwise(stamps)]


def test_the_supernode_loop_polls_at_the_interval_when_idle(monkeypatch, restore_flower):
    assert flower_patches.patch_supernode_loop(poll_interval_s=0.05, first_retry_s=0.02)
    gaps = _idle_pull_gaps(monkeypatch, pulls=4)
    assert len(gaps) == 3 and all(0.04 <= gap < 1.0 for gap in gaps), gaps  # Flower 1.41 alone: 3 s each
    assert isinstance(loop.time, NODES.PollClock) and loop.time.reply_s == 0.05


def test_a_missing_object_is_retried_after_the_first_retry_delay(restore_flower):
    flower_patches.patch_supernode_loop(poll_interval_s=0.25, first_retry_s=0.02)
    assert seconds_to_pull_a_late_object(inflatable_utils.pull_objects) < 0.5  # Flower 1.41 alone: ~1 s


def test_the_executor_and_its_clientapps_pull_retry_are_handed_to_flower(restore_flower):
    from flwr.supercore.superexec import run_superexec

    executor = object()
    assert flower_patches.patch_clientapp_executor(executor=executor, first_retry_s=0.05)
    assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.05
    assert run_superexec.get_executor("any", "arguments") is executor


def test_another_flower_version_is_left_stock_with_one_warning_per_process(monkeypatch, restore_flower, caplog):
    from flwr.supercore.superexec import run_superexec

    get_executor = run_superexec.get_executor
    monkeypatch.setattr(GATE, "installed_flwr_version", lambda: "1.99.0")
    assert not flower_patches.patch_supernode_loop(poll_interval_s=0.05, first_retry_s=0.02)
    assert not flower_patches.patch_clientapp_executor(executor=object(), first_retry_s=0.05)
    assert loop.time is time and run_superexec.get_executor is get_executor
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == FLOWER_PULL_BACKOFF_S
    warnings = [r for r in caplog.records if WARNING_PREFIX in r.getMessage()]
    assert [r.levelno for r in warnings] == [WARNING, WARNING]
    assert all("flwr 1.99.0 is installed" in r.getMessage() for r in warnings)
    assert "supernode runs stock" in warnings[0].getMessage()
    assert "clientapp-executor runs stock" in warnings[1].getMessage()


def test_changed_loop_code_is_detected(monkeypatch):
    from shared.flower_compat.registry import entries_of

    real = GATE.inspect.getsource
    monkeypatch.setattr(GATE.inspect, "getsource",
                        lambda obj: "time.sleep(3)\ntime.sleep(1)\n" if obj is loop else real(obj))
    reason = GATE.mismatch(entries_of("supernode"))
    version = GATE.installed_flwr_version()
    assert reason == f"flwr {version}'s flwr.supernode.start_client_internal is not the code fedseg checked"


def test_the_launcher_hands_flower_every_other_argument(monkeypatch, restore_flower):
    import flwr.supernode.cli as flower_cli

    seen = {}
    monkeypatch.setattr(flower_cli, "flower_supernode", lambda: seen.update(argv=list(sys.argv)))
    monkeypatch.setattr(sys, "argv", ["python"])
    monkeypatch.delenv(supernode.SUPEREXEC_POLL_ENV, raising=False)
    monkeypatch.setenv(supernode.POLL_INTERVAL_ENV, "0.5")
    assert supernode.main(["--superlink", "h:1", "--poll-interval", "0.2", "--node-config", "a=1"]) == 0
    assert seen["argv"] == ["flower-supernode", "--superlink", "h:1", "--node-config", "a=1"]
    assert loop.time.idle_s == 0.2 and supernode.os.environ[supernode.SUPEREXEC_POLL_ENV] == "0.2"
    supernode.main(["--insecure"])  # no flag: the environment variable
    assert loop.time.idle_s == 0.5


@pytest.mark.parametrize("value", ["0", "-1", "nan", "soon", "61"])
def test_a_bad_poll_interval_is_refused_naming_the_option(value, capsys):
    with pytest.raises(SystemExit) as exited:
        supernode.main(["--poll-interval", value, "--insecure"])
    assert exited.value.code == 2 and "--poll-interval" in capsys.readouterr().err
