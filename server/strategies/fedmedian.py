"""FedMedian (Yin et al. 2018): coordinate-wise median, robust to a minority of bad updates.

A median needs every accepted update at once, so this strategy holds them all
in memory while aggregating (the mean strategies do not).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from server.strategies.tracking import SiteTracking


class FedSegFedMedian(SiteTracking, FedMedian):
    """Flower's FedMedian with fedseg's site tracking."""

    mean_aggregation = False
