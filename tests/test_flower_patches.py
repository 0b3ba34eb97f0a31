"""The shortened fixed waits of Flower's node loops (deploy/flower_patches.py, deploy/supernode.py).

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
from deploy.flower_patches import PATCHED_FLWR_VERSION, PollClock
from tests.conftest import seconds_to_pull_a_late_object

REPO = Path(__file__).resolve().parent.parent


class _Stop(Exception):
    """Ends Flower's endless node loop from inside the fake connection."""


@pytest.fixture
def restore_flower(monkeypatch):
    """Undo every patch after the test (the loop's ``time``, the pull functions' defaults)."""
    monkeypatch.setattr(loop, "time", loop.time)
    for function in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        monkeypatch.setitem(function.__kwdefaults__, "initial_backoff", function.__kwdefaults__["initial_backoff"])


def test_the_pinned_flower_is_the_code_the_patch_was_checked_against():
    pins = (REPO / "requirements.txt").read_text()
    assert f"flwr[simulation]=={PATCHED_FLWR_VERSION}" in pins
    assert flower_patches.supernode_loop_mismatch(loop, flwr_version=flower_patches.installed_flwr_version()) is None
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == flower_patches.FLOWER_PULL_BACKOFF_S


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
    assert isinstance(loop.time, PollClock) and loop.time.reply_s == 0.05


def test_a_missing_object_is_retried_after_the_first_retry_delay(restore_flower):
    flower_patches.patch_supernode_loop(poll_interval_s=0.25, first_retry_s=0.02)
    assert seconds_to_pull_a_late_object(inflatable_utils.pull_objects) < 0.5  # Flower 1.41 alone: ~1 s


def test_the_clientapp_pull_retry_is_shortened(restore_flower):
    assert flower_patches.patch_clientapp_pull(first_retry_s=0.05)
    assert inflatable_utils.pull_and_inflate_object_from_tree.__kwdefaults__["initial_backoff"] == 0.05


def test_another_flower_version_is_left_stock_with_a_warning(monkeypatch, restore_flower):
    import flwr.supercore

    logged = []
    monkeypatch.setattr(flwr.supercore, "log", lambda level, msg, *args: logged.append((level, msg % args)))
    monkeypatch.setattr(flower_patches, "installed_flwr_version", lambda: "1.42.0")
    assert not flower_patches.patch_supernode_loop(poll_interval_s=0.05, first_retry_s=0.02)
    assert not flower_patches.patch_clientapp_pull(first_retry_s=0.05)
    assert loop.time is time
    assert inflatable_utils.pull_objects.__kwdefaults__["initial_backoff"] == flower_patches.FLOWER_PULL_BACKOFF_S
    assert len(logged) == 2 and all(level == WARNING and "NOT shortened" in text and "flwr 1.42.0" in text
                                    for level, text in logged)


def test_changed_loop_code_is_detected(monkeypatch):
    monkeypatch.setattr(flower_patches.inspect, "getsource", lambda _: "time.sleep(3)\ntime.sleep(1)\n")
    reason = flower_patches.supernode_loop_mismatch(loop, flwr_version=PATCHED_FLWR_VERSION)
    assert reason is not None and "not the code fedseg checked" in reason


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
