"""The egress guard's rules for the secure-aggregation protocol's replies (:mod:`client.runtime.secagg`).

A reply to a protocol step may carry the protocol's record (Flower's
``secaggplus_configs``) holding exactly what that stage of SecAgg+ sends:

=========================  =====================================================================
stage                      the record holds
=========================  =====================================================================
``setup``                  ``pk1``, ``pk2``: the site's two public keys (bytes)
``share_keys``             ``dsts``: neighbour node ids the server listed; ``ctxts``: one
                           encrypted share packet per destination
``collect_masked_vectors`` ``masked_params``: the masked, quantised vector: one integer array of
                           shape (1,) (the weight) then one per model parameter, its shape, each
                           value in [0, 2**32), serialised by numpy with no extra bytes
``unmask``                 ``nids``: node ids the server listed as active or dropped; ``shares``:
                           one key share per listed node
=========================  =====================================================================

Plain weights (``arrays``) never leave in a protocol reply. Anything else
raises :class:`~client.runtime.egress.guard.EgressBlocked`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage

from client.runtime.egress.base import ArraySpec, EgressBlocked, show

if TYPE_CHECKING:
    from flwr.app import ConfigRecord

    from client.runtime.secagg import SecureStep

#: The longest public key, encrypted share packet or key share a reply may hold (bytes); Flower's are
#: a few hundred bytes, so a bigger one could only be smuggling something.
MAX_SECRET_BYTES = 4096
MAX_MASK_VALUE = 2**32
REPLY_KEYS = {Stage.SETUP: (Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2),
              Stage.SHARE_KEYS: (Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST),
              Stage.COLLECT_MASKED_VECTORS: (Key.MASKED_PARAMETERS,),
              Stage.UNMASK: (Key.NODE_ID_LIST, Key.SHARE_LIST)}


def check_secagg(record: ConfigRecord, *, step: SecureStep, expected: Mapping[str, ArraySpec] | None) -> None:
    """Raise :class:`EgressBlocked` unless ``record`` is exactly what ``step``'s stage of SecAgg+ sends."""
    keys = REPLY_KEYS.get(step.stage)
    if keys is None:
        raise EgressBlocked(f"no reply is allowed for secure-aggregation stage {show(step.stage)}")
    if sorted(record) != sorted(keys):
        raise EgressBlocked(f"a {step.stage} reply holds keys {show(sorted(record))}, allowed {list(keys)}")
    if step.stage == Stage.SETUP:
        for key in keys:
            _check_secret(key, record[key])
    elif step.stage == Stage.SHARE_KEYS:
        listed = {int(k) for k in step.request if k.isdigit()}
        _check_paired(record, ids_key=Key.DESTINATION_LIST, values_key=Key.CIPHERTEXT_LIST, allowed_ids=listed)
    elif step.stage == Stage.UNMASK:
        listed = set(_ints(step.request.get(Key.ACTIVE_NODE_ID_LIST))) | set(
            _ints(step.request.get(Key.DEAD_NODE_ID_LIST)))
        _check_paired(record, ids_key=Key.NODE_ID_LIST, values_key=Key.SHARE_LIST, allowed_ids=listed)
    else:
        check_masked_vector(record[Key.MASKED_PARAMETERS], expected=expected)


def check_masked_vector(payloads: Any, *, expected: Mapping[str, ArraySpec] | None) -> None:
    """Raise :class:`EgressBlocked` unless ``payloads`` is a masked vector of the model's shapes."""
    if expected is None:
        raise EgressBlocked("the masked vector cannot be checked: the model's parameter list is unknown")
    shapes = [(1,)] + [spec.shape for spec in expected.values()]
    if not isinstance(payloads, list) or len(payloads) != len(shapes):
        raise EgressBlocked(f"the masked vector must be {len(shapes)} arrays (the weight, then one per "
                            f"model parameter), got {len(payloads) if isinstance(payloads, list) else 'none'}")
    for index, (payload, shape) in enumerate(zip(payloads, shapes, strict=True)):
        if not isinstance(payload, bytes):
            raise EgressBlocked(f"masked array {index} is not bytes ({type(payload).__name__})")
        try:
            values = np.load(io.BytesIO(payload), allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - any decoding failure blocks the reply
            raise EgressBlocked(f"masked array {index} cannot be decoded: {type(exc).__name__}") from None
        if values.shape != shape or values.dtype.kind not in "iu":
            raise EgressBlocked(f"masked array {index}: expected integers of shape {shape}, "
                                f"holds {values.dtype} {values.shape}")
        if values.size and (values.min() < 0 or values.max() >= MAX_MASK_VALUE):
            raise EgressBlocked(f"masked array {index} holds values outside [0, 2**32)")
        canonical = io.BytesIO()
        np.save(canonical, values, allow_pickle=False)
        if canonical.getvalue() != payload:
            raise EgressBlocked(f"masked array {index}: payload carries bytes beyond its values")


def _check_paired(record: ConfigRecord, *, ids_key: str, values_key: str, allowed_ids: set[int]) -> None:
    ids, values = record[ids_key], record[values_key]
    if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values):
        raise EgressBlocked(f"{show(ids_key)} and {show(values_key)} must be lists of one length")
    node_ids = _ints(ids)
    if len(node_ids) != len(ids) or len(set(node_ids)) != len(node_ids):
        raise EgressBlocked(f"{show(ids_key)} must be distinct node ids")
    unknown = set(node_ids) - allowed_ids
    if unknown:
        raise EgressBlocked(f"{show(ids_key)} names {len(unknown)} node(s) the server did not list")
    for value in values:
        _check_secret(values_key, value)


def _check_secret(key: str, value: Any) -> None:
    if not isinstance(value, bytes):
        raise EgressBlocked(f"{show(key)} must hold bytes, not {type(value).__name__}")
    if not 0 < len(value) <= MAX_SECRET_BYTES:
        raise EgressBlocked(f"{show(key)} holds {len(value)} bytes (allowed 1..{MAX_SECRET_BYTES})")


def _ints(values: Any) -> list[int]:
    if not isinstance(values, list):
        return []
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
