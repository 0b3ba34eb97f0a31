"""What the egress guard's checks share: its error, the description of a parameter, and how it names things."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import FedSegError

_SHOWN_NAME_CHARS = 60


class EgressBlocked(FedSegError):
    """A reply carries something the egress guard does not allow; it must not leave."""


@dataclass(frozen=True)
class ArraySpec:
    """Name-independent description of one model parameter: shape and numpy dtype name."""

    shape: tuple[int, ...]
    dtype: str


def show(name: object) -> str:
    """Quote a name for a message, cut short: a blocked key must not smuggle data out in the reason."""
    text = str(name)
    return repr(text if len(text) <= _SHOWN_NAME_CHARS else text[:_SHOWN_NAME_CHARS] + "...")
