"""Which of a model's weights stay at each site and which travel (run config ``local-norm``, FedBN).

With ``local-norm = true`` every normalisation layer's state (affine weight and
bias, running statistics where a layer keeps them) is a site's own: it is
trained there, kept in the site's state directory and never sent; only the rest
of the model is averaged (Li et al. 2021, "FedBN"). The server, the egress
guard and the update checks all take the same set from here, so they agree on
what an update holds.

Why it matters on scanner-shifted sites: after a bias-free convolution, instance
norm is odd in its input, ``IN(conv(-x)) = -IN(conv(x))``, so a site whose
contrast is inverted (T2-like where the others are T1-like) can absorb the
inversion in the sign of its first norm layer's affine weight, which a shared
average cannot.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, TypeVar

from shared.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig

T = TypeVar("T")


def norm_layer_types() -> tuple[type, ...]:
    """torch's normalisation layers (batch, instance, group, layer, local response norm)."""
    from torch import nn
    from torch.nn.modules.batchnorm import _NormBase  # batch and instance norm of every dimension

    return (_NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_weight_names_of(model: torch.nn.Module) -> tuple[str, ...]:
    """``state_dict`` names that belong to normalisation layers of ``model``, in ``state_dict`` order."""
    kinds = norm_layer_types()
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if name and isinstance(module, kinds))
    return tuple(name for name in model.state_dict() if name.startswith(prefixes))


@functools.lru_cache(maxsize=8)
def norm_weight_names(model_config: ModelConfig) -> frozenset[str]:
    """:func:`norm_weight_names_of` the network ``model_config`` builds (built on the meta device, cached)."""
    import torch

    from shared.model import build_model

    with torch.device("meta"):
        model = build_model(model_config)
    return frozenset(norm_weight_names_of(model))


def local_weight_names(model_config: ModelConfig, *, local_norm: bool) -> frozenset[str]:
    """The weights that stay at each site: the norm layers' with ``local_norm``, else none.

    Raises
    ------
    ConfigError
        ``local_norm`` on a network without normalisation weights (e.g. the
        U-Net, whose instance norm has no affine parameters): FedBN would then
        be plain FedAvg, which the operator did not ask for.
    """
    if not local_norm:
        return frozenset()
    names = norm_weight_names(model_config)
    if not names:
        raise ConfigError(f"run config key 'local-norm': model {model_config.name!r} has no normalisation "
                          "weights (its norm layers have no affine parameters or running statistics), so "
                          "nothing would stay local; use a network with affine norm layers (e.g. 'dynunet')")
    return names


def travelling(values: Mapping[str, T], local: Collection[str]) -> dict[str, T]:
    """``values`` without the ``local`` names, in the same order."""
    return {name: value for name, value in values.items() if name not in local}
