"""The site's side of secure aggregation: Flower's SecAgg+ client protocol around fedseg's training.

Flower's ``secaggplus_mod`` runs the protocol (key pairs, Shamir shares of the
mask seed and key, pairwise and private masks, quantisation); its secrets live
in the node's Flower ``Context.state`` and never leave the site. This module
feeds it, at the masking stage, the site's *change* to the global model (not
the weights: a change spans a far smaller range, so the same quantisation
levels are finer), after the checks the server can no longer make on a masked
vector (:func:`check_update`): NaN or Inf refuses the round; with run config
``secagg-update-norm-bound`` > 0 a larger change is scaled down to that norm.
What the checks found goes into the site's audit entry (``site-checks``), never
to the server.

Before any key is made, the site checks that the protocol parameters the
server sent are the run config's (:func:`check_setup`): a server cannot lower
the threshold or the quantisation below what the consortium configured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from shared.errors import FedSegError
from shared.protocol import ARRAYS, METRICS, NUM_EXAMPLES, SITE, SITE_ID

if TYPE_CHECKING:
    from collections.abc import Callable

    from client.runtime.site_config import SiteConfig
    from shared.config import RunConfig

SECAGG = RECORD_KEY_CONFIGS


class SecureAggregationError(FedSegError):
    """A secure-aggregation message or update this site will not take part with; names the problem."""


class _SiteWorkFailed(Exception):
    """Carries an error of the site's own training through Flower's mod, apart from the protocol's errors."""

    def __init__(self, error: Exception) -> None:
        super().__init__(type(error).__name__)
        self.error = error


@dataclass
class SiteChecks:
    """What the site checked on its plain update before masking (written to its audit log only)."""

    update_norm: float | None = None
    update_scale: float = 1.0
    clipped_coordinates: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The checks as the audit entry's ``site-checks`` field."""
        return {"update-norm": self.update_norm, "update-scale": self.update_scale,
                "clipped-coordinates": self.clipped_coordinates, "notes": list(self.notes)}


@dataclass
class SecureStep:
    """One protocol message as the site received it: its stage, a copy of its protocol record, the checks made."""

    stage: str
    request: dict[str, Any]
    checks: SiteChecks = field(default_factory=SiteChecks)

    @classmethod
    def of(cls, msg: Message) -> SecureStep | None:
        """The step ``msg`` asks for, or None for a plain (not secure) message."""
        if SECAGG not in msg.content.config_records:
            return None
        return cls(stage=message_stage(msg), request=dict(msg.content.config_records[SECAGG]))

    @property
    def carries_model(self) -> bool:
        """True for the masking stage, the one that sends the global model and trains."""
        return self.stage == Stage.COLLECT_MASKED_VECTORS


def message_stage(msg: Message) -> str:
    """The protocol stage ``msg`` asks for ("" if it names none: the protocol then refuses it)."""
    stage = msg.content.config_records[SECAGG].get(Key.STAGE)
    return str(stage) if stage in Stage.all() else ""


def check_plain_training_allowed(config: RunConfig, site: SiteConfig) -> None:
    """Refuse to send a plain update when the run is secure or the site requires it to be.

    Run config ``secure-aggregation`` is the operator's; node config
    ``require-secure-aggregation`` is the hospital's own policy, which no run
    config can change.
    """
    if config.secure_aggregation:
        raise SecureAggregationError("run config 'secure-aggregation' is true, but the server asked for a plain "
                                     "update; not sending one")
    if site.require_secure_aggregation:
        raise SecureAggregationError("this site sends its update only through secure aggregation (node config "
                                     "'require-secure-aggregation') and the run is configured without it (run "
                                     "config 'secure-aggregation' = false); not training")


def check_setup(msg: Message, config: RunConfig) -> None:
    """Refuse a setup whose parameters differ from the run config's (or lets one share reveal a secret)."""
    configs = msg.content.config_records[SECAGG]
    if not config.secure_aggregation:
        raise SecureAggregationError("the server asks for secure aggregation, but run config "
                                     "'secure-aggregation' is false")
    expected = {Key.THRESHOLD: ("secagg-threshold", config.secagg_threshold),
                Key.CLIPPING_RANGE: ("secagg-clipping-range", config.secagg_clipping_range),
                Key.TARGET_RANGE: ("secagg-quantization-range", config.secagg_quantization_range),
                Key.MOD_RANGE: ("secagg-modulus-range", config.secagg_modulus_range),
                Key.MAX_WEIGHT: ("secagg-max-weight", config.secagg_max_weight)}
    for key, (name, value) in expected.items():
        if configs.get(key) != value:
            raise SecureAggregationError(f"the server's '{key}' {configs.get(key)!r} is not run config "
                                         f"'{name}' = {value!r}")
    sample, shares = configs.get(Key.SAMPLE_NUMBER), configs.get(Key.SHARE_NUMBER)
    if not isinstance(sample, int) or not isinstance(shares, int) or not config.secagg_threshold <= shares <= sample:
        raise SecureAggregationError(f"share number {shares!r} must lie between run config 'secagg-threshold' "
                                     f"({config.secagg_threshold}) and the sample size {sample!r}")


