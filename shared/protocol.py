"""The contract between a fedseg site and the server: message kinds, reply records and keys, node config.

The ClientApp, the ServerApp, the simulation harness and the deployment
scripts import these names instead of spelling the strings out, and the
site's egress guard (:mod:`client.runtime.egress.guard`) derives its allow-list from them:
a key is sent only if it is named here.

What a reply carries (every message kind):

- :data:`METRICS` (``MetricRecord``): scalar numbers under :data:`METRIC_KEYS`
  or a key matching :data:`METRIC_KEY_PATTERNS`; a refusal is ``refused = 1``
  with ``num-examples = 0``;
- :data:`SITE` (``ConfigRecord``): the site's id and, in a refusal, the reason,
  short strings (:data:`SITE_KEY_LIMITS`);
- :data:`ARRAYS` (``ArrayRecord``, train replies only): the model's weights;
- the fingerprint record of a fingerprint query (:mod:`shared.fingerprint`),
  or the SecAgg+ record of a secure-aggregation step (:mod:`client.runtime.egress.secagg_rules`).

The node config (``flower-supernode --node-config``; a simulation's
``sites.json``) is the site's own: :data:`NODE_CONFIG_KEYS` lists every key
fedseg reads, parsed by ``client.runtime.site_config.SiteConfig.from_node_config`` and written
by ``SiteConfig.to_node_config``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.config import DEFAULT_DP_DELTA, DEFAULT_MAX_EPSILON

# --- message kinds (Flower's ``MessageType`` values and fedseg's query) --------------------------
TRAIN = "train"
EVALUATE = "evaluate"
#: The message a server sends to ask for a site's data fingerprint (a Flower query with this action).
FINGERPRINT_ACTION = "fingerprint"
FINGERPRINT_QUERY = f"query.{FINGERPRINT_ACTION}"
MESSAGE_KINDS = (TRAIN, EVALUATE, FINGERPRINT_QUERY)

# --- what the server sends: the ``config`` record of every train, evaluate and query message -----
CONFIG = "config"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # Flower's FedProx

# --- the records of a reply --------------------------------------------------------------------
ARRAYS = "arrays"
METRICS = "metrics"
SITE = "site"
FINGERPRINT = "fingerprint"  # the fingerprint query's reply (keys: shared.fingerprint.FINGERPRINT_KEY_PATTERNS)

# --- the ``site`` record: keys and the longest string each may hold -----------------------------
SITE_ID = "site-id"
REASON = "reason"
SITE_KEY_LIMITS = {SITE_ID: 128, REASON: 300}
NO_REASON = "no reason given"

# --- the ``metrics`` record -----------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"  # the weight of a train update (Flower's weighted_by_key)
REFUSED = "refused"  # 1 when the site declines the message
TRAIN_LOSS, STEPS = "train-loss", "steps"
DICE, LOSS, HD95 = "dice", "loss", "hd95"
EPSILON, EPSILON_ROUND = "epsilon", "epsilon-round"
DP, DP_DELTA, DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE = "dp", "dp-delta", "dp-noise-multiplier", "dp-sample-rate"
TRAIN_SECONDS, EVALUATE_SECONDS = "train-seconds", "evaluate-seconds"
#: Scalar metric keys a reply may carry.
METRIC_KEYS = frozenset({
    NUM_EXAMPLES, TRAIN_LOSS, STEPS,                         # training
    DICE, LOSS, HD95,                                        # evaluation
    EPSILON, EPSILON_ROUND,                                  # differential privacy spend
    DP, DP_DELTA, DP_NOISE_MULTIPLIER, DP_SAMPLE_RATE,      # the DP parameters of the round
    REFUSED,                                                 # 1 when the site declines a round
    TRAIN_SECONDS, EVALUATE_SECONDS,                         # timings
})
#: Per-class metric keys (``dice-class-1``, ``hd95-class-2``, ...) and the 95% intervals of a site's means
#: (``dice-ci-low``, ``hd95-class-2-ci-high``, ...; run config ``evaluate-only``).
METRIC_KEY_PATTERNS = (re.compile(r"dice-class-\d{1,3}"), re.compile(r"hd95-class-\d{1,3}"),
                       re.compile(r"(dice|hd95)(-class-\d{1,3})?-ci-(low|high)"))


def metric_key_allowed(key: str) -> bool:
    """True if ``key`` is a metric a reply may carry."""
    return key in METRIC_KEYS or any(p.fullmatch(key) for p in METRIC_KEY_PATTERNS)


# --- refusals -------------------------------------------------------------------------------------
#: A refusal's reason starts with the name of the error that made the site refuse
#: (``"PrivacyBudgetExceeded: privacy budget: ..."``); this one means the site's
#: privacy budget (node config ``max-epsilon``) does not allow the round, and,
#: since a site's ledger only grows, will not allow any later round of the run either.
BUDGET_REFUSAL = "PrivacyBudgetExceeded"


def refusal_metrics() -> dict[str, int]:
    """The ``metrics`` record of a refusal."""
    return {NUM_EXAMPLES: 0, REFUSED: 1}


def is_refusal(metrics: Mapping[str, Any]) -> bool:
    """True when a reply's ``metrics`` say the site declined."""
    return bool(metrics.get(REFUSED))


