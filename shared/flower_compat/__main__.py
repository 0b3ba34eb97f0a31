"""``python -m shared.flower_compat [--hashes]``: the replacement table, or the installed Flower's source hashes.

``--hashes`` prints the ``CHECKED_SOURCES`` entry for the installed flwr (paste
it into :mod:`.checked` only after reading every changed source: README,
"Upgrading Flower"); without it, each replacement and whether its guard passes.
"""

from __future__ import annotations

import argparse
import sys

from .gate import PROCESSES, installed_flwr_version, mismatch, source_hash
from .registry import REGISTRY, entries_of


def relied_on() -> list[str]:
    """Every Flower source some replacement relies on, sorted, once each."""
    return sorted({path for entry in REGISTRY for path in entry.relies_on})


def main(argv: list[str] | None = None) -> int:
    """Print the table (exit 1 if any process kind's guard fails) or, with ``--hashes``, the hashes."""
    parser = argparse.ArgumentParser(prog="python -m shared.flower_compat", description=__doc__.split("\n")[0])
    parser.add_argument("--hashes", action="store_true", help="print the installed Flower's source hashes")
    args = parser.parse_args(argv)
    version = installed_flwr_version()
    if args.hashes:
        print(f'    "{version}": {{')
        for path in relied_on():
            print(f'        "{path}":\n            "{source_hash(path)}",')
        print("    },")
        return 0
    failed = 0
    for process in PROCESSES:
        reason = mismatch(entries_of(process))
        failed += reason is not None
        print(f"{process}: {'ok' if reason is None else 'STOCK FLOWER: ' + reason} (flwr {version})")
        for entry in entries_of(process):
            print(f"  {entry.name}: {entry.kind} {entry.target} -> {entry.replacement}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
