"""Shorter fixed waits in Flower 1.41's node-side loops, guarded by version and code checks.

Flower 1.41 has hard-coded waits on a hospital node that add seconds to every
round of a deployment (none is a setting; the newer Flower sources searched
still hard-code the 3 s, and upstream only made the SuperExec's task poll
configurable: ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, flwrlabs/flower#8041):

1. ``flwr/supernode/start_client_internal.py``: the SuperNode sleeps 3 s
   whenever a pull finds no message (it pulls again right after each reply,
   before the server has aggregated, so twice per round), and checks every
   0.5 s for the ClientApp's reply. :func:`patch_supernode_loop` replaces the
   module's ``time`` with :class:`PollClock`, which shortens exactly those two
   sleeps.
2. ``pull_objects`` (``flwr/supercore/inflatable/inflatable_utils.py``): a
   message's content is pulled object by object; an object that is not there
   yet is retried after 1 s, 2 s, 4 s... The node can pull a message before
   the server has pushed all its objects (more often the sooner it polls), and
   the ClientApp is started before the node has them. :func:`patch_supernode_loop`
   (the node's pulls from the SuperLink) and :func:`patch_clientapp_pull` (a
   ClientApp's pulls from its node, in the warm executor) lower the first retry
   (then doubling as before) by changing a keyword default. The ServerApp does
   the same for its own pulls (``server.polling_grid.shorten_object_pull_retry``).

Each patch checks the installed Flower first; on any other version or code it
changes nothing, logs a warning, and the node runs stock Flower.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import time
from collections.abc import Callable
from logging import INFO, WARNING
from types import ModuleType
from typing import Any

PATCHED_FLWR_VERSION = "1.41.0"
# start_client_internal.py's sleeps (seconds) and how often each literal occurs there.
FLOWER_IDLE_SLEEP_S, FLOWER_REPLY_SLEEP_S = 3, 0.5
EXPECTED_SLEEPS = {"time.sleep(3)": 1, "time.sleep(0.5)": 2}
FLOWER_PULL_BACKOFF_S = 1  # PULL_INITIAL_BACKOFF in flwr/supercore/constant.py


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


def installed_flwr_version() -> str:
    """The installed ``flwr`` distribution's version."""
    return importlib.metadata.version("flwr")


def supernode_loop_mismatch(module: ModuleType, *, flwr_version: str) -> str | None:
    """Why Flower's SuperNode loop ``module`` must not be patched, or None if it is the code checked."""
    if flwr_version != PATCHED_FLWR_VERSION:
        return f"flwr {flwr_version} is installed; these waits are only shortened on flwr {PATCHED_FLWR_VERSION}"
    source = inspect.getsource(module)
    found = {call: source.count(call) for call in EXPECTED_SLEEPS}
    uses = set(re.findall(r"\btime\.(\w+)", source))
    if found != EXPECTED_SLEEPS or uses != {"sleep"} or not isinstance(module.time, ModuleType | PollClock):
        return (f"{module.__file__} is not the code fedseg checked (sleeps {found}, time.* used: "
                f"{sorted(uses)}; expected {EXPECTED_SLEEPS} and time.sleep only)")
    return None


def set_first_retry(function: Callable[..., Any], *, seconds: float) -> str | None:
    """Set ``function``'s keyword default ``initial_backoff`` to ``seconds``; return why not, or None."""
    defaults = function.__kwdefaults__ or {}
    if defaults.get("initial_backoff") not in (FLOWER_PULL_BACKOFF_S, seconds):
        return (f"{function.__module__}.{function.__qualname__}: initial_backoff is "
                f"{defaults.get('initial_backoff')!r}, expected Flower's {FLOWER_PULL_BACKOFF_S}")
    defaults["initial_backoff"] = seconds
    return None


def patch_supernode_loop(*, poll_interval_s: float, first_retry_s: float) -> bool:
    """Poll every ``poll_interval_s`` in the SuperNode loop, retry missing objects after ``first_retry_s``.

    Returns False (after logging a warning, with nothing changed) if the installed
    Flower is not the version and code checked.
    """
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode import start_client_internal as loop

    reason = (supernode_loop_mismatch(loop, flwr_version=installed_flwr_version())
              or set_first_retry(inflatable_utils.pull_objects, seconds=first_retry_s))
    if reason is None:
        loop.time = PollClock(poll_interval_s=poll_interval_s)
    _report(reason, f"SuperNode polls every {poll_interval_s:g} s when idle (Flower: {FLOWER_IDLE_SLEEP_S} s)")
    return reason is None


def patch_clientapp_pull(*, first_retry_s: float) -> bool:
    """In a ClientApp process: retry a message object its SuperNode does not have yet after ``first_retry_s``."""
    from flwr.supercore.inflatable import inflatable_utils

    reason = None if installed_flwr_version() == PATCHED_FLWR_VERSION else (
        f"flwr {installed_flwr_version()} is installed, not {PATCHED_FLWR_VERSION}")
    reason = reason or set_first_retry(inflatable_utils.pull_and_inflate_object_from_tree, seconds=first_retry_s)
    _report(reason, f"ClientApp retries a missing message object after {first_retry_s:g} s (Flower: "
                    f"{FLOWER_PULL_BACKOFF_S} s)")
    return reason is None


def _report(reason: str | None, done: str) -> None:
    from flwr.supercore import log

    if reason is None:
        log(INFO, "fedseg: %s", done)
    else:
        log(WARNING, "fedseg: Flower's fixed waits NOT shortened (stock Flower, slower rounds): %s", reason)
