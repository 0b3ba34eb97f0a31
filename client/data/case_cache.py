"""A site-owned disk cache of decoded, preprocessed cases.

Decoding DICOM and resampling volumes every round is slow; the result of the
deterministic pipeline is stored per case under the site's ``cache-dir``. The
key covers every source file's identity (path, size, mtime_ns; every file of a
DICOM folder) and the preprocessing settings, so changing a file or a setting
makes a new entry. Entries are written atomically and loaded with
``weights_only=True``; an unreadable entry counts as a miss and is rewritten.
Entries are not fsync'ed (two disk flushes per case, the largest fixed cost of
a site's first round in benchmarks/scale.py): a power loss can leave an entry
missing or empty, which loads as a miss and is rebuilt from the source files.
A hit refreshes the entry's modification time, so :meth:`CaseCache.prune`
can drop entries no round has used for a while (e.g. of files since changed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from shared.atomic import atomic_write

CACHE_FORMAT = "fedseg-case-cache/1"
UNUSED_ENTRY_MAX_AGE_S = 30 * 24 * 3600


class CaseCache:
    """Preprocessed cases stored under ``directory``; counts hits and misses."""

    def __init__(self, directory: Path | str, *, settings: Any) -> None:
        self.directory = Path(directory)
        self.settings = dataclasses.asdict(settings)
        self.hits = 0
        self.misses = 0

    def key(self, case: dict[str, Any]) -> str:
        """A hash of the case's source files' identities and the preprocessing settings."""
        identity = {"format": CACHE_FORMAT, "settings": self.settings,
                    "files": {key: _identities(case[key]) for key in sorted(case)}}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()

    def get(self, case: dict[str, Any]) -> dict[str, Any] | None:
        """The cached preprocessed case, or None (a miss)."""
        import torch

        path = self._path(case)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            entry = None
        except Exception:  # a damaged entry is rebuilt, never trusted
            entry = None
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        with contextlib.suppress(FileNotFoundError):  # pruned by the site's other handler since the load
            os.utime(path)  # last use, for prune()
        return entry

    def put(self, case: dict[str, Any], preprocessed: dict[str, Any]) -> None:
        """Store a preprocessed case atomically."""
        import torch

        tensors = {k: v for k, v in preprocessed.items() if isinstance(v, torch.Tensor)}
        path = self._path(case)
        # cached cases are image data: only the node's user may read them (files are 0600 from mkstemp)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        atomic_write(path, lambda handle: torch.save(tensors, handle), durable=False)

    def prune(self, *, max_age_s: float = UNUSED_ENTRY_MAX_AGE_S) -> int:
        """Delete entries not used for ``max_age_s`` seconds; return how many."""
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0, got {max_age_s!r}")
        cutoff = time.time() - max_age_s
        removed = 0
        for entry in self.directory.glob("*/*.pt"):
            try:
                if entry.stat().st_mtime < cutoff:
                    entry.unlink()
                    removed += 1
            except FileNotFoundError:  # pruned concurrently by the other handler
                continue
        return removed

    def _path(self, case: dict[str, Any]) -> Path:
        digest = self.key(case)
        return self.directory / digest[:2] / f"{digest}.pt"


def _identities(source: str | list[str]) -> list[tuple[str, int, int]]:
    paths = [source] if isinstance(source, str) else list(source)
    found = []
    for path in map(Path, paths):
        files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
        for file in files:
            stat = file.stat()
            found.append((str(file), stat.st_size, stat.st_mtime_ns))
    return found
