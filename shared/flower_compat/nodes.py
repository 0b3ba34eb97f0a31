"""The replacements outside the simulation engine: SuperNode, warm ClientApp executor, deployed ServerApp.

Flower 1.41 has hard-coded waits that add seconds to every round of a
deployment (none is a setting; entries ``supernode-*``, ``clientapp-*`` and
``serverapp-*`` of :mod:`.registry` say where each is and what it cost):

- the SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps 3 s
  whenever a pull finds no message and checks every 0.5 s for the ClientApp's
  reply: :class:`PollClock` stands in for that module's ``time`` and shortens
  exactly those two sleeps;
- ``pull_objects`` / ``pull_and_inflate_object_from_tree`` retry an object that
  is not there yet after 1 s, 2 s, 4 s...: the first retry is lowered (then
  doubling as before) by changing the keyword default ``initial_backoff``.

Each function makes one process kind's replacements through the one gate
(:func:`.gate.install`): on any Flower but the code checked, nothing is
changed and the process logs one warning.
"""

from __future__ import annotations

import time
from logging import INFO
from typing import Any

from . import gate

# start_client_internal.py's sleeps (seconds) and Flower's first retry of a missing object (PULL_INITIAL_BACKOFF).
FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_SLEEP_S = 3, 0.5
FLOWER_PULL_BACKOFF_S = 1


class PollClock:
    """Stand-in for :mod:`time` in Flower's SuperNode loop: shorter idle and reply-wait sleeps."""

    def __init__(self, *, poll_interval_s: float) -> None:
        self.idle_s = poll_interval_s
        self.reply_s = min(FLOWER_REPLY_SLEEP_S, poll_interval_s)

    def sleep(self, seconds: float) -> None:
        """Sleep like :func:`time.sleep`, but the poll interval instead of Flower's 3 s / 0.5 s."""
        if seconds == FLOWER_IDLE_SLEEP_S:
            seconds = self.idle_s
        elif seconds == FLOWER_REPLY_SLEEP_S:
            seconds = self.reply_s
        time.sleep(seconds)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install_supernode(*, poll_interval_s: float, first_retry_s: float) -> bool:
    """SuperNode: poll every ``poll_interval_s`` when idle, retry a missing object after ``first_retry_s``."""
    done = gate.install("supernode", {"supernode-poll-clock": PollClock(poll_interval_s=poll_interval_s),
                                      "supernode-first-object-retry": first_retry_s})
    if done:
        _announce(f"SuperNode polls every {poll_interval_s:g} s when idle (Flower: {FLOWER_IDLE_SLEEP_S} s)")
    return done


def install_clientapp_executor(*, executor: Any, first_retry_s: float) -> bool:
    """Warm executor: Flower's SuperExec loop uses ``executor``; its ClientApps retry after ``first_retry_s``."""
    done = gate.install("clientapp-executor", {"clientapp-first-object-retry": first_retry_s,
                                               "forking-executor": lambda *args, **kwargs: executor})
    if done:
        _announce(f"warm ClientApp executor; a missing message object is retried after {first_retry_s:g} s "
                  f"(Flower: {FLOWER_PULL_BACKOFF_S} s)")
    return done


def install_serverapp(*, in_process: bool, first_retry_s: float) -> bool:
    """ServerApp: retry a reply object not yet on the SuperLink after ``first_retry_s``.

    ``in_process``: the Grid is the simulation engine's in-process one, which
    pulls no objects; this process is the engine's, whose replacements the
    launcher made (or refused) before the run's output reached the run's log,
    so a refusal is logged here, once. Returns False if this process runs
    stock Flower because a guard failed (the one warning was logged).
    """
    if in_process:
        reason = gate.refusal("simulation-engine")
        if reason is not None:
            gate.warn("simulation-engine", reason)
        return reason is None
    return gate.install("serverapp", {"serverapp-first-object-retry": first_retry_s})


def _announce(done: str) -> None:
    from flwr.common.logger import log

    log(INFO, "fedseg: %s", done)