def check_update(trained: dict[str, np.ndarray], received: dict[str, np.ndarray], *, config: RunConfig,
                 num_examples: float) -> tuple[list[np.ndarray], SiteChecks]:
    """The change ``trained - received`` per tensor (float64), checked and bounded as the server no longer can.

    Raises :class:`SecureAggregationError` on NaN/Inf or on a weight above
    ``secagg-max-weight``. Returns the (possibly scaled) change and what was found.
    """
    if not 0 < num_examples <= config.secagg_max_weight:
        raise SecureAggregationError(f"num-examples {num_examples:g} is outside (0, run config "
                                     f"'secagg-max-weight' = {config.secagg_max_weight:g}]")
    delta = [np.asarray(trained[name], dtype=np.float64) - np.asarray(received[name], dtype=np.float64)
             for name in received]
    squared = float(sum(np.einsum("i,i->", d.ravel(), d.ravel()) for d in delta))
    if not math.isfinite(squared):
        bad = next(name for name, d in zip(received, delta, strict=True) if not np.isfinite(d).all())
        raise SecureAggregationError(f"the trained model holds NaN or Inf (first in '{bad}'); "
                                     "the update is not sent")
    checks = SiteChecks(update_norm=math.sqrt(squared))
    key, bound = update_bound(config)
    if bound > 0 and checks.update_norm > bound:
        checks.update_scale = bound / checks.update_norm
        delta = [d * checks.update_scale for d in delta]
        checks.notes.append(f"update norm {checks.update_norm:.4g} scaled down to {key} {bound:g}")
    ratio = num_examples / config.secagg_max_weight  # Flower's mod weighs the change by this before quantising
    limit = config.secagg_clipping_range
    checks.clipped_coordinates = int(sum(np.count_nonzero(np.abs(d * ratio) > limit) for d in delta))
    if checks.clipped_coordinates:
        checks.notes.append(f"{checks.clipped_coordinates} coordinate(s) of the weighted change clipped to "
                            f"secagg-clipping-range {limit:g}")
    return delta, checks


def update_bound(config: RunConfig) -> tuple[str, float]:
    """(run config key, L2 bound) a site scales its change down to before masking (0: none).

    Hospital-level DP's clipping norm is the sensitivity its noise is sized for,
    so it applies whenever it is the tighter bound.
    """
    bound = ("secagg-update-norm-bound", config.secagg_update_norm_bound)
    if config.site_dp and (bound[1] <= 0 or config.dp_site_clipping_norm < bound[1]):
        return "dp-site-clipping-norm", config.dp_site_clipping_norm
    return bound


def secure_weight(config: RunConfig, num_examples: float) -> float:
    """A site's weight in the secure sum: its examples, or under hospital-level DP ``secagg-max-weight`` for
    every site (sites weigh equally; the largest weight, because Flower's mod scales the change by weight /
    max-weight before quantising, and a small weight would push it below the quantisation step)."""
    return config.secagg_max_weight if config.site_dp else num_examples


def run_secure_stage(msg: Message, context: Context, *, step: SecureStep, config: RunConfig, site: SiteConfig,
                     train: Callable[[], RecordDict], reference: Callable[[], dict[str, np.ndarray]]) -> RecordDict:
    """One protocol step through Flower's ``secaggplus_mod``; returns the reply content to send.

    ``train()`` runs local training (masking stage only) and returns fedseg's
    usual train content; ``reference()`` gives the global model received.
    ``step.checks`` is filled with what :func:`check_update` found.
    """
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    stage = step.stage
    if not stage:
        raise SecureAggregationError("a secure-aggregation message without a known stage")
    if stage == Stage.SETUP:
        check_setup(msg, config)
    metrics: dict[str, Any] = {}

    def masked_training(inner_msg: Message, inner_context: Context) -> Message:
        try:
            content = train()
            metrics.update(content[METRICS])
            trained = {name: array.numpy() for name, array in content[ARRAYS].items()}
            weight = secure_weight(config, float(metrics[NUM_EXAMPLES]))
            delta, found = check_update(trained, reference(), config=config, num_examples=weight)
        except Exception as exc:
            raise _SiteWorkFailed(exc) from exc
        step.checks = found
        fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters(delta),
                        num_examples=int(weight), metrics={})
        return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=inner_msg)

    try:
        out = secaggplus_mod(msg, context, masked_training)
    except _SiteWorkFailed as failed:
        raise failed.error from None  # the ClientApp handles it as for a plain round (refusal, no text leaks)
    except (ValueError, KeyError, TypeError) as exc:  # Flower's protocol checks; their text names no data
        raise SecureAggregationError(f"secure aggregation ({stage}): {type(exc).__name__}: {exc}"[:250]) from None
    record = out.content.config_records[SECAGG]
    reply = RecordDict({SECAGG: record, SITE: ConfigRecord({SITE_ID: site.site_id})})
    if stage == Stage.COLLECT_MASKED_VECTORS:
        record[Key.MASKED_PARAMETERS] = as_uint32(record[Key.MASKED_PARAMETERS])
        reply[METRICS] = MetricRecord(metrics)
    return reply


def as_uint32(payloads: list[bytes]) -> list[bytes]:
    """Flower's masked arrays (int64, every value reduced modulo at most 2**32) as uint32: the same
    values in half the bytes (run config keeps ``secagg-modulus-range`` <= 2**32)."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    arrays = [bytes_to_ndarray(payload) for payload in payloads]
    if any(a.size and (a.min() < 0 or a.max() >= 2**32) for a in arrays):
        raise SecureAggregationError("a masked value lies outside [0, 2**32)")
    return [ndarray_to_bytes(a.astype(np.uint32)) for a in arrays]
