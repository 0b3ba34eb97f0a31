"""client.runtime.memory: the heap is given back once a process has grown past the slack, not after every message."""

from __future__ import annotations

import ctypes.util
import gc
import sys
import types

import pytest

from client.runtime import memory


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "_STATE", {"frozen_modules": 10**9, "trimmed_rss": 0})  # never freeze pytest


def test_the_heap_is_trimmed_only_after_the_process_grew_past_the_slack() -> None:
    sizes = iter([500, 400,  # first call: trimmed, baseline 400
                  450,  # +50 <= slack 100: kept
                  501, 420])  # +101 > slack: trimmed, baseline 420
    rss = sizes.__next__
    assert memory.release_memory(rss=rss, slack=100) is True
    assert memory.release_memory(rss=rss, slack=100) is False
    assert memory.release_memory(rss=rss, slack=100) is True
    assert memory._STATE["trimmed_rss"] == 420


@pytest.mark.skipif(not memory.resident_bytes() or not ctypes.util.find_library("c"),
                    reason="needs Linux /proc and glibc")
def test_freed_heap_goes_back_to_the_os_once_past_the_slack() -> None:
    memory.release_memory()  # baseline after a trim
    chunks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MiB of heap (below glibc's mmap threshold)
    keep = chunks[::100]  # pins scattered pages, so freeing the rest leaves holes, not a shrinkable top
    del chunks
    grown = memory.resident_bytes()
    assert memory.release_memory() is True
    assert memory.resident_bytes() < grown - 100 * 2**20
    assert memory.release_memory() is False  # no growth since: nothing to give back, nothing trimmed
    del keep


def test_resident_bytes_reads_this_process() -> None:
    if not memory.resident_bytes():
        pytest.skip("no /proc/self/statm here")
    before = memory.resident_bytes()
    block = bytearray(80 * 2**20)
    block[::4096] = b"x" * len(block[::4096])  # touch every page
    assert memory.resident_bytes() > before + 60 * 2**20


def test_what_a_message_imported_is_frozen_so_later_collections_skip_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(memory._STATE, "frozen_modules", len(sys.modules))
    try:
        before = gc.get_freeze_count()
        memory.release_memory()
        assert gc.get_freeze_count() == before  # nothing imported since the last freeze: nothing frozen
        monkeypatch.setitem(sys.modules, "fedseg_imported_by_a_message", types.ModuleType("imported"))
        memory.release_memory()
        assert gc.get_freeze_count() > before
        assert memory._STATE["frozen_modules"] == len(sys.modules)
    finally:
        gc.unfreeze()
