"""Reading ``baselines.json``: the federated model against pooled and local-only baselines, per site.

The simulation harness writes the file (:mod:`simulations.baselines`); its
report and the operator's dashboard both read it through
:func:`comparison_rows`. JSON has no NaN, so a missing score is ``null``.
"""

from __future__ import annotations

import math
from typing import Any

BASELINES_FILE = "baselines.json"


def comparison_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per site: federated, personal (a ``local-norm`` run's global model with the site's own norm
    weights), pooled and local-only (the site's own model) Dice and HD95.

    For a held-out site, "local" is the mean over the sites' local models.
    """
    rows = []
    for site, fed in results["federated"].items():
        row = {"site": site, "holdout": site in results.get("holdout", []), "federated": fed}
        if site in results.get("personal", {}):
            row["personal"] = results["personal"][site]
        if "pooled" in results:
            row["pooled"] = results["pooled"][site]
        local = results.get("local", {})
        if site in local:
            row["local"] = local[site][site]
        elif local:
            row["local"] = {"dice": finite_mean([m[site]["dice"] for m in local.values()]),
                            "hd95": finite_mean([m[site]["hd95"] for m in local.values()])}
        rows.append(row)
    return rows


def finite_mean(values: list[float | None]) -> float:
    """Mean of the finite values (``None`` and NaN skipped); NaN when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else float("nan")
