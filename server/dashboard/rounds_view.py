"""The dashboard's tables of rounds and of sites, from the rows of ``metrics.jsonl``.

A site's row in a round exists when the site was sampled in it. Its
``train-status``/``evaluate-status`` is ``ok``, ``refused`` (the site declined,
with its reason), ``rejected`` (the server left its update out, with the
reason) or ``failed``; a failure whose reason starts with
:data:`TIMEOUT_REASON` is a site that did not answer within ``round-timeout``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

PHASES = ("train", "evaluate")
TIMEOUT_REASON = "no reply within"
OUTCOMES = ("refused", "rejected", "timed out", "failed")


@dataclass
class RoundView:
    """One round: how many sites were sampled and what became of them."""

    round: int
    sampled: int = 0
    answered: int = 0
    trained: int = 0
    evaluated: int = 0
    #: outcome -> ["site (phase): reason", ...] for refused, rejected, timed out and failed sites
    outcomes: dict[str, list[str]] = field(default_factory=lambda: {outcome: [] for outcome in OUTCOMES})
    bounded: list[str] = field(default_factory=list)
    dice: float | None = None
    seconds: float | None = None
    ended_at: float | None = None


@dataclass
class SiteView:
    """One site over the run: its latest results, privacy spend and contact."""

    site: str
    sampled: int = 0
    trained: int = 0
    status: str = "not sampled yet"
    reason: str = ""
    last_contact: float | None = None
    dice: float | None = None
    hd95: float | None = None
    epsilon: float | None = None
    budget: float | None = None


def outcome(row: dict[str, Any], *, phase: str) -> str | None:
    """``ok``, ``refused``, ``rejected``, ``timed out``, ``failed`` or None (phase not asked)."""
    status = row.get(f"{phase}-status")
    if status == "failed" and str(row.get(f"{phase}-reason", "")).startswith(TIMEOUT_REASON):
        return "timed out"
    return status


def by_round(rows: Iterable[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    """``{round: {site: row}}``, the ``global`` row included."""
    rounds: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for row in rows:
        rounds[row["round"]][row["site"]] = row
    return dict(sorted(rounds.items()))


def round_views(rows: Iterable[dict[str, Any]]) -> list[RoundView]:
    """One :class:`RoundView` per round, the newest first."""
    views = []
    for number, sites in by_round(rows).items():
        view = RoundView(round=number)
        for site, row in sorted(sites.items()):
            if site != "global":
                _count_site(view, site, row)
        overall = sites.get("global", {})
        view.dice, view.seconds, view.ended_at = (overall.get("dice"), overall.get("round-seconds"),
                                                  overall.get("ended-at"))
        views.append(view)
    return views[::-1]


def _count_site(view: RoundView, site: str, row: dict[str, Any]) -> None:
    outcomes = {phase: outcome(row, phase=phase) for phase in PHASES}
    view.sampled += 1
    view.answered += "timed out" not in outcomes.values()
    view.trained += outcomes["train"] == "ok"
    view.evaluated += outcomes["evaluate"] == "ok"
    for (result, reason), phases in _phases_by_outcome(row, outcomes).items():
        view.outcomes[result].append(f"{site} ({', '.join(phases)}): {reason}")
    if "update-scale" in row:
        view.bounded.append(f"{site}: {row.get('train-note', '')}")


def _phases_by_outcome(row: dict[str, Any], outcomes: dict[str, str | None]) -> dict[tuple[str, str], list[str]]:
    """``{(outcome, reason): [phase, ...]}`` of the phases that went wrong (one line when both did alike)."""
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for phase, result in outcomes.items():
        if result in OUTCOMES:
            grouped[(result, str(row.get(f"{phase}-reason", "no reason given")))].append(phase)
    return grouped


def site_views(rows: Iterable[dict[str, Any]], *, plan_sites: dict[str, Any] | None = None) -> list[SiteView]:
    """One :class:`SiteView` per site (every site seen in ``metrics.jsonl`` or ``plan.json``)."""
    rounds = by_round(rows)
    sites = {site for round_sites in rounds.values() for site in round_sites if site != "global"}
    sites |= set(plan_sites or {})
    views = []
    for site in sorted(sites):
        view = SiteView(site=site)
        for round_sites in rounds.values():
            if site in round_sites:
                _follow_site(view, round_sites[site], ended_at=round_sites.get("global", {}).get("ended-at"))
        view.budget = privacy_budget(site, rows=[r[site] for r in rounds.values() if site in r],
                                     plan_site=(plan_sites or {}).get(site))
        if view.sampled == 0 and plan_sites and site in plan_sites:
            view.status = f"fingerprint {plan_sites[site].get('status', '?')}"
            view.reason = str(plan_sites[site].get("reason", ""))
        views.append(view)
    return views


def _follow_site(view: SiteView, row: dict[str, Any], *, ended_at: float | None) -> None:
    """Fold one round's row into the site's view (rounds come in order)."""
    outcomes = [(phase, outcome(row, phase=phase)) for phase in PHASES if outcome(row, phase=phase) is not None]
    view.sampled += 1
    view.trained += outcome(row, phase="train") == "ok"
    bad = [(phase, result) for phase, result in outcomes if result != "ok"]
    view.status = ", ".join(f"{result} ({phase})" for phase, result in bad) if bad else "ok"
    view.reason = "; ".join(dict.fromkeys(str(row.get(f"{phase}-reason", "")) for phase, _ in bad))
    if any(result != "timed out" for _, result in outcomes):
        view.last_contact = ended_at
    for key in ("dice", "hd95", "epsilon"):
        if isinstance(row.get(key), (int, float)):
            setattr(view, key, float(row[key]))


def privacy_budget(site: str, *, rows: list[dict[str, Any]], plan_site: dict[str, Any] | None) -> float | None:
    """The site's total budget (node config ``max-epsilon``) as far as the run folder tells it.

    The site states the epsilon it has left in its fingerprint (``plan.json``);
    the ledger may already hold spend from earlier runs, which the first DP
    round's cumulative ``epsilon`` minus its ``epsilon-round`` reveals.
    """
    left = ((plan_site or {}).get("dp") or {}).get("epsilon")
    if not isinstance(left, (int, float)):
        return None
    first = next((row for row in rows if isinstance(row.get("epsilon"), (int, float))), None)
    spent_before = 0.0 if first is None else float(first["epsilon"]) - float(first.get("epsilon-round", 0.0))
    return float(left) + max(spent_before, 0.0)
