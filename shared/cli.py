"""Command-line helpers: a small subcommand dispatcher for ``python -m client`` and ``python -m server``,
and what every fedseg command shares (``--run-config`` pairs, SIGTERM, quiet library notices).

Each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int`` (a thin argparse layer over a plain api function). Exit
codes: 0 success, 1 the command ran and found problems or failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from collections.abc import Mapping

from shared.errors import FedSegError


def quiet_optional_codec_notice() -> None:
    """Silence library notices that are only noise on a console.

    MONAI logs and warns, at every import and read, that the optional
    nvImageCodec DICOM decoder is absent (fedseg never uses it: pydicom
    decodes), and warns that an argument its own HD95 code passes is deprecated.
    In a ClientApp that is not only noise: a simulated hospital logged ~40
    lines a second, each carried through Ray's log monitor, the simulation
    engine, the SuperLink and ``flwr run`` (measured in benchmarks/scale.py).
    """
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into ``SystemExit(143)`` in this process, so cleanup (``finally``, context managers) runs.

    Python's default SIGTERM action ends the process at once; a harness killed
    that way would leave the Flower and Ray processes it started running.
    """
    import signal

    def _exit(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def parse_run_config(pairs: list[str]) -> dict[str, object]:
    """Parse ``--run-config KEY=VALUE`` pairs with TOML value syntax (bare words are strings)."""
    import tomllib

    values: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise FedSegError(f"--run-config expects KEY=VALUE, got {pair!r}")
        try:
            values[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key.strip()] = raw
    return values


def run_commands(prog: str, description: str, commands: Mapping[str, tuple[str, str]],
                 argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command; ``commands`` maps name -> (module, help)."""
    quiet_optional_codec_notice()
    parser = argparse.ArgumentParser(prog=prog, description=description)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (module_name, help_text) in commands.items():
        module = importlib.import_module(module_name)
        modules[name] = module
        module.add_arguments(subparsers.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(modules[args.command].run(args))
    except FedSegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
