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


def release_memory() -> None:
    """Collect garbage and return freed heap pages to the OS (glibc only)."""
    gc.collect()
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
