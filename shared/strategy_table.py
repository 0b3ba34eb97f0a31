"""The table of strategies: the one place that says which run config ``strategy`` names exist.

Each row names the **aggregator family** (how the server combines the
round's accepted updates), Flower's strategy class whose aggregation the
family reuses (``flwr.serverapp.strategy.<flower>``) and the run-config keys
that fill that class's keyword arguments. The server builds its aggregator
from a row (``server.strategies.build_aggregator``), the run config checks
names and keys against it (:func:`check_strategy`), and the README's table is
:func:`strategies_markdown` (a test keeps them equal).

Families:

- ``streaming mean``: the example-weighted mean. Each update is checked and
  spooled to disk as it arrives and the mean is folded together chunk by
  chunk, so memory is O(model) whatever the number of sites; a mean is a sum,
  so secure aggregation and hospital-level DP work with it.
- ``server optimiser``: the streaming mean, then Flower's FedAdam/FedYogi
  step along it (its moments are checkpointed); also works from a sum.
- ``buffered robust``: Flower's robust rule on every accepted update at once
  (all held in memory while aggregating); needs each update in the clear, so
  it is refused with secure aggregation and hospital-level DP.

``shared`` imports no ``server`` code: the table holds names, which the server resolves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from shared.config_values import require, require_together, to_key

if TYPE_CHECKING:
    from shared.config import RunConfig

STREAMING_MEAN = "streaming mean"
SERVER_OPTIMISER = "server optimiser"
BUFFERED_ROBUST = "buffered robust"
#: Families whose aggregate is a function of the weighted mean alone (a sum the server may not take apart).
MEAN_FAMILIES = (STREAMING_MEAN, SERVER_OPTIMISER)


@dataclass(frozen=True)
class StrategySpec:
    """One row of :data:`STRATEGIES`.

    Parameters
    ----------
    family : str
        :data:`STREAMING_MEAN`, :data:`SERVER_OPTIMISER` or :data:`BUFFERED_ROBUST`.
    flower : str
        The class in ``flwr.serverapp.strategy`` whose aggregation (and metric aggregation) is reused.
    params : Mapping[str, str]
        The Flower class's keyword argument -> the :class:`~shared.config.RunConfig` field that sets it.
    summary : str
        What the server does, in one line (the README's table).
    malicious_factor, fewest_base : int
        The rule needs at least ``malicious_factor x malicious-sites + fewest_base`` updates in a round.
    """

    family: str
    flower: str
    params: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""
    malicious_factor: int = 0
    fewest_base: int = 1

    @property
    def keys(self) -> tuple[str, ...]:
        """The run-config keys this strategy reads."""
        return tuple(dict.fromkeys(to_key(name) for name in self.params.values()))

    def fewest_updates(self, malicious_sites: int) -> int:
        """The fewest accepted updates the rule is defined for, given ``malicious-sites``."""
        return self.malicious_factor * malicious_sites + self.fewest_base

    def fewest_text(self) -> str:
        """The rule for :meth:`fewest_updates`, in words naming the key."""
        return f"{self.malicious_factor} x malicious-sites + {self.fewest_base}"


_MALICIOUS = {"num_malicious_nodes": "malicious_sites"}
_SERVER_STEP = {"eta": "server_learning_rate", "tau": "server_tau"}

#: name (run config ``strategy``) -> its row. The order is the README's.
STRATEGIES: Mapping[str, StrategySpec] = MappingProxyType({
    "fedavg": StrategySpec(STREAMING_MEAN, "FedAvg", summary="example-weighted mean of the updates (default)"),
    "fedprox": StrategySpec(STREAMING_MEAN, "FedProx", {"proximal_mu": "proximal_mu"},
                            "FedAvg; sites add `(mu/2)·‖w − w_global‖²` to their loss"),
    "fedadam": StrategySpec(SERVER_OPTIMISER, "FedAdam", _SERVER_STEP,
                            "Adam server optimiser on the averaged update (Reddi et al.)"),
    "fedyogi": StrategySpec(SERVER_OPTIMISER, "FedYogi", _SERVER_STEP,
                            "Yogi server optimiser on the averaged update (Reddi et al.)"),
    "fedmedian": StrategySpec(BUFFERED_ROBUST, "FedMedian",
                              summary="coordinate-wise median (robust to a minority of bad sites)"),
    "fedtrimmedavg": StrategySpec(BUFFERED_ROBUST, "FedTrimmedAvg", {"beta": "trim_fraction"},
                                  "trimmed mean: drop `trim-fraction` of values at each end per coordinate"),
    "krum": StrategySpec(BUFFERED_ROBUST, "Krum", _MALICIOUS,
                         "the one update with the smallest squared distance to its n − f − 2 nearest others (Blanchard et al. 2017)",
                         malicious_factor=2, fewest_base=3),
    "multikrum": StrategySpec(BUFFERED_ROBUST, "MultiKrum", {**_MALICIOUS, "num_nodes_to_select": "multikrum_keep"},
                              "example-weighted mean of the `multikrum-keep` best Krum scores "
                              "(0: n − f of them)", malicious_factor=2, fewest_base=3),
    "bulyan": StrategySpec(BUFFERED_ROBUST, "Bulyan", _MALICIOUS,
                           "Multi-Krum picks n − 2f, then a trimmed mean around their median per coordinate "
                           "(El Mhamdi et al. 2018)", malicious_factor=4, fewest_base=3),
})


def strategy_spec(name: str) -> StrategySpec:
    """The row for run config ``strategy`` = ``name``; raise :class:`~shared.errors.ConfigError` naming the key."""
    require(name in STRATEGIES, "strategy", f"must be one of {tuple(STRATEGIES)}", name)
    return STRATEGIES[name]


def check_strategy(config: RunConfig) -> None:
    """The strategy exists, its keys are in range, and every round samples enough sites for its rule."""
    spec = strategy_spec(config.strategy)
    require(config.malicious_sites >= 0, "malicious-sites", "must be >= 0", config.malicious_sites)
    require(config.multikrum_keep >= 0, "multikrum-keep", "must be >= 0 (0: all but malicious-sites)",
            config.multikrum_keep)
    fewest, sampled = spec.fewest_updates(config.malicious_sites), fewest_sampled(config)
    require_together(sampled >= fewest, ("min-train-nodes", "min-available-nodes", "malicious-sites", "strategy"),
                     f"strategy {config.strategy!r} needs at least {spec.fewest_text()} = {fewest} sites each "
                     f"round, and a round may sample only {sampled} (the larger of min-train-nodes and "
                     f"min-available-nodes x fraction-train): raise min-train-nodes (and have that many sites) "
                     f"or lower malicious-sites")
    keep = config.multikrum_keep
    require_together(config.strategy != "multikrum" or keep <= sampled - config.malicious_sites,
                     ("multikrum-keep", "min-train-nodes", "malicious-sites"),
                     f"Multi-Krum keeps at most n − f updates: multikrum-keep = {keep} is more than the "
                     f"{sampled} sites a round may sample minus malicious-sites = {sampled - config.malicious_sites}")


def fewest_sampled(config: RunConfig) -> int:
    """The fewest sites a training round samples once ``min-available-nodes`` are connected (Flower's FedAvg
    samples the larger of ``min-train-nodes`` and ``fraction-train`` x the connected nodes)."""
    return max(config.min_train_nodes, int(config.min_available_nodes * config.fraction_train))


def check_mean_only(config: RunConfig, *, key: str, why: str) -> None:
    """Refuse a robust strategy with a feature (``key``) that releases only the mean of the updates."""
    spec = strategy_spec(config.strategy)
    mean_names = ", ".join(name for name, row in STRATEGIES.items() if row.family in MEAN_FAMILIES)
    require_together(spec.family in MEAN_FAMILIES, (key, "strategy"),
                     f"{why}: strategy {config.strategy!r} ({spec.family}) needs every site's update in the "
                     f"clear; use one of {mean_names}")


def strategies_markdown() -> str:
    """The README's table of strategies, rendered from :data:`STRATEGIES`."""
    lines = ["| `strategy` | family | what the server does | keys | sites per round |", "|---|---|---|---|---|"]
    for name, spec in STRATEGIES.items():
        keys = ", ".join(f"`{key}`" for key in spec.keys)
        fewest = f"≥ {spec.fewest_text()}" if spec.malicious_factor else ""
        lines.append(f"| `{name}` | {spec.family} | {spec.summary} | {keys} | {fewest} |")
    return "\n".join(lines)
