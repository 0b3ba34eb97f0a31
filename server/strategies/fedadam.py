"""FedAdam: Adaptive server optimiser Adam (Reddi et al. 2021) on the averaged update; its moments are checkpointed."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from server.strategies.server_optimiser import ServerOptimiserState
from server.strategies.tracking import SiteTracking


class FedSegFedAdam(ServerOptimiserState, SiteTracking, FedAdam):
    """Flower's FedAdam with fedseg's site tracking and checkpointable moments."""
