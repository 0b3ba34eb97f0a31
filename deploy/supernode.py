"""``python deploy/supernode.py [--poll-interval S] FLOWER-SUPERNODE-ARGS``: Flower's SuperNode, shorter waits.

Runs Flower's own ``flower-supernode`` main, unchanged (TLS, node
authentication, ``--node-config``, isolation modes: every argument other than
``--poll-interval`` goes to Flower's parser), after shortening Flower 1.41's
hard-coded waits in the node loop (``shared/flower_compat``, loaded by
:mod:`flower_patches`): the idle poll
(Flower: 3 s) becomes ``--poll-interval`` (default 0.25 s, or
``$FEDSEG_SUPERNODE_POLL_INTERVAL``), the reply check ``min(0.5 s, poll
interval)``, the first retry of a message object not yet on the SuperLink
0.1 s (Flower: 1 s). The node's SuperExec polls at the same interval
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, unless set). On any other Flower
version or code the node runs stock Flower and logs one warning.

The idle poll is one HTTPS request per interval per node to the SuperLink
(4 per second at 0.25 s, instead of one every 3 s).

Run as a script (like ``clientapp_executor.py``): it imports only Flower,
the standard library and ``shared/flower_compat`` (by path, :mod:`flower_patches`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

try:
    from deploy import flower_patches
except ImportError:  # run as a script: deploy/ itself is on sys.path, the repository root is not
    import flower_patches

POLL_INTERVAL_ENV = "FEDSEG_SUPERNODE_POLL_INTERVAL"
DEFAULT_POLL_INTERVAL_S = 0.25
MIN_POLL_INTERVAL_S, MAX_POLL_INTERVAL_S = 0.01, 60.0
FIRST_RETRY_S = 0.1  # a message object not on the SuperLink yet (Flower: 1 s, then doubling)
SUPEREXEC_POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"  # Flower's own setting (default 1 s)


class PollIntervalError(ValueError):
    """The poll interval is not a number of seconds in the allowed range."""


def parse_poll_interval(value: str | float, *, key: str = "--poll-interval") -> float:
    """``value`` as seconds in [0.01, 60]; raise :class:`PollIntervalError` naming ``key`` otherwise."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise PollIntervalError(f"{key!r} must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(seconds) and MIN_POLL_INTERVAL_S <= seconds <= MAX_POLL_INTERVAL_S):
        raise PollIntervalError(f"{key!r} must be between {MIN_POLL_INTERVAL_S} and {MAX_POLL_INTERVAL_S} s, "
                                f"got {value!r}")
    return seconds


def build_parser() -> argparse.ArgumentParser:
    """Our one option; everything else is left for Flower's parser."""
    parser = argparse.ArgumentParser(
        prog="python deploy/supernode.py", allow_abbrev=False,
        description="Flower's flower-supernode with shorter fixed waits (fedseg).",
        epilog="Every other argument is passed to flower-supernode (see `flower-supernode --help`).")
    parser.add_argument("--poll-interval", metavar="S", default=os.environ.get(POLL_INTERVAL_ENV),
                        help=f"seconds between polls when idle (default {DEFAULT_POLL_INTERVAL_S}, or "
                             f"${POLL_INTERVAL_ENV}; Flower {flower_patches.compat('gate').PATCHED_FLWR_VERSION}: "
                             f"{flower_patches.compat('nodes').FLOWER_IDLE_SLEEP_S})")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``--poll-interval``, shorten the waits, then run Flower's ``flower-supernode`` main."""
    parser = build_parser()
    args, flower_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        interval = parse_poll_interval(DEFAULT_POLL_INTERVAL_S if args.poll_interval is None else args.poll_interval)
    except PollIntervalError as exc:
        parser.error(str(exc))
    os.environ.setdefault(SUPEREXEC_POLL_ENV, str(interval))
    flower_patches.patch_supernode_loop(poll_interval_s=interval, first_retry_s=FIRST_RETRY_S)
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    sys.exit(main())
