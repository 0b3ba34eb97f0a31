"""What fedseg code may ask of a Grid beyond Flower's ``Grid`` (declared, not probed with ``getattr``).

In a simulation started by the harness, Flower's in-process ``InMemoryGrid``
gains both (entries ``grid-wait-for-replies`` and ``grid-sampling-order`` of
:mod:`.registry`); any other Grid (a deployment's, or stock Flower when the
gate refused) has neither, and callers fall back to sleeping and id order.
Ask with :func:`offers`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, TypeGuard, TypeVar, runtime_checkable

P = TypeVar("P")


@runtime_checkable
class WaitsForReplies(Protocol):
    """A Grid that can wait for the next stored reply instead of a fixed sleep."""

    def wait_for_replies(self, timeout: float) -> None:
        """Return once a reply was stored since the last call, or after ``timeout`` s."""


@runtime_checkable
class OrdersForSampling(Protocol):
    """A Grid that lists node ids in an order that stays the same from run to run."""

    def sampling_order(self, node_ids: Iterable[int]) -> list[int]:
        """``node_ids`` in a run-independent order (virtual nodes: by the partition each serves)."""


def offers(grid: object, protocol: type[P]) -> TypeGuard[P]:
    """Whether ``grid`` has every method of ``protocol`` now.

    Not ``isinstance``: for a Protocol of methods only, that answer is cached
    per class by :mod:`abc`, and these methods are added to (and, by
    :func:`.gate.restore`, taken from) Flower's class at run time.
    """
    members = [name for name, value in vars(protocol).items() if not name.startswith("_") and callable(value)]
    return all(callable(getattr(grid, name, None)) for name in members)
