"""Checks on one site's model update before it may reach the aggregate.

An update is rejected when its weights do not have exactly the names, shapes
and dtypes of the global model that was sent, or when it holds NaN or Inf: such
an update is broken, whoever sent it. Each check raises :class:`UpdateRejected`
with a reason that the server logs and writes to ``metrics.jsonl``. The norm of
an update is judged against the whole round, once it closes
(:mod:`server.norm_bounds`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from shared.errors import FedSegError

if TYPE_CHECKING:
    from flwr.app import ArrayRecord


class UpdateRejected(FedSegError):
    """A site's update failed a check and is left out of the aggregate."""


def reference_arrays(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """The global model sent this round, as numpy arrays by name."""
    return {name: array.numpy() for name, array in arrays.items()}


def check_layout(update: ArrayRecord, reference: Mapping[str, np.ndarray]) -> None:
    """Raise :class:`UpdateRejected` unless names, shapes and dtypes match ``reference``."""
    missing = sorted(set(reference) - set(update))
    unexpected = sorted(set(update) - set(reference))
    if missing or unexpected:
        raise UpdateRejected(f"wrong keys: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, expected in reference.items():
        array = update[name]
        if tuple(array.shape) != expected.shape:
            raise UpdateRejected(f"wrong shape for '{name}': {tuple(array.shape)}, expected {expected.shape}")
        if np.dtype(array.dtype) != expected.dtype:
            raise UpdateRejected(f"wrong dtype for '{name}': {array.dtype}, expected {expected.dtype}")


def update_norm(update: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> float:
    """L2 norm of ``update - reference`` over all tensors; raise on NaN/Inf weights."""
    return math.sqrt(sum(tensor_delta_norm_sq(name, update[name], ref) for name, ref in reference.items()))


def tensor_delta_norm_sq(name: str, values: np.ndarray, reference: np.ndarray) -> float:
    """Squared L2 norm of one tensor's change; raise :class:`UpdateRejected` on NaN/Inf."""
    delta = values.astype(np.float64)
    delta -= reference
    squared = float(np.einsum("i,i->", delta.ravel(), delta.ravel()))  # no BLAS threads: faster here
    if not math.isfinite(squared):  # any NaN/Inf weight makes the sum NaN/Inf (float32 cannot overflow it)
        raise UpdateRejected(f"non-finite values (NaN or Inf) in '{name}'")
    return squared
