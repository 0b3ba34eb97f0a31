"""The run folder: ``metrics.jsonl``, ``global_model.pt`` and ``summary.json``.

``metrics.jsonl`` holds one JSON object per site per round (``site`` is the
site id; with DP it includes the site's cumulative ``epsilon`` and this round's
``epsilon-round``) plus one per round with ``site = "global"`` (the weighted
aggregate and ``max-epsilon``, the largest cumulative epsilon of any site).
With hospital-level DP (run config ``dp-level``) the global row also has
``site-epsilon`` (cumulative, at ``site-dp-delta``), ``site-dp-noise-std`` and
``site-dp-sampled``. ``summary.json`` has every site's final epsilon under
``epsilon`` and hospital-level DP's under ``site_dp``, and under ``stopped`` why the run ended early (None: it did not).
A site that refused or failed a phase has ``status`` and ``reason`` instead of
numbers for it. A site whose update was scaled down to the round's norm bound
keeps ``train-status`` "ok" and has ``update-bound``, ``update-scale`` and
``train-note`` (every checked update has ``update-norm``); the global row counts
those sites in ``sites-train-bounded``. Every file is written atomically or
appended line by line.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import append_lines, atomic_write, atomic_write_json
from shared.model_file import save_model_file, weights_digest
from shared.protocol import DICE, LOSS, NUM_EXAMPLES, TRAIN_LOSS

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

    from server.site_replies import SortedReplies
    from shared.config import RunConfig
    from shared.plan import Plan

#: Reply metric -> ``metrics.jsonl`` column, per phase (other metrics keep their names).
PHASE_KEYS = {
    "train": {TRAIN_LOSS: "train-loss", NUM_EXAMPLES: "num-train-examples"},
    "evaluate": {DICE: "dice", LOSS: "loss", NUM_EXAMPLES: "num-val-examples"},
}


class RunRecorder:
    """Collects per-site results of each round and writes the run folder.

    Parameters
    ----------
    run_dir : Path
        Folder to write into (created if missing).
    config : RunConfig
        The run's configuration, stored with the model and the summary.
    plan : Plan, optional
        The run's plan (the network and preprocessing stored with the model);
        set it here or later, before the first round ends.
    """

    def __init__(self, run_dir: Path, *, config: RunConfig, plan: Plan | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config = config
        #: The run's plan, set once it is known (before round 1).
        self.plan = plan
        #: Where the run started (run config ``initial-model``: path, kind, sha256); None: a fresh model.
        self.initial_model: dict[str, str] | None = None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.model_path = self.run_dir / "global_model.pt"
        self.rounds: dict[int, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
        self.global_rows: list[dict[str, Any]] = []
        self.written_rows: list[dict[str, Any]] = []
        #: Server-side figures of a round for its global row (e.g. hospital-level DP's epsilon).
        self.round_notes: dict[int, dict[str, Any]] = {}
        #: Why the run ended before its last round (``summary.json`` ``stopped``); None: it ran every round.
        self.stopped: str | None = None
        self.started = time.time()
        self.round_started = time.monotonic()

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Continue a resumed run: ``metrics.jsonl`` becomes exactly ``rows`` (atomically)."""
        self.written_rows = [dict(row) for row in rows]
        self.global_rows = [row for row in self.written_rows if row["site"] == "global"]
        self.rounds.clear()
        for row in self.written_rows:
            if row["site"] != "global":
                self.rounds[row["round"]][row["site"]] = {
                    k: v for k, v in row.items() if k not in ("round", "site")}
        payload = "".join(json.dumps(row, sort_keys=True) + "\n" for row in self.written_rows).encode()
        atomic_write(self.metrics_path, lambda handle: handle.write(payload))

    def record_phase(self, server_round: int, phase: str, replies: SortedReplies) -> None:
        """Store one phase's (train/evaluate) per-site results for ``server_round``."""
        sites = self.rounds[server_round]
        for site, metrics in replies.site_metrics.items():
            row = sites[site]
            row[f"{phase}-status"] = "ok"
            for key, value in metrics.items():
                row[PHASE_KEYS[phase].get(key, key)] = value
        outcomes = (("refused", replies.refused), ("failed", replies.failed), ("rejected", replies.rejected))
        for outcome, reasons in outcomes:
            for site, reason in reasons.items():
                sites[site][f"{phase}-status"] = outcome
                sites[site][f"{phase}-reason"] = reason
        for site, check_fields in replies.check_fields.items():
            sites[site].update(check_fields)

    def name_nodes(self, server_round: int, known_sites: dict[int, str]) -> None:
        """Re-file rows kept as ``node-<id>`` (a node that failed before its site id was known)
        under the site id learned since."""
        sites = self.rounds.get(server_round, {})
        for node_id, site in known_sites.items():
            placeholder = f"node-{node_id}"
            if placeholder in sites and placeholder != site:
                merged = sites.pop(placeholder)
                merged.update(sites.get(site, {}))
                sites[site] = merged

    def note_round(self, server_round: int, values: dict[str, Any]) -> None:
        """Add server-side figures to round ``server_round``'s global row."""
        self.round_notes.setdefault(server_round, {}).update(values)

    def end_round(self, server_round: int, arrays: ArrayRecord) -> dict[str, Any]:
        """Write the round's metrics lines and the current global model; return the global row."""
        import torch  # noqa: F401  (ArrayRecord.to_torch_state_dict needs torch imported)

        sites = self.rounds.get(server_round, {})
        state_dict = dict(arrays.to_torch_state_dict())
        now = time.monotonic()
        row = {"round": server_round, "site": "global", **aggregate_sites(sites),
               **self.round_notes.pop(server_round, {}), "weights-sha256": weights_digest(state_dict), "round-seconds": round(now - self.round_started, 3),
               "ended-at": round(time.time(), 3)}
        self.round_started = now
        self._append([{"round": server_round, "site": site, **sites[site]} for site in sorted(sites)] + [row])
        self.global_rows.append(row)
        if self.plan is None:
            raise RuntimeError("RunRecorder.plan must be set before a round ends")
        save_model_file(self.model_path, state_dict=state_dict, model_config=self.plan.model_config(),
                        extra={"round": server_round, "run_config": self.config.to_mapping(),
                               "plan": self.plan.to_dict(), "initial_model": self.initial_model})
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
            "site_dp": site_dp_summary(self.global_rows),
            "seconds": round(time.time() - self.started, 1),
            "model": self.model_path.name,
            "run_config": self.config.to_mapping(),
            "initial_model": self.initial_model,
            "stopped": self.stopped,
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary

    def _append(self, rows: list[dict[str, Any]]) -> None:
        """Append a round's rows to ``metrics.jsonl`` with one flush to disk."""
        clean = [{k: _json_float(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
        self.written_rows.extend(clean)
        append_lines(self.metrics_path, [json.dumps(row, sort_keys=True) for row in clean])


def final_epsilons(rounds: dict[int, dict[str, dict[str, Any]]], sites: list[str]) -> dict[str, Any]:
    """Each site's last reported cumulative epsilon, its delta and round (``None`` if it never sent one)."""
    final: dict[str, Any] = {site: None for site in sites}
    for server_round in sorted(rounds):
        for site, row in rounds[server_round].items():
            if "epsilon" in row:
                final[site] = {"epsilon": _json_float(row["epsilon"]), "delta": row.get("dp-delta"),
                               "round": server_round}
    return final


def site_dp_summary(global_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Hospital-level DP at the end of the run: epsilon over every released round, at its delta (None: off)."""
    released = [row for row in global_rows if "site-epsilon" in row]
    if not released:
        return None
    last = released[-1]
    return {"epsilon": last["site-epsilon"], "delta": last["site-dp-delta"], "rounds": len(released)}


def aggregate_sites(sites: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Example-weighted means over the sites that answered, and outcome counts."""
    evaluation_keys = {"dice", "loss", "hd95"} | {  # a site's interval is its own: no mean over sites
        key for r in sites.values() for key in r
        if key.startswith(("dice-class-", "hd95-class-")) and not key.endswith(("-ci-low", "-ci-high"))}
    row: dict[str, Any] = {key: _weighted(sites, key, "num-val-examples") for key in sorted(evaluation_keys)}
    row["train-loss"] = _weighted(sites, "train-loss", "num-train-examples")
    row["max-epsilon"] = max((float(r["epsilon"]) for r in sites.values() if "epsilon" in r), default=None)
    for phase in ("train", "evaluate"):
        for outcome in ("ok", "refused", "failed", "rejected"):
            row[f"sites-{phase}-{outcome}"] = sum(
                1 for r in sites.values() if r.get(f"{phase}-status") == outcome)
    # bounded updates were aggregated (status "ok"), scaled down: counted apart, not instead
    row["sites-train-bounded"] = sum(
        1 for r in sites.values() if r.get("train-status") == "ok" and "update-scale" in r)
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
