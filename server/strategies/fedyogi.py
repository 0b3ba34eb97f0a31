"""FedYogi: Adaptive server optimiser Yogi (Reddi et al. 2021) on the averaged update; its moments are checkpointed."""

from __future__ import annotations

from flwr.serverapp.strategy import FedYogi

from server.strategies.server_optimiser import ServerOptimiserState
from server.strategies.tracking import SiteTracking


class FedSegFedYogi(ServerOptimiserState, SiteTracking, FedYogi):
    """Flower's FedYogi with fedseg's site tracking and checkpointable moments."""
