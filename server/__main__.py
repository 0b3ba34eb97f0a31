"""``python -m server COMMAND``: tools for the consortium operator."""

from __future__ import annotations

import sys

from shared.cli import run_commands

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "certs": ("server.certs", "make the consortium CA and the SuperLink TLS certificate"),
    "check-checkpoint": ("server.check_checkpoint", "verify a run's checkpoint and show where a resume continues"),
    "dashboard": ("server.dashboard.command", "serve the web dashboard of the run folders (read-only, live)"),
}


def main(argv: list[str] | None = None) -> int:
    return run_commands("python -m server", "fedseg tools for the consortium operator.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
