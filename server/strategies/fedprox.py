"""FedProx (Li et al. 2020): FedAvg on the server; clients add (mu/2)||w - w_global||^2.

Flower's FedProx sends ``proximal-mu`` in the train ConfigRecord;
``client.training.train_local`` adds the proximal term when it is > 0.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedProx

from server.strategies.tracking import SiteTracking


class FedSegFedProx(SiteTracking, FedProx):
    """Flower's FedProx with fedseg's site tracking."""
