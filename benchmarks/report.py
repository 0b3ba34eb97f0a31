"""Write one benchmark's section of BENCHMARKS.md, leaving the other sections alone."""

from __future__ import annotations

import os
import re
from pathlib import Path

from shared.atomic import atomic_write

BENCHMARKS_MD = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
HEADER = ("# Benchmarks\n\nMeasured with the commands shown, on this project's 2-core CPU machines. "
          "Ratios are measured side by side in one run; absolute times on shared machines are noisy.\n")


def write_section(key: str, title: str, body: str, *, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section delimited by ``<!-- key:begin -->`` / ``<!-- key:end -->``."""
    text = path.read_text() if path.exists() else HEADER
    section = f"<!-- {key}:begin -->\n## {title}\n\n{body.rstrip()}\n<!-- {key}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(key)}:begin -->.*?<!-- {re.escape(key)}:end -->", re.DOTALL)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    atomic_write(path, lambda handle: handle.write(text.encode()))


def publish(key: str, title: str, body: str, *, write: bool) -> None:
    """Print a benchmark's section and, with ``write``, put it into BENCHMARKS.md."""
    print(body)
    if write:
        write_section(key, title, body)


def load_average(*, sep: str = ", ", digits: int = 1) -> str:
    """This machine's 1, 5 and 15 minute load averages, e.g. ``"0.3, 1.3, 3.1"``."""
    return sep.join(f"{value:.{digits}f}" for value in os.getloadavg())
