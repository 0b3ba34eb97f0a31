"""Checkpointable state of Flower's FedOpt family (FedAdam, FedYogi): the moments m_t and v_t."""

from __future__ import annotations

from typing import Any

import numpy as np

MOMENTS = ("m_t", "v_t")


class ServerOptimiserState:
    """Mixin exposing FedOpt's moment estimates for checkpoints.

    ``current_arrays`` is not saved: Flower sets it from the global model in
    ``configure_train`` at the start of every round.
    """

    post_processes_mean = True

    def strategy_state(self) -> dict[str, dict[str, np.ndarray]]:
        """The first and second moment estimates (empty before the first aggregation)."""
        state: dict[str, Any] = super().strategy_state()  # type: ignore[misc]
        for name in MOMENTS:
            moments = getattr(self, name)
            if moments:
                state[name] = {k: np.array(v, copy=True) for k, v in moments.items()}
        return state

    def load_strategy_state(self, state: dict[str, dict[str, np.ndarray]]) -> None:
        """Restore the moments saved by :meth:`strategy_state`."""
        super().load_strategy_state(state)  # type: ignore[misc]
        for name in MOMENTS:
            moments = state.get(name)
            setattr(self, name, {k: np.asarray(v) for k, v in moments.items()} if moments else None)
