"""Give memory back after each message, so long-lived client processes stay flat.

Simulated clients (Ray actors) and a SuperNode's long-lived ClientApp process
handle message after message; without this their RSS creeps up a few MB per
round (reference cycles in MONAI/torch objects and glibc keeping freed heap),
measured in benchmarks/scale.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from collections.abc import Iterator

_LIBC_NAME = ctypes.util.find_library("c")
_STATE = {"frozen": False}


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc only).

    A full collection over everything torch, MONAI and Flower keep alive costs
    hundreds of milliseconds; after the first one those long-lived objects are
    frozen (``gc.freeze``) so that later collections only walk what the last
    message allocated (well under a millisecond).
    """
    gc.collect()
    if not _STATE["frozen"]:
        gc.freeze()
        _STATE["frozen"] = True
    if _LIBC_NAME:
        libc = ctypes.CDLL(_LIBC_NAME)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)


@contextlib.contextmanager
def memory_released() -> Iterator[None]:
    """Run the body, then :func:`release_memory` whatever happened."""
    try:
        yield
    finally:
        release_memory()
