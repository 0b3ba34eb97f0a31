"""FedAvg (McMahan et al. 2017): Flower's FedAvg with fedseg's site tracking."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from server.strategies.tracking import SiteTracking


class FedSegFedAvg(SiteTracking, FedAvg):
    """Example-weighted average of the accepted updates."""
