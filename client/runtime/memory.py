"""Give memory back after each message, so long-lived client processes stay flat.

Simulated clients (Ray actors) and a SuperNode's long-lived ClientApp process
handle message after message; without this their RSS creeps up a few MB per
round (reference cycles in MONAI/torch objects and glibc keeping freed heap),
measured in benchmarks/scale.py.

Returning freed heap to the OS (``malloc_trim``) after *every* message made
the next message fault every page back in: ~17k page faults per CPU second
and 6-7% of a simulated client's CPU in the kernel with small sites. The heap
is now trimmed only once the process has grown :data:`TRIM_SLACK_BYTES` past
its size after the last trim, so memory stays bounded (flat to within the
slack) and steady rounds reuse the pages they already have.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import sys
from collections.abc import Callable, Iterator

_LIBC_NAME = ctypes.util.find_library("c")
TRIM_SLACK_BYTES = 64 * 2**20
_STATE: dict[str, float] = {"frozen_modules": 0, "trimmed_rss": 0}


def resident_bytes() -> int:
    """This process's resident set size (Linux ``/proc/self/statm``; 0 where unavailable)."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory(*, rss: Callable[[], int] = resident_bytes, slack: int = TRIM_SLACK_BYTES) -> bool:
    """Collect garbage; return freed heap pages to the OS (glibc) if the process grew past ``slack``.

    A full collection over everything torch, MONAI and Flower keep alive costs
    hundreds of milliseconds; those long-lived objects are frozen (``gc.freeze``)
    so that later collections only walk what the last message allocated (well
    under a millisecond). They are frozen again whenever the message imported
    modules: a process whose first message imports little (a secure-aggregation
    key exchange) and whose next one imports torch would otherwise walk all of
    torch and MONAI at every later message (~0.2 s each). Returns True if the heap was trimmed.
    """
    gc.collect()
    if len(sys.modules) > _STATE["frozen_modules"]:
        gc.freeze()
        _STATE["frozen_modules"] = len(sys.modules)
    resident = rss()
    if resident and resident <= _STATE["trimmed_rss"] + slack:
        return False
    trim = getattr(ctypes.CDLL(_LIBC_NAME), "malloc_trim", None) if _LIBC_NAME else None
    if trim is None:
        return False
    trim(0)
    _STATE["trimmed_rss"] = rss()
    return True


@contextlib.contextmanager
def memory_released() -> Iterator[None]:
    """Run the body, then :func:`release_memory` whatever happened."""
    try:
        yield
    finally:
        release_memory()
