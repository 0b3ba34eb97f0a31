"""Every reply of the ClientApp leaves through :func:`send_reply`: egress guard, audit log, then the reply.

A reply the guard blocks, or one the audit log cannot record, is replaced by a
refusal (:func:`refusal_content`): a normal reply with ``refused = 1`` and a
short reason whose file paths are cut to base names.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.runtime.egress.audit_log import AuditLogError, append_entry, make_entry
from client.runtime.egress.guard import EgressBlocked, check_reply, expected_parameter_specs
from client.runtime.secagg import SecureStep
from client.runtime.site_config import SiteConfig
from shared.plan import Plan
from shared.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    NODE_STATE_DIR,
    NODE_SUPERLINK,
    REASON,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    SITE_KEY_LIMITS,
    refusal_metrics,
)

LOG = logging.getLogger("fedseg.client")
MAX_REASON_CHARS = SITE_KEY_LIMITS[REASON]


def refusal_content(msg: Message, site: SiteConfig | None, reason: str) -> RecordDict:
    """A reply content that declines this round with a short, loggable reason.

    The site's log keeps the full reason; what is sent names files by their
    base name only, so folder names (often patient or study identifiers) stay
    at the site.
    """
    LOG.error("site %s refuses %s: %s", site_label(site), msg.metadata.message_type, reason)
    reason = strip_directories(reason)[:MAX_REASON_CHARS]
    return RecordDict({
        METRICS: MetricRecord(refusal_metrics()),
        SITE: ConfigRecord({SITE_ID: site_label(site), REASON: reason}),
    })


_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[/\\][^/\\\s:'\"]+)+[/\\]([^/\\\s:'\"]+)")


def strip_directories(text: str) -> str:
    """Replace every absolute file path in ``text`` by its base name."""
    return _PATH.sub(lambda match: match.group(1), text)


def send_reply(msg: Message, *, content: RecordDict, context: Context, site: SiteConfig | None,
               plan: Plan | None, step: SecureStep | None = None,
               staying: frozenset[str] | None = frozenset()) -> Message:
    """The single exit point of the ClientApp: guard, audit, then build the reply.

    ``step`` is the secure-aggregation step ``msg`` asked for (None: a plain
    message); only then may the reply carry the protocol's record. The weights
    a reply may carry are the model's without the ``staying`` ones
    (:func:`shared.local_weights.staying_weight_names`); None (the run config
    could not say which) lets no weight leave.

    A reply the guard blocks is replaced by a refusal (the server sees it and
    logs the reason) and the event is logged at CRITICAL level. A reply that
    cannot be recorded in the audit log is withheld the same way.
    """
    message_type = msg.metadata.message_type
    blocked: str | None = None
    withheld: RecordDict | None = None
    try:
        wants_specs = ARRAYS in content or (step is not None and step.carries_model)
        expected = (expected_parameter_specs(plan.model_config(), staying=staying)
                    if plan and wants_specs and staying is not None else None)
        check_reply(content, message_type=message_type, expected=expected, step=step)
    except EgressBlocked as exc:
        blocked = str(exc)
        LOG.critical("EGRESS BLOCKED at site %s: %s reply of run %s withheld and replaced by a refusal: %s",
                     site_label(site), message_type, context.run_id, blocked)
        withheld, content = content, refusal_content(msg, site, f"EgressBlocked: {blocked}")
    state_dir = site.state_dir if site else context.node_config.get(NODE_STATE_DIR)
    try:
        _audit(msg, content=content, context=context, state_dir=state_dir,
               blocked=blocked, withheld=withheld, step=step)
    except AuditLogError as exc:
        LOG.critical("site %s: %s; the %s reply is withheld", site_label(site), exc, message_type)
        content = refusal_content(msg, site, "AuditLogError: the site's egress audit log cannot be "
                                             "written; reply withheld")
    return Message(content=content, reply_to=msg)


def _audit(msg: Message, *, content: RecordDict, context: Context, state_dir: Any,
           blocked: str | None, withheld: RecordDict | None, step: SecureStep | None) -> None:
    if not state_dir:
        LOG.warning("site state directory unknown (node config 'state-dir'): this reply is not audited")
        return
    server = context.node_config.get(NODE_SUPERLINK)  # Flower does not tell the ClientApp
    entry = make_entry(content=content, run_id=context.run_id, server_round=_server_round(msg),
                       message_type=msg.metadata.message_type, server=str(server) if server else None,
                       blocked_reason=blocked, withheld=withheld, step=step)
    append_entry(Path(str(state_dir)), entry)


def _server_round(msg: Message) -> int | None:
    config = msg.content.config_records.get(CONFIG)
    value = config.get(SERVER_ROUND) if config is not None else None
    return int(value) if isinstance(value, int) else None


def site_label(site: SiteConfig | None) -> str:
    return site.site_id[:SITE_KEY_LIMITS[SITE_ID]] if site else "unknown"
