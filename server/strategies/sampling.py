"""Reproducible node sampling: Flower's sampling, seeded from (seed, round, phase), over a stable node order."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

from server.polling_grid import sampling_order

if TYPE_CHECKING:
    from flwr.serverapp import Grid


class SortedNodes:
    """A grid view listing node ids in an order that is the same every run, so seeded sampling is reproducible.

    See :func:`server.polling_grid.sampling_order`.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> list[int]:
        return sampling_order(self._grid, self._grid.get_node_ids())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class seeded_sampling:
    """Seed Python's ``random`` (Flower samples with it) from (seed, round, phase); restore after."""

    def __init__(self, seed: int, server_round: int, phase: str) -> None:
        self.key = f"{seed}:{server_round}:{phase}"

    def __enter__(self) -> None:
        self.saved = random.getstate()
        random.seed(self.key)

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved)
