"""Trimmed mean (Yin et al. 2018): drop the largest and smallest values per coordinate, average the rest.

Run config ``trim-fraction`` is the fraction cut at each end (Flower's ``beta``).
Like the median, it needs every accepted update in memory at once.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg

from server.strategies.tracking import SiteTracking


class FedSegFedTrimmedAvg(SiteTracking, FedTrimmedAvg):
    """Flower's FedTrimmedAvg with fedseg's site tracking."""

    mean_aggregation = False
