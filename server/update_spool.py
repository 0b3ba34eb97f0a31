"""Hold a round's accepted updates on disk, not in memory, and average them.

Each update is written as one flat file of raw tensor bytes (in the global
model's key order) as soon as it arrives and passes its checks; the message is
then dropped. After the round closes, the weighted mean is accumulated one
tensor at a time in float64 (memory: a few copies of one tensor plus the
result), in site-id order, so the result does not depend on the order replies
arrived in.

An update the round's norm rule bounds (:mod:`server.norm_bounds`) is rewritten
in place, scaled, before the round is aggregated: every aggregator then reads
the update as it counts.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.supercore.differential_privacy import compute_clip_model_update

CHUNK_ELEMENTS = 1 << 14  # elements averaged at a time (128 KiB of float64)


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
        self._count = 0

    def write_checked(self, arrays: ArrayRecord,
                      check: Callable[[str, np.ndarray], float]) -> tuple[Path, float]:
        """Decode ``arrays`` one tensor at a time, ``check`` it, append it to a new flat file.

        ``check(name, tensor)`` returns the tensor's squared norm contribution or
        raises; on any error the partial file is removed. Returns (file, L2 norm).
        """
        self._count += 1
        path = self.folder / f"{self._count:05d}.bin"
        total = 0.0
        try:
            with open(path, "wb") as handle:
                for name in self.reference:
                    values = arrays[name].numpy()
                    total += check(name, values)
                    handle.write(np.ascontiguousarray(values).data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, math.sqrt(total)

    def scale_to_bound(self, update: SpooledUpdate, *, bound: float) -> None:
        """Rewrite ``update`` so that its change to the global model has L2 norm ``bound`` (if above it).

        Uses Flower's own clipping (``compute_clip_model_update``, what its DP
        fixed-clipping strategy applies to each reply): ``global + delta * min(1,
        bound / ||delta||)``, with the norm recomputed by Flower in the model's
        dtype. Holds this one update in memory (a few copies), never the round's.
        """
        values = [np.array(tensor) for _, tensor in self.read(update.path)]
        compute_clip_model_update(param1=values, param2=list(self.reference.values()), clipping_norm=bound)
        with open(update.path, "wb") as handle:
            for value, expected in zip(values, self.reference.values(), strict=True):
                handle.write(np.ascontiguousarray(value, dtype=expected.dtype).data)

    def read(self, path: Path) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (name, tensor) of a spooled update, one tensor at a time."""
        offset = 0
        for name, expected in self.reference.items():
            yield name, self._read_tensor(path, expected, offset)
            offset += expected.nbytes

    def weighted_mean(self, updates: Sequence[SpooledUpdate]) -> ArrayRecord:
        """Example-weighted mean of ``updates``, summed in the order given (site-id order).

        Works tensor by tensor and chunk by chunk, reading slices of the update
        files: memory is the result plus a few chunks, whatever the number of updates.
        """
        total = float(sum(u.num_examples for u in updates))
        record = ArrayRecord()
        offset = 0
        for name, expected in self.reference.items():
            mean = np.empty(expected.size, dtype=expected.dtype)
            for start in range(0, expected.size, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, expected.size - start)
                acc = np.zeros(count, dtype=np.float64)
                scaled = np.empty(count, dtype=np.float64)
                for update in updates:
                    chunk = np.fromfile(update.path, dtype=expected.dtype, count=count,
                                        offset=offset + start * expected.itemsize)
                    np.multiply(chunk, float(update.num_examples), out=scaled, dtype=np.float64)
                    acc += scaled
                mean[start:start + count] = acc / total
            record[name] = Array(mean.reshape(expected.shape))
            del mean
            offset += expected.nbytes
        return record

    @staticmethod
    def _read_tensor(path: Path, expected: np.ndarray, offset: int) -> np.ndarray:
        values = np.fromfile(path, dtype=expected.dtype, count=expected.size, offset=offset)
        return values.reshape(expected.shape)

    def as_record(self, update: SpooledUpdate) -> ArrayRecord:
        """The update as an ``ArrayRecord`` (for aggregators that need every value at once)."""
        return ArrayRecord({name: Array(np.array(tensor)) for name, tensor in self.read(update.path)})

    def close(self) -> None:
        """Delete the spool folder."""
        shutil.rmtree(self.folder, ignore_errors=True)
