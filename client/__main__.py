"""``python -m client COMMAND``: tools for hospital IT, run at the site."""

from __future__ import annotations

import sys

from shared.cli import run_commands

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "keygen": ("client.keygen", "make this node's authentication key pair (the public key goes to the operator)"),
}


def main(argv: list[str] | None = None) -> int:
    return run_commands("python -m client", "fedseg tools for a hospital node.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
