"""The egress guard: the one check every reply passes before it leaves the site.

A reply may carry only

- ``arrays`` (train replies only): an ``ArrayRecord`` whose array names, shapes
  and dtypes equal the model's parameters exactly, each array a plain numpy
  payload with no extra bytes;
- ``metrics``: a ``MetricRecord`` of scalar numbers under the keys of
  :data:`shared.protocol.METRIC_KEYS` or :data:`shared.protocol.METRIC_KEY_PATTERNS`;
- ``site``: a ``ConfigRecord`` with the short strings ``site-id`` and ``reason``
  (:data:`shared.protocol.SITE_KEY_LIMITS`);
- ``fingerprint`` (fingerprint query replies only): a ``MetricRecord`` of scalar
  aggregates under the keys of :data:`shared.fingerprint.FINGERPRINT_KEY_PATTERNS`;
- ``secaggplus_configs`` (replies to a secure-aggregation step only, never with
  ``arrays``): what that stage of SecAgg+ sends (:mod:`client.runtime.egress.secagg_rules`).

Anything else (an extra array such as an image batch, a list-valued metric, an
unknown key, a long string, an extra record) raises :class:`EgressBlocked`.
The allow-list is the protocol's (:mod:`shared.protocol`: what fedseg's replies are
made of) and is checked here and only here; README.md (hospital IT) documents it.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

from client.runtime.egress.base import ArraySpec, EgressBlocked, show
from client.runtime.egress.secagg_rules import check_secagg
from shared.fingerprint import fingerprint_key_allowed
from shared.protocol import (
    ARRAYS,
    FINGERPRINT,
    FINGERPRINT_QUERY,
    METRICS,
    SITE,
    SITE_KEY_LIMITS,
    TRAIN,
    metric_key_allowed,
)

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from client.runtime.secagg import SecureStep
    from shared.model import ModelConfig

SECAGG = "secaggplus_configs"  # Flower's SecAgg+ record (RECORD_KEY_CONFIGS), read without importing flwr
NUMPY_STYPE = "numpy.ndarray"


@functools.lru_cache(maxsize=4)
def expected_parameter_specs(model_config: ModelConfig, *,
                             staying: frozenset[str] = frozenset()) -> Mapping[str, ArraySpec]:
    """Return ``{name: ArraySpec}`` (read-only) of the model's ``state_dict`` for ``model_config``.

    The ``staying`` weights (:func:`shared.local_weights.staying_weight_names`:
    a site's own norm weights, frozen weights) are left out, so a reply
    carrying one is blocked.

    The model is built on torch's ``meta`` device: shapes and dtypes without
    allocating or initialising any weight. Building a MONAI U-Net costs a few
    milliseconds, so the result is kept per architecture for the process: a
    long-lived client (simulated, or a warm ClientApp process) pays it once.
    """
    import torch

    from shared.model import build_model

    with torch.device("meta"):
        model = build_model(model_config)
    return MappingProxyType({name: ArraySpec(tuple(t.shape), str(t.dtype).removeprefix("torch."))
                             for name, t in model.state_dict().items() if name not in staying})


def check_reply(content: RecordDict, *, message_type: str,
                expected: Mapping[str, ArraySpec] | None, step: SecureStep | None = None) -> None:
    """Raise :class:`EgressBlocked` unless ``content`` may leave the site.

    Parameters
    ----------
    content : RecordDict
        The reply's content, exactly as it would be sent.
    message_type : str
        ``"train"`` or ``"evaluate"``; only train replies may carry weights.
    expected : Mapping[str, ArraySpec] or None
        The model's parameters (:func:`expected_parameter_specs`); ``None`` when
        the model is unknown, in which case no array may leave.
    step : SecureStep or None
        The secure-aggregation step the reply answers (None: a plain message).
    """
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    allowed = {ARRAYS: ArrayRecord, METRICS: MetricRecord, SITE: ConfigRecord}
    if message_type == FINGERPRINT_QUERY:
        allowed[FINGERPRINT] = MetricRecord
    if step is not None and message_type == TRAIN:
        del allowed[ARRAYS]  # a protocol reply sends the masked vector, never the weights
        allowed[SECAGG] = ConfigRecord
    for name, record in content.items():
        kind = allowed.get(name)
        if kind is None or not isinstance(record, kind):
            raise EgressBlocked(f"record {show(name)} ({type(record).__name__}) is not allowed to leave")
    if ARRAYS in content:
        check_arrays(content[ARRAYS], message_type=message_type, expected=expected)
    if METRICS in content:
        check_metrics(content[METRICS])
    if SITE in content:
        check_site(content[SITE])
    if FINGERPRINT in content:
        check_fingerprint(content[FINGERPRINT])
    if SECAGG in content:
        assert step is not None
        check_secagg(content[SECAGG], step=step, expected=expected)


def check_arrays(arrays: ArrayRecord, *, message_type: str, expected: Mapping[str, ArraySpec] | None) -> None:
    """Raise :class:`EgressBlocked` unless ``arrays`` is exactly the model's parameters."""
    if message_type != TRAIN:
        raise EgressBlocked(f"a {show(message_type)} reply may not carry arrays")
    if expected is None:
        raise EgressBlocked("arrays cannot be checked: the model's parameter list is unknown")
    extra = [name for name in arrays if name not in expected]
    if extra:
        raise EgressBlocked(f"array {show(extra[0])} is not a model parameter ({len(extra)} extra)")
    missing = [name for name in expected if name not in arrays]
    if missing:
        raise EgressBlocked(f"model parameter {show(missing[0])} is missing ({len(missing)} missing)")
    if list(arrays) != list(expected):
        raise EgressBlocked("arrays are not in the model's parameter order")
    for name, spec in expected.items():
        _check_array(name, arrays[name], spec)


def _check_array(name: str, array: object, spec: ArraySpec) -> None:
    import numpy as np

    if getattr(array, "stype", None) != NUMPY_STYPE:
        raise EgressBlocked(f"array {show(name)}: serialisation {getattr(array, 'stype', None)!r} "
                            f"is not {NUMPY_STYPE!r}")
    try:
        values = array.numpy()  # type: ignore[attr-defined]
    except Exception as exc:  # noqa: BLE001 - any decoding failure blocks the reply
        raise EgressBlocked(f"array {show(name)} cannot be decoded: {type(exc).__name__}") from None
    declared = (tuple(array.shape), str(array.dtype))  # type: ignore[attr-defined]
    actual = (tuple(values.shape), str(values.dtype))
    if declared != actual or actual != (spec.shape, spec.dtype):
        raise EgressBlocked(f"array {show(name)}: expected {spec.shape} {spec.dtype}, "
                            f"declared {declared[0]} {declared[1]}, holds {actual[0]} {actual[1]}")
    canonical = io.BytesIO()
    np.save(canonical, values, allow_pickle=False)
    if canonical.getvalue() != array.data:  # type: ignore[attr-defined]
        raise EgressBlocked(f"array {show(name)}: payload carries bytes beyond its values")


def check_metrics(metrics: MetricRecord) -> None:
    """Raise :class:`EgressBlocked` unless every metric is an allowed key with a scalar value."""
    _check_scalars(metrics, allowed=metric_key_allowed, kind="metric")


def check_fingerprint(record: MetricRecord) -> None:
    """Raise :class:`EgressBlocked` unless every entry is an allowed fingerprint key with a scalar value."""
    _check_scalars(record, allowed=fingerprint_key_allowed, kind="fingerprint")


def _check_scalars(record: MetricRecord, *, allowed: Callable[[str], bool], kind: str) -> None:
    for key, value in record.items():
        if not allowed(key):
            raise EgressBlocked(f"{kind} key {show(key)} is not on the allow-list")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EgressBlocked(f"{kind} {show(key)} is not a scalar number ({type(value).__name__})")


def check_site(site: ConfigRecord) -> None:
    """Raise :class:`EgressBlocked` unless ``site`` holds only short ``site-id``/``reason`` strings."""
    for key, value in site.items():
        limit = SITE_KEY_LIMITS.get(key)
        if limit is None:
            raise EgressBlocked(f"site key {show(key)} is not on the allow-list")
        if not isinstance(value, str):
            raise EgressBlocked(f"site key {show(key)} is not a string ({type(value).__name__})")
        if len(value) > limit:
            raise EgressBlocked(f"site key {show(key)} holds {len(value)} characters (limit {limit})")
