"""The server's arithmetic of SecAgg+: add masked vectors, remove the masks, dequantise the sum.

Everything here is Flower's (``flwr.common.secure_aggregation``: Shamir
reconstruction, ECDH shared keys, the mask generator, quantisation); this
module only applies it as Flower's SecAgg+ workflow does, for the sum of the
sites that sent a masked vector. The server only ever holds the running sum of
masked vectors, never one site's vector on its own once it is added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from shared.config import RunConfig
from shared.errors import FedSegError


class SecureRoundSkipped(FedSegError):
    """A secure round cannot produce its sum (too few sites or shares); the reason says which."""


@dataclass(frozen=True)
class SecAggSettings:
    """The protocol parameters of a run (run config ``secagg-*``)."""

    threshold: int
    clipping_range: float
    quantization_range: int
    modulus_range: int
    max_weight: float

    @classmethod
    def from_config(cls, config: RunConfig) -> SecAggSettings:
        return cls(threshold=config.secagg_threshold, clipping_range=config.secagg_clipping_range,
                   quantization_range=config.secagg_quantization_range,
                   modulus_range=config.secagg_modulus_range, max_weight=config.secagg_max_weight)


class MaskedSum:
    """The running sum (mod ``modulus``) of the masked vectors received; each is added and dropped."""

    def __init__(self, modulus: int, *, shapes: Sequence[tuple[int, ...]]) -> None:
        self.modulus = modulus
        self.shapes = [tuple(shape) for shape in shapes]
        self.total: list[np.ndarray] | None = None
        self.count = 0

    def add(self, payloads: Sequence[bytes]) -> None:
        """Add one site's masked vector (Flower's serialised integer arrays, ``shapes``).

        Raises ``ValueError`` (and adds nothing) for a vector of other shapes or non-integers.
        """
        vector = [bytes_to_ndarray(b) for b in payloads]
        if get_parameters_shape(vector) != self.shapes or any(v.dtype.kind not in "iu" for v in vector):
            raise ValueError("a masked vector must be integers of the weight's and the model's shapes")
        vector = [v.astype(np.int64) for v in vector]
        self.total = vector if self.total is None else parameters_mod(parameters_addition(self.total, vector),
                                                                     self.modulus)
        self.count += 1


def unmask_mean(masked: MaskedSum, *, shares: Mapping[int, list[bytes]], survivors: set[int], dropped: set[int],
                public_keys: Mapping[int, tuple[bytes, bytes]], settings: SecAggSettings) -> list[np.ndarray]:
    """The example-weighted mean of the survivors' (dequantised) vectors, masks removed.

    ``shares[node]`` are the key shares the survivors returned for ``node``: of
    its mask seed for a survivor, of its first private key for a node that
    shared keys and then dropped (its pairwise masks with the survivors are
    rebuilt and removed). Raises :class:`SecureRoundSkipped` when a secret has
    fewer than ``settings.threshold`` shares.
    """
    if masked.total is None:
        raise SecureRoundSkipped("no masked vector to unmask")
    vector = masked.total
    shapes = get_parameters_shape(vector)
    for node in sorted(survivors | dropped):
        node_shares = shares.get(node, [])
        if len(node_shares) < settings.threshold:
            raise SecureRoundSkipped(f"only {len(node_shares)} key share(s) for a node's "
                                     f"{'mask seed' if node in survivors else 'key'}, secagg-threshold is "
                                     f"{settings.threshold}")
        try:
            secret = combine_shares(node_shares)
        except ValueError:
            raise SecureRoundSkipped("key shares do not combine into a secret (a share was altered)") from None
        if node in survivors:
            vector = parameters_subtraction(vector, pseudo_rand_gen(secret, settings.modulus_range, shapes))
            continue
        try:
            private_key = bytes_to_private_key(secret)
        except ValueError:
            raise SecureRoundSkipped("a dropped node's key shares combine into no valid key") from None
        for other in sorted(survivors):
            shared = generate_shared_key(private_key, bytes_to_public_key(public_keys[other][0]))
            mask = pseudo_rand_gen(shared, settings.modulus_range, shapes)
            vector = (parameters_addition(vector, mask) if node > other
                      else parameters_subtraction(vector, mask))
    weight, quantised = factor_extract(parameters_mod(vector, settings.modulus_range))
    if not 0 < weight <= len(survivors) * settings.quantization_range:
        raise SecureRoundSkipped(f"the unmasked weight {int(weight)} is impossible for {len(survivors)} "
                                 "site(s): a masked vector or share was altered")
    offset = -(len(survivors) - 1) * settings.clipping_range
    sums = [v + offset for v in dequantize(quantised, settings.clipping_range, settings.quantization_range)]
    # each site's coordinates lie in [-c, c], so their sum in [-k c, k c]; an altered vector or share leaves
    # the sum uniformly spread over the modulus, far outside (the quantisation step is the slack)
    limit = len(survivors) * settings.clipping_range * (1 + 2 / settings.quantization_range)
    if any(s.size and float(np.abs(s).max()) > limit for s in sums):
        raise SecureRoundSkipped("the unmasked sum lies outside what the sites' clipped vectors can add up "
                                 "to: a masked vector or share was altered")
    return [s * (settings.quantization_range / weight) for s in sums]
