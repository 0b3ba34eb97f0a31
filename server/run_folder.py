"""The run folder: ``metrics.jsonl``, ``global_model.pt`` and ``summary.json``.

``metrics.jsonl`` holds one JSON object per site per round (``site`` is the
site id; with DP it includes the site's cumulative ``epsilon`` and this round's
``epsilon-round``) plus one per round with ``site = "global"`` (the weighted
aggregate and ``max-epsilon``, the largest cumulative epsilon of any site).
``summary.json`` has every site's final epsilon under ``epsilon``.
A site that refused or failed a phase has ``status`` and ``reason`` instead of
numbers for it. Every file is written atomically or appended line by line.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import append_line, atomic_write_json
from shared.model_file import save_model_file

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from server.site_replies import SortedReplies
    from shared.config import RunConfig

PHASE_KEYS = {
    "train": {"train-loss": "train-loss", "num-examples": "num-train-examples"},
    "evaluate": {"dice": "dice", "loss": "loss", "num-examples": "num-val-examples"},
}


class RunRecorder:
    """Collects per-site results of each round and writes the run folder.

    Parameters
    ----------
    run_dir : Path
        Folder to write into (created if missing).
    config : RunConfig
        The run's configuration, stored with the model and the summary.
    """

    def __init__(self, run_dir: Path, *, config: RunConfig) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.model_path = self.run_dir / "global_model.pt"
        self.rounds: dict[int, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
        self.global_rows: list[dict[str, Any]] = []
        self.started = time.time()

    def record_phase(self, server_round: int, phase: str, replies: SortedReplies) -> None:
        """Store one phase's (train/evaluate) per-site results for ``server_round``."""
        sites = self.rounds[server_round]
        for site, metrics in replies.site_metrics.items():
            row = sites[site]
            row[f"{phase}-status"] = "ok"
            for key, value in metrics.items():
                row[PHASE_KEYS[phase].get(key, key)] = value
        for outcome, reasons in (("refused", replies.refused), ("failed", replies.failed)):
            for site, reason in reasons.items():
                sites[site][f"{phase}-status"] = outcome
                sites[site][f"{phase}-reason"] = reason

    def end_round(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Write the round's metrics lines and the current global model; return the global row."""
        sites = self.rounds.get(server_round, {})
        for site in sorted(sites):
            self._append({"round": server_round, "site": site, **sites[site]})
        row = {"round": server_round, "site": "global", **aggregate_sites(sites)}
        self._append(row)
        self.global_rows.append(row)
        save_model_file(self.model_path, state_dict=dict(arrays.to_torch_state_dict()),
                        model_config=self.config.model_config(),
                        extra={"round": server_round, "run_config": self.config.to_mapping()})
        return row

    def finish(self) -> dict[str, Any]:
        """Write ``summary.json`` and return it."""
        per_site_final: dict[str, Any] = {}
        for server_round in sorted(self.rounds):
            for site, row in self.rounds[server_round].items():
                if "dice" in row:
                    per_site_final[site] = {"round": server_round, "dice": _json_float(row["dice"])}
        sites = sorted({s for sites in self.rounds.values() for s in sites})
        first = self.global_rows[0] if self.global_rows else {}
        last = self.global_rows[-1] if self.global_rows else {}
        summary = {
            "rounds": len(self.global_rows),
            "sites": sites,
            "first_round_dice": first.get("dice"),
            "final_dice": last.get("dice"),
            "final_loss": last.get("loss"),
            "per_site": per_site_final,
            "epsilon": final_epsilons(self.rounds, sites),
            "seconds": round(time.time() - self.started, 1),
            "model": self.model_path.name,
            "run_config": self.config.to_mapping(),
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _append(self, row: dict[str, Any]) -> None:
        clean = {k: _json_float(v) if isinstance(v, float) else v for k, v in row.items()}
        append_line(self.metrics_path, json.dumps(clean, sort_keys=True))


def final_epsilons(rounds: dict[int, dict[str, dict[str, Any]]], sites: list[str]) -> dict[str, Any]:
    """Each site's last reported cumulative epsilon, its delta and round (``None`` if it never sent one)."""
    final: dict[str, Any] = {site: None for site in sites}
    for server_round in sorted(rounds):
        for site, row in rounds[server_round].items():
            if "epsilon" in row:
                final[site] = {"epsilon": _json_float(row["epsilon"]), "delta": row.get("dp-delta"),
                               "round": server_round}
    return final


def aggregate_sites(sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Example-weighted means over the sites that answered, and outcome counts."""
    row: dict[str, Any] = {
        "dice": _weighted(sites, "dice", "num-val-examples"),
        "loss": _weighted(sites, "loss", "num-val-examples"),
        "train-loss": _weighted(sites, "train-loss", "num-train-examples"),
        "max-epsilon": max((float(r["epsilon"]) for r in sites.values() if "epsilon" in r), default=None),
    }
    for phase in ("train", "evaluate"):
        for outcome in ("ok", "refused", "failed"):
            row[f"sites-{phase}-{outcome}"] = sum(
                1 for r in sites.values() if r.get(f"{phase}-status") == outcome)
    return row


def _weighted(sites: dict[str, dict[str, Any]], key: str, weight_key: str) -> float | None:
    pairs = [(float(r[key]), float(r.get(weight_key, 1))) for r in sites.values()
             if key in r and not math.isnan(float(r[key]))]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else None


def _json_float(value: Any) -> Any:
    """JSON has no NaN: write ``null`` for a non-finite float."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
