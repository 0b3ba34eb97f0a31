"""The site's egress audit log: one JSON line per reply that left (or was blocked).

The log is ``<state-dir>/egress-audit.jsonl``, owned by the site. Entries are
only ever appended, each flushed and fsync'ed before the reply is handed to
Flower, so a crash can at worst lose the reply, never its record.
Each entry lists every array sent (name, shape, dtype, bytes, sha256 of its
values) and every metric and site value, so a hospital can check exactly what
left: ``python -m client audit`` summarises it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import append_line
from shared.errors import FedSegError
from shared.protocol import SITE_ID, is_refusal

if TYPE_CHECKING:
    from flwr.app import RecordDict

    from client.runtime.secagg import SecureStep

AUDIT_LOG_NAME = "egress-audit.jsonl"
SECAGG_RECORD = "secaggplus_configs"  # Flower's SecAgg+ record name (the protocol's messages)
FORMAT = "fedseg-egress-audit/1"
MAX_LOGGED_STRING = 300


class AuditLogError(FedSegError):
    """The egress audit log cannot be written or read; the message names the file."""


def audit_log_path(state_dir: Path | str) -> Path:
    """Where a site with state directory ``state_dir`` keeps its egress audit log."""
    return Path(state_dir) / AUDIT_LOG_NAME


def describe_reply(content: RecordDict) -> dict[str, Any]:
    """Return what ``content`` sends: arrays (name/shape/dtype/bytes/sha256), metrics, site values,
    and for a secure-aggregation reply what its protocol record holds (per key: items, bytes, sha256)."""
    arrays = []
    for record in content.array_records.values():
        for name, array in record.items():
            values = array.numpy()
            arrays.append({"name": name, "shape": list(values.shape), "dtype": str(values.dtype),
                           "bytes": int(values.nbytes),
                           "sha256": hashlib.sha256(values.tobytes(order="C")).hexdigest()})
    metrics = {key: _jsonable(value) for record in content.metric_records.values()
               for key, value in record.items()}
    site = {key: _jsonable(value) for name, record in content.config_records.items() if name != SECAGG_RECORD
            for key, value in record.items()}
    total = sum(a["bytes"] for a in arrays)
    described = {"arrays": arrays, "array-bytes": total, "metrics": metrics, "site": site}
    if SECAGG_RECORD in content.config_records:
        described["secagg"] = {key: _describe_protocol_value(value)
                               for key, value in content.config_records[SECAGG_RECORD].items()}
    return described


def _describe_protocol_value(value: Any) -> Any:
    """A protocol value as the log keeps it: node ids verbatim, bytes by count and sha256."""
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, bytes) for item in items):
        return _jsonable(value)
    digest = hashlib.sha256()
    for item in items:
        digest.update(item)
    return {"items": len(items), "bytes": sum(len(item) for item in items), "sha256": digest.hexdigest()}


def make_entry(*, content: RecordDict, run_id: int, server_round: int | None, message_type: str,
               server: str | None, blocked_reason: str | None = None,
               withheld: RecordDict | None = None, step: SecureStep | None = None) -> dict[str, Any]:
    """Build one audit entry for a reply about to leave (``content`` is what is actually sent).

    ``blocked_reason`` is set when the guard blocked the original reply
    (``withheld``, described under ``"withheld"`` for the site's eyes only) and
    ``content`` is the refusal that replaced it. ``step`` is the secure-aggregation
    step answered: its stage is logged, and at the masking stage what the site checked
    on its plain update before masking (``site-checks``: norm, scaling, clipped coordinates).
    """
    described = describe_reply(content)
    epsilon = described["metrics"].get("epsilon")
    return {
        "format": FORMAT,
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "run-id": int(run_id),
        "round": server_round,
        "message-type": message_type,
        "server": server,
        "site-id": described["site"].get(SITE_ID),
        **described,
        "epsilon": epsilon,
        "refused": is_refusal(described["metrics"]),
        "blocked": blocked_reason is not None,
        "blocked-reason": blocked_reason,
        "withheld": _describe_withheld(withheld),
        **_secure_fields(step),
    }


def _secure_fields(step: SecureStep | None) -> dict[str, Any]:
    if step is None:
        return {}
    fields: dict[str, Any] = {"secagg-stage": step.stage}
    if step.carries_model:
        fields["site-checks"] = step.checks.to_json()
    return fields


def _describe_withheld(content: RecordDict | None) -> dict[str, Any] | None:
    """What a blocked reply would have sent; a reply malformed beyond description gets a note instead."""
    if content is None:
        return None
    try:
        return describe_reply(content)
    except Exception as exc:  # noqa: BLE001 - the entry must be written whatever the blocked reply holds
        return {"undescribable": f"{type(exc).__name__}: {exc}"[:MAX_LOGGED_STRING],
                "records": {name: type(record).__name__ for name, record in content.items()}}


def append_entry(state_dir: Path | str, entry: dict[str, Any]) -> Path:
    """Append ``entry`` to the site's audit log (creating the state directory); return the log path."""
    path = audit_log_path(state_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        append_line(path, json.dumps(entry, sort_keys=True, allow_nan=False))
    except OSError as exc:
        raise AuditLogError(f"egress audit log {path}: cannot append ({exc.strerror or exc})") from None
    return path


def read_entries(path: Path | str) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Yield ``(line number, entry)`` per line of an audit log; ``entry`` is None for an unreadable line."""
    log = Path(path)
    if not log.is_file():
        raise AuditLogError(f"egress audit log {log} does not exist (no reply has left this site yet, "
                            "or the state directory is a different one)")
    with open(log, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                yield number, None
                continue
            yield number, entry if isinstance(entry, dict) else None


def _jsonable(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, str) and len(value) > MAX_LOGGED_STRING:
        return value[:MAX_LOGGED_STRING] + f"... ({len(value)} characters)"
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value
