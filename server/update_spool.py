"""Hold a round's accepted updates on disk, not in memory, and average them.

Each update is written as one flat file of raw tensor bytes (in the global
model's key order) as soon as it arrives and passes its checks; the message is
then dropped. After the round closes, the weighted mean is accumulated one
update at a time in float64 (memory: one model in float64 plus one tensor), in
site-id order, so the result does not depend on the order replies arrived in.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord


@dataclass
class SpooledUpdate:
    """One accepted update on disk, with what the aggregation needs to weigh it."""

    site: str
    num_examples: float
    norm: float
    path: Path
    metrics: dict[str, Any] = field(default_factory=dict)


class UpdateSpool:
    """A private folder of flat update files for one round.

    Parameters
    ----------
    parent : Path
        Folder to create the spool in (the run folder: never a RAM-backed /tmp).
    reference : Mapping[str, numpy.ndarray]
        The global model sent this round; fixes key order, shapes and dtypes.
    """

    def __init__(self, parent: Path, *, reference: Mapping[str, np.ndarray]) -> None:
        Path(parent).mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(prefix=".spool-", dir=parent))
        self.reference = reference

    def write(self, site: str, arrays: Mapping[str, np.ndarray]) -> Path:
        """Write ``arrays`` (already checked against the reference) to a flat file."""
        path = self.folder / f"{len(list(self.folder.iterdir())):05d}.bin"
        with open(path, "wb") as handle:
            for name in self.reference:
                handle.write(np.ascontiguousarray(arrays[name]).tobytes())
        return path

    def read(self, path: Path) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (name, tensor) of a spooled update, one tensor at a time (memory-mapped)."""
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        offset = 0
        for name, expected in self.reference.items():
            size = expected.nbytes
            yield name, raw[offset:offset + size].view(expected.dtype).reshape(expected.shape)
            offset += size

    def weighted_mean(self, updates: Sequence[SpooledUpdate]) -> ArrayRecord:
        """Example-weighted mean of ``updates`` in the order given (site-id order)."""
        total = float(sum(u.num_examples for u in updates))
        sums = {name: np.zeros(ref.shape, dtype=np.float64) for name, ref in self.reference.items()}
        for update in updates:
            for name, tensor in self.read(update.path):
                sums[name] += tensor.astype(np.float64) * float(update.num_examples)
        record = ArrayRecord()
        for name, expected in self.reference.items():
            record[name] = Array(np.asarray(sums.pop(name) / total).astype(expected.dtype))
        return record

    def as_record(self, update: SpooledUpdate) -> ArrayRecord:
        """The update as an ``ArrayRecord`` (for aggregators that need every value at once)."""
        return ArrayRecord({name: Array(np.array(tensor)) for name, tensor in self.read(update.path)})

    def close(self) -> None:
        """Delete the spool folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
