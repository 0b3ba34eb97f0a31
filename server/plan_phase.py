"""Before round 1: fix the run's plan (from the sites' fingerprints, the run config or a file), write plan.json.

With run config ``plan = "auto"`` every connected site is asked for its data
fingerprint (a ``query.fingerprint`` message; the site replies with aggregates
only, through its egress guard). Sites that refuse, fail or do not answer in
``round-timeout`` are recorded in ``plan.json`` and the plan is derived from
the others; with no fingerprint at all the run stops with a clear error. With
DP, each site's expected noise against its signal is checked
(:mod:`shared.dp_advice`) and a site that cannot learn is warned before round 1.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from server.dp_sizing import site_dp_advice
from server.planning import derive_plan, plan_notes
from server.site_replies import failure_reason, refused_because, site_of
from shared.atomic import atomic_write_json
from shared.errors import ConfigError
from shared.fingerprint import Fingerprint
from shared.plan import Plan, read_plan_file, resolve_plan_setting
from shared.protocol import CONFIG, FINGERPRINT, FINGERPRINT_QUERY, SERVER_ROUND

if TYPE_CHECKING:
    from server.polling_grid import PollingGrid
    from shared.config import RunConfig

LOG = logging.getLogger("fedseg.server")
PLAN_FILE = "plan.json"


def establish_plan(grid: PollingGrid, config: RunConfig, *, run_dir: Path, known_sites: dict[int, str],
                   say: Any = print) -> Plan:
    """The run's plan (see the module docstring); ``plan.json`` is written to ``run_dir``."""
    fixed = resolve_plan_setting(config)
    if fixed is not None:
        write_plan_file(run_dir, fixed, sites={})
        say(f"[fedseg] plan: {describe(fixed)} ({fixed.source})")
        return fixed
    fingerprints, outcomes = collect_fingerprints(grid, config, known_sites=known_sites)
    plan, pooled = derive_plan(config, fingerprints)
    sites: dict[str, dict[str, Any]] = {site: {"status": status, "reason": reason}
                                        for site, (status, reason) in outcomes.items()}
    for site, fingerprint in fingerprints.items():
        sites[site] = {"status": "ok", "cases": fingerprint.cases}
        advice = site_dp_advice(config, plan, fingerprint)
        if advice is not None:
            sites[site]["dp"] = advice.to_dict()
            warning = advice.warning(site)
            if warning:
                LOG.warning(warning)
                say(f"[fedseg] WARNING: {warning}")
    notes = plan_notes(config, fingerprints, plan)
    write_plan_file(run_dir, plan, sites=sites, pooled=pooled.to_dict(), notes=notes)
    say(f"[fedseg] plan from {len(fingerprints)} site fingerprint(s): {describe(plan)}")
    for note in notes:
        say(f"[fedseg]   note: {note}")
    for site, (status, reason) in sorted(outcomes.items()):
        say(f"[fedseg]   {site} {status} fingerprint: {reason}")
    return plan


def collect_fingerprints(grid: PollingGrid, config: RunConfig, *, known_sites: dict[int, str]
                         ) -> tuple[dict[str, Fingerprint], dict[str, tuple[str, str]]]:
    """Ask every connected node for its fingerprint; return (fingerprints, {site: (status, reason)} of the rest)."""
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    _, node_ids = sample_nodes(grid, config.min_available_nodes, 0)
    messages = [Message(content=RecordDict({CONFIG: ConfigRecord({SERVER_ROUND: 0})}),
                        message_type=FINGERPRINT_QUERY, dst_node_id=node_id, group_id="plan")
                for node_id in sorted(node_ids)]
    fingerprints: dict[str, Fingerprint] = {}
    outcomes: dict[str, tuple[str, str]] = {}

    def take(reply: Message) -> None:
        site = site_of(reply, known_sites)
        if reply.has_error():
            outcomes[site] = ("failed", failure_reason(str(reply.error.reason)))
        elif (refusal := refused_because(reply)) is not None:
            outcomes[site] = ("refused", refusal)
        elif FINGERPRINT not in reply.content.metric_records:
            outcomes[site] = ("rejected", "the reply carries no fingerprint")
        else:
            try:
                fingerprints[site] = Fingerprint.from_metrics(dict(reply.content.metric_records[FINGERPRINT]),
                                                              source=f"site {site}")
            except ConfigError as exc:
                outcomes[site] = ("rejected", str(exc))

    for node_id in grid.exchange(messages, timeout=config.round_timeout, on_reply=take):
        outcomes[known_sites.get(node_id, f"node-{node_id}")] = (
            "failed", f"no reply within round-timeout ({config.round_timeout:g} s)")
    if not fingerprints:
        raise ConfigError("run config key 'plan' = 'auto': no site sent a usable fingerprint "
                          f"({'; '.join(f'{s}: {r}' for s, (_, r) in sorted(outcomes.items())) or 'no site'}), "
                          "so no plan can be derived")
    return fingerprints, outcomes


def write_plan_file(run_dir: Path, plan: Plan, *, sites: dict[str, Any], pooled: dict[str, Any] | None = None,
                    notes: list[str] | None = None) -> Path:
    """Write ``plan.json``: the plan, the pooled fingerprint it came from, each site's outcome and notes
    on the plan's fit to the data (atomically)."""
    path = Path(run_dir) / PLAN_FILE
    atomic_write_json(path, {"plan": plan.to_dict(), "pooled-fingerprint": pooled, "sites": sites,
                             "notes": notes or []})
    return path


def keep_or_write_plan_file(run_dir: Path, plan: Plan) -> Path:
    """On resume: keep ``plan.json`` (with its sites and notes) if it holds ``plan``, else write ``plan`` alone."""
    path = Path(run_dir) / PLAN_FILE
    try:
        if read_plan_file(path) == plan:
            return path
    except ConfigError:  # missing, unreadable or another plan
        pass
    return write_plan_file(run_dir, plan, sites={})


def describe(plan: Plan) -> str:
    """One line: network, spacing, patch, batch, steps."""
    spacing = "x".join(f"{s:g}" for s in plan.target_spacing)
    patch = "x".join(map(str, plan.patch_size))
    return (f"{plan.model} {plan.spatial_dims}D, {len(plan.channels)} levels ({plan.channels[0]}-{plan.channels[-1]} "
            f"filters), spacing {spacing} mm, patch {patch}, batch {plan.batch_size}, {plan.local_steps} steps/round, "
            f"slicing {plan.slicing if plan.spatial_dims == 2 else '-'}")