def refusal_reason(site: Mapping[str, Any] | None) -> str:
    """The reason a refusal's ``site`` record gives (:data:`NO_REASON` if none)."""
    return str((site or {}).get(REASON, NO_REASON))


def is_budget_refusal(reason: str) -> bool:
    """True when a refusal ``reason`` is the site's privacy budget (also behind a secure-aggregation
    stage prefix such as ``"share-keys: PrivacyBudgetExceeded: ..."``)."""
    return reason.startswith(f"{BUDGET_REFUSAL}:") or f": {BUDGET_REFUSAL}:" in reason


# --- the node config --------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeConfigKey:
    """One node config key: its name, default (None: required, or derived from other keys) and meaning."""

    name: str
    default: object
    meaning: str


NODE_SITE_ID, NODE_DATALIST, NODE_STATE_DIR, NODE_CACHE_DIR = "site-id", "datalist", "state-dir", "cache-dir"
NODE_MAX_EPSILON, NODE_DP_DELTA = "max-epsilon", "dp-delta"
NODE_REQUIRE_DP, NODE_REQUIRE_SECURE_AGGREGATION = "require-dp", "require-secure-aggregation"
NODE_SUPERLINK = "superlink"
#: Simulations only: the sites manifest's fault injection (a real node config cannot set it).
NODE_FAULT = "fault"
#: Flower's own key of a simulated node (its index in the sites manifest).
NODE_PARTITION_ID = "partition-id"
NODE_CONFIG_KEYS = {key.name: key for key in (
    NodeConfigKey(NODE_SITE_ID, None, "the site's name in the server's records (default: the datalist's name)"),
    NodeConfigKey(NODE_DATALIST, None, "the site's datalist JSON (required)"),
    NodeConfigKey(NODE_STATE_DIR, None, "privacy ledger, audit log, own weights (default: beside the datalist)"),
    NodeConfigKey(NODE_CACHE_DIR, None, "preprocessed cases (default: <state-dir>/cache)"),
    NodeConfigKey(NODE_MAX_EPSILON, DEFAULT_MAX_EPSILON, "total epsilon the site will ever spend"),
    NodeConfigKey(NODE_DP_DELTA, DEFAULT_DP_DELTA, "the delta of the site's epsilon"),
    NodeConfigKey(NODE_REQUIRE_DP, True, "refuse runs that train without DP-SGD"),
    NodeConfigKey(NODE_REQUIRE_SECURE_AGGREGATION, False, "refuse runs without secure aggregation"),
    NodeConfigKey(NODE_SUPERLINK, None, "the SuperLink address, recorded in the audit log"),
)}
