"""Which of a model's weights stay at each site and which travel (run config ``local-norm``, ``train-layers``).

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

With ``train-layers`` other than ``all`` only the weights it names train: the
rest are frozen at the model the server sends (the starting model), take no
gradient step and no DP noise, and are not sent back either. A value is
``+``- or ``,``-separated: the groups ``all``, ``decoder`` (the network's
decoder, :attr:`shared.networks.base.Network.decoder`) and ``norm``, or
``fnmatch`` patterns over weight names (``upsamples.*``).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, TypeVar

from shared.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig

T = TypeVar("T")
#: Message config key naming the federation a train or evaluate message belongs to: the run id of the run
#: that began it, kept across resumes, so a site finds its own weights again in a resumed run.
FEDERATION_ID_KEY = "federation-id"


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
def weight_names(model_config: ModelConfig) -> tuple[str, ...]:
    """``state_dict`` names of the network ``model_config`` builds (built on the meta device, cached)."""
    import torch

    from shared.model import build_model

    with torch.device("meta"):
        return tuple(build_model(model_config).state_dict())


@functools.lru_cache(maxsize=8)
def norm_weight_names(model_config: ModelConfig) -> frozenset[str]:
    """:func:`norm_weight_names_of` the network ``model_config`` builds (built on the meta device, cached)."""
    import torch

    from shared.model import build_model

    with torch.device("meta"):
        model = build_model(model_config)
    return frozenset(norm_weight_names_of(model))


@functools.lru_cache(maxsize=16)
def frozen_weight_names(model_config: ModelConfig, *, train_layers: str) -> frozenset[str]:
    """The weights run config ``train-layers`` leaves untrained (empty for ``all``).

    Raises :class:`ConfigError` naming the key for a part that matches no weight
    or a ``decoder`` the network does not define.
    """
    from shared.model import MODELS

    names = weight_names(model_config)
    trained: set[str] = set()
    for part in split_train_layers(train_layers):
        if part == "all":
            matched = set(names)
        elif part == "norm":
            matched = set(norm_weight_names(model_config))
        elif part == "decoder":
            rule = MODELS[model_config.name].decoder
            if rule is None:
                raise ConfigError(f"run config key 'train-layers': model {model_config.name!r} has no decoder "
                                  "defined in fedseg; name its weights with patterns instead")
            matched = {name for name in names if re.fullmatch(rule, name)}
        else:
            matched = set(fnmatch.filter(names, part))
        if not matched:
            raise ConfigError(f"run config key 'train-layers': {part!r} matches no weight of model "
                              f"{model_config.name!r} (e.g. {names[0]!r})")
        trained |= matched
    return frozenset(names) - trained


def split_train_layers(value: str) -> list[str]:
    """The parts of a ``train-layers`` value (split at ``+`` and ``,``)."""
    return [part.strip() for part in re.split(r"[+,]", value) if part.strip()]


def staying_weight_names(model_config: ModelConfig, *, local_norm: bool, train_layers: str) -> frozenset[str]:
    """Every weight that is never sent or averaged: the site's own norm weights and the frozen ones.

    Raises :class:`ConfigError` when nothing would travel.
    """
    staying = (local_weight_names(model_config, local_norm=local_norm)
               | frozen_weight_names(model_config, train_layers=train_layers))
    if staying >= set(weight_names(model_config)):
        raise ConfigError("run config keys 'train-layers', 'local-norm': no weight would be trained and shared "
                          f"(train-layers = {train_layers!r} with local-norm = {str(local_norm).lower()})")
    return staying


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
