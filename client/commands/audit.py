"""``python -m client audit``: summarise what left this site, from its egress audit log.

Per run and round: bytes of model weights sent, whether the site trained,
evaluated, refused or had a reply blocked, and the privacy budget (epsilon)
reported as spent. A round of secure aggregation shows its training as
``masked`` (the masked vector left, never the weights) and counts the masked
vector's bytes apart from weights. Exit code 1 when a reply was blocked or a log line is
unreadable (something to look at), else 0.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from client.runtime.egress.audit_log import audit_log_path, read_entries
from client.runtime.site_config import SiteConfig
from shared.errors import ConfigError
from shared.protocol import NODE_DATALIST


@dataclass
class RoundTotals:
    """What left the site in one round of one run."""

    array_bytes: int = 0
    outcomes: dict[str, str] = field(default_factory=dict)  # message type -> sent / masked / refused / blocked


@dataclass
class RunTotals:
    """What left the site during one Flower run."""

    run_id: int
    server: str | None = None
    first_time: str = ""
    last_time: str = ""
    replies: int = 0
    array_bytes: int = 0
    masked_bytes: int = 0
    refusals: int = 0
    blocked: int = 0
    epsilon: float | None = None
    rounds: dict[int | None, RoundTotals] = field(default_factory=dict)

    @property
    def rounds_trained(self) -> list[int]:
        """Rounds in which this site sent a model update (plain or masked)."""
        return sorted(number for number, totals in self.rounds.items()
                      if number is not None and totals.outcomes.get("train") in ("sent", "masked"))


@dataclass
class AuditSummary:
    """Totals of one audit log, per run."""

    path: Path
    runs: dict[int, RunTotals] = field(default_factory=dict)
    unreadable_lines: list[int] = field(default_factory=list)

    @property
    def blocked(self) -> int:
        return sum(run.blocked for run in self.runs.values())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (``--json``)."""
        runs = {str(run_id): {**asdict(run), "rounds-trained": run.rounds_trained,
                              "rounds": {str(r): asdict(t) for r, t in run.rounds.items()}}
                for run_id, run in self.runs.items()}
        return {"path": str(self.path), "runs": runs, "unreadable_lines": self.unreadable_lines}


def summarise_audit_log(*, path: Path | str, run_id: int | None = None) -> AuditSummary:
    """Read the egress audit log at ``path``; totals per run (only ``run_id`` if given)."""
    summary = AuditSummary(path=Path(path))
    for number, entry in read_entries(path):
        if entry is None or not isinstance(entry.get("run-id"), int):
            summary.unreadable_lines.append(number)
            continue
        if run_id is not None and entry["run-id"] != run_id:
            continue
        run = summary.runs.setdefault(entry["run-id"], RunTotals(run_id=entry["run-id"]))
        _add_entry(run, entry)
    return summary


def _add_entry(run: RunTotals, entry: dict[str, Any]) -> None:
    run.replies += 1
    run.server = entry.get("server") or run.server
    run.first_time = run.first_time or str(entry.get("time", ""))
    run.last_time = str(entry.get("time", ""))
    sent_bytes = int(entry.get("array-bytes") or 0)
    run.array_bytes += sent_bytes
    outcome = "blocked" if entry.get("blocked") else "refused" if entry.get("refused") else "sent"
    run.blocked += outcome == "blocked"
    run.refusals += outcome == "refused"
    if isinstance(entry.get("epsilon"), int | float):
        run.epsilon = max(run.epsilon or 0.0, float(entry["epsilon"]))
    totals = run.rounds.setdefault(entry.get("round"), RoundTotals())
    totals.array_bytes += sent_bytes
    stage = entry.get("secagg-stage")
    if stage is not None and outcome == "sent":  # a protocol step: only the masking step stands for the round
        masked = (entry.get("secagg") or {}).get("masked_params")
        run.masked_bytes += int(masked.get("bytes") or 0) if isinstance(masked, dict) else 0
        if stage != "collect_masked_vectors":
            totals.outcomes.setdefault(str(entry.get("message-type")), "keys")
            return
        outcome = "masked"
    totals.outcomes[str(entry.get("message-type"))] = outcome


def format_summary(summary: AuditSummary) -> str:
    """The human-readable report ``python -m client audit`` prints."""
    runs = summary.runs.values()
    replies = sum(r.replies for r in runs)
    header = (f"egress audit log {summary.path}: {replies} replies in {len(runs)} run(s), "
              f"{_bytes(sum(r.array_bytes for r in runs))} of model weights sent, "
              f"{_masked(sum(r.masked_bytes for r in runs))}"
              f"{sum(r.refusals for r in runs)} refusal(s), {summary.blocked} blocked")
    lines = [header]
    for run in runs:
        lines += ["", *_format_run(run)]
    if summary.blocked:
        lines.append(f"\nWARNING: {summary.blocked} reply(ies) were BLOCKED by the egress guard "
                     "(see 'blocked-reason' in the log and the node's log)")
    if summary.unreadable_lines:
        lines.append(f"\nWARNING: unreadable log line(s): {summary.unreadable_lines[:20]}")
    return "\n".join(lines)


def _format_run(run: RunTotals) -> list[str]:
    server = run.server or "unknown (simulation or not set)"
    lines = [f"run {run.run_id}  server {server}  {run.first_time} .. {run.last_time}",
             f"  {'round':>5}  {'train':<8} {'evaluate':<8} {'weights sent':>14}"]
    for number, totals in sorted(run.rounds.items(), key=lambda item: (item[0] is None, item[0] or 0)):
        train, evaluate = totals.outcomes.get("train", "-"), totals.outcomes.get("evaluate", "-")
        shown = number if number is not None else "?"
        lines.append(f"  {shown:>5}  {train:<8} {evaluate:<8} {_bytes(totals.array_bytes):>14}")
    epsilon = "not reported" if run.epsilon is None else f"{run.epsilon:.4g}"
    lines.append(f"  total: {len(run.rounds_trained)} round(s) trained, "
                 f"{_bytes(run.array_bytes)} of weights, epsilon spent {epsilon}, "
                 f"{run.refusals} refusal(s), {run.blocked} blocked")
    return lines


def _masked(count: int) -> str:
    return f"{_bytes(count)} of masked vectors (secure aggregation), " if count else ""


def _bytes(count: int) -> str:
    return f"{count:,} B" if count < 1024 else f"{count:,} B ({count / 2**20:.2f} MiB)"


def resolve_log_path(*, state_dir: str | None, datalist: str | None) -> Path:
    """The audit log of ``--state-dir``, else of the default state directory of ``--datalist``."""
    if state_dir:
        return audit_log_path(Path(state_dir).expanduser())
    if datalist:
        return audit_log_path(SiteConfig.from_node_config({NODE_DATALIST: datalist}).state_dir)
    raise ConfigError("give '--state-dir' (the node config 'state-dir') or '--datalist' "
                      "(if the node runs with the default state directory beside it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", help="the site's state directory (node config 'state-dir')")
    parser.add_argument("--datalist", help="the site's datalist, to find the default state directory "
                                           "(<datalist folder>/.fedseg-state) when 'state-dir' is not set")
    parser.add_argument("--run", type=int, default=None, help="only this Flower run id")
    parser.add_argument("--json", action="store_true", help="print the totals as JSON")


def run(args: argparse.Namespace) -> int:
    summary = summarise_audit_log(path=resolve_log_path(state_dir=args.state_dir, datalist=args.datalist),
                                  run_id=args.run)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else format_summary(summary))
    return 1 if summary.blocked or summary.unreadable_lines else 0
