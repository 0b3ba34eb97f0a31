"""The fedseg run configuration: one typed dataclass, read from Flower's run config.

The defaults below are the single source of truth. ``pyproject.toml`` lists the
same keys under ``[tool.flwr.app.config]`` (Flower only accepts overrides of
keys it lists there); a test keeps the two in agreement. The named recipes
(:data:`PRESETS`) live here too, so every way of starting a run begins from
the same one.

Run-config keys are flat and kebab-case (``learning-rate``); the dataclass
fields are the same names in snake_case (``learning_rate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shared.config_checks import check_ranges
from shared.config_values import (
    AUTO,
    parse_float_list,
    parse_int_list,
    per_axis,
    require,
    to_key,
)
from shared.errors import ConfigError

#: A site's privacy budget and delta when its node config leaves them out (node config ``max-epsilon``,
#: ``dp-delta``: site-owned, not run config; the schema is :data:`shared.protocol.NODE_CONFIG_KEYS`).
DEFAULT_MAX_EPSILON = 8.0
DEFAULT_DP_DELTA = 1e-5

__all__ = ["AUTO", "PRESETS", "RunConfig", "parse_float_list", "parse_int_list", "to_key"]


#: Named recipes. A preset's value is taken for every key the run config leaves unset.
#: "default" is what ``flwr run``, ``deploy.run_federation`` and the harness train unless told
#: otherwise: nnU-Net's network and recipe (foreground oversampling, deep supervision) sized for CPU
#: (filters from 16, at most 256, 256 MiB per site), with a budget of 1250 steps per site (nnU-Net
#: counts 250 per epoch) split into 25 rounds of 50: on the six-donor task 50-step rounds reached
#: federated/pooled Dice 0.96x where 250-step rounds, over which each site drifts towards its own data
#: between averagings, reached 0.81x (BENCHMARKS.md, "Real anatomy"). Adam at 1e-3,
#: not nnU-Net's SGD: in 1500 steps on the same task Adam reached Dice 0.75 where SGD (lr 0.05,
#: momentum 0.9) reached 0.61. "small-unet" is the recipe tuned on the synthetic federation
#: (BENCHMARKS.md, issue 7): a 12k-weight U-Net, batches of 128, SGD at 0.2.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {"model": "dynunet", "optimizer": "adam", "learning-rate": 0.001, "num-rounds": 25,
                "local-steps": 50, "base-filters": 16, "max-filters": 256, "memory-budget-mb": 256,
                "slicing": "lowest-resolution", "foreground-fraction": 0.33},
    "small-unet": {"model": "unet", "channels": "8,16,32", "strides": "2,2", "num-res-units": 1,
                   "batch-size": 128, "optimizer": "sgd", "learning-rate": 0.2, "num-rounds": 5,
                   "local-steps": 40, "base-filters": 8, "max-filters": 32, "memory-budget-mb": 1024,
                   "slicing": "lowest-resolution", "foreground-fraction": 0.5},
}
#: Keys a preset may set: their dataclass default means "unset".
PRESET_KEYS = ("model", "num_rounds", "local_steps", "batch_size", "learning_rate", "optimizer", "channels", "strides",
               "num_res_units", "base_filters", "max_filters", "patch_size", "target_spacing", "slicing",
               "memory_budget_mb", "foreground_fraction")
#: Keys the plan derives when neither the run config nor the preset sets them.
PLANNED_KEYS = ("batch_size", "channels", "strides", "patch_size", "target_spacing")
#: Text keys that also accept a number (``patch-size = 64``).
NUMERIC_TEXT_KEYS = ("patch_size", "target_spacing")


@dataclass(frozen=True)
class RunConfig:
    """Everything the operator (or a researcher) sets for one federated run.

    **Recipe and plan.** ``preset`` names a recipe in :data:`PRESETS`; every
    key the preset lists and the run config leaves at its "unset" value
    (``"auto"`` for text keys, 0 for numbers; see :data:`UNSET`) takes the
    preset's value, so ``flwr run``, ``deploy.run_federation`` and the
    simulation harness all train the same recipe by default. ``plan`` =
    ``"auto"`` derives what is still unset (target spacing, patch size, batch
    size, network topology, normalisation, 2D slicing) from the sites' data
    fingerprints before round 1, as nnU-Net plans (``server.planning``);
    ``"manual"`` takes it from these keys alone; a path reuses a ``plan.json``.

    **DP.** The ``dp*`` keys choose the DP-SGD mechanism every site trains
    with: ``dp`` (on/off), ``dp-max-grad-norm`` (per-case clipping norm) and
    the noise, from exactly one source: ``dp-noise-from-budget`` (true, the
    default: each site computes the noise that spends what is left of its
    budget, node config ``max-epsilon`` minus what its privacy ledger holds,
    over this round and the run's remaining rounds), ``dp-target-epsilon``
    (> 0: the noise that spends this epsilon per round) or
    ``dp-noise-multiplier`` (> 0). A site's budget, delta and whether it
    requires DP are node config (``client.runtime.site_config``), which no run config key can change.

    ``dp-level`` says whom DP protects: ``patient`` (DP-SGD at every site, the
    keys above), ``site`` (a whole hospital: DP-FedAvg, :mod:`server.site_dp`:
    each site's change to the model is clipped to ``dp-site-clipping-norm``, the
    sites weigh equally, and Gaussian noise of ``dp-site-noise-multiplier`` x
    the clipping norm is added to their sum, with Flower's accountant reporting
    the epsilon at ``dp-site-delta`` every round) or ``patient+site`` (both).
    ``dp = false`` turns every level off. The clipping norm has no safe default
    (it must sit near the sites' update norms, which ``update-norm`` in a run's
    ``metrics.jsonl`` shows): a site-level run without it is refused.

    ``overlap-evaluation`` (true) sends round r's evaluation together with round
    r+1's training (:func:`server.rounds.run_rounds`): the same work and results,
    one wait for the slowest site per round instead of two, but round r's
    metrics and checkpoint are written only once round r+1's updates are in.

    ``model`` names the network (``shared.model.MODELS``, one module each in
    ``shared/networks/``), every one MONAI's: ``unet`` (UNet, ReLU),
    ``dynunet`` (DynUNet, nnU-Net's network: plain convolution blocks,
    LeakyReLU), ``segresnet`` (SegResNet: init filters = the first level's,
    features doubling per level, as many of the plan's levels as stay within
    ``max-filters``; ``strides`` all 2), ``attentionunet`` (AttentionUnet:
    ``channels`` and per-axis ``strides`` as the U-Net's), ``flexibleunet``
    (FlexibleUNet, a ResNet encoder named by ``flexible-backbone``, default
    ``resnet10``; decoder widths from ``base-filters`` doubling up to
    ``max-filters``) and ``swinunetr`` (SwinUNETR, 2D or 3D: feature size =
    ``base-filters`` rounded up to a multiple of 12). FlexibleUNet and
    SwinUNETR downsample every axis 5 times (MONAI fixes it): they take no
    ``channels`` or ``strides``, and every ``patch-size`` edge must be a
    multiple of 32 and at least 64. ``num-res-units`` is the U-Net's only.
    ``deep-supervision`` is DynUNet's number of deep-supervision heads (0 =
    off); -1 (default) = nnU-Net's rule, ``levels - 3`` heads for dynunet
    (``levels`` = entries of ``channels``) and none for the others.

    **Strategies.** ``strategy`` names a row of the table of strategies
    (:data:`shared.strategy_table.STRATEGIES`), which lists the keys each one
    reads: ``proximal-mu`` (fedprox), ``server-learning-rate`` and
    ``server-tau`` (fedadam, fedyogi), ``trim-fraction`` (fedtrimmedavg),
    ``malicious-sites`` (f: the bad updates krum, multikrum and bulyan
    tolerate; a round must sample at least 2f + 3 sites, 4f + 3 for bulyan)
    and ``multikrum-keep`` (updates Multi-Krum averages; 0: n - f).

    **Secure aggregation.** ``secure-aggregation`` (false) runs every training
    round as Flower's SecAgg+ protocol (``server.secagg``, ``client.runtime.secagg``):
    the server learns only the sum of the sites' updates. ``secagg-threshold``
    is the number of sites whose key shares rebuild a secret (Shamir), hence
    the fewest sites a round can finish with; each site clips every coordinate
    of its example-weighted change to the model to ``secagg-clipping-range``
    and quantises it to ``secagg-quantization-range`` levels, masked modulo
    ``secagg-modulus-range`` (a power of 2); ``secagg-max-weight`` is the
    largest ``num-examples`` a site may weigh with; ``secagg-update-norm-bound``
    (> 0) scales a site's change down to this L2 norm before masking (0: off).

    **Transfer learning and personal models.** ``local-norm`` (false) keeps
    every normalisation layer's weights at each site (FedBN,
    :mod:`shared.local_weights`): trained and stored in the site's state
    directory, never sent, left out of the average; each site evaluates with its
    own. ``initial-model`` (empty: a fresh seeded model) starts round 1 from a
    fedseg ``global_model.pt``, a MONAI bundle folder (``configs/*.json`` +
    ``models/model.pt``) or a torch state dict file, whose names may be renamed
    by the JSON object ``{"file's name": "fedseg's name"}`` in
    ``initial-model-key-map``; names, shapes and architecture are checked before
    round 1 (:mod:`server.initial_model`). ``evaluate-only`` (false) sends the
    ``initial-model`` to every site for evaluation and trains nothing (no
    privacy budget is spent). ``train-layers`` (``all``) names what trains:
    ``+``/``,``-separated groups ``all``, ``decoder``, ``norm`` or ``fnmatch``
    patterns over weight names; every other weight stays as the server sent it
    (no gradient step, no DP noise) and is neither sent back nor averaged.
    """

    num_rounds: int = 0
    preset: str = "default"
    plan: str = "auto"
    model: str = AUTO
    local_steps: int = 0
    batch_size: int = 0
    learning_rate: float = 0.0
    optimizer: str = AUTO
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    channels: str = AUTO
    strides: str = AUTO
    num_res_units: int = -1
    deep_supervision: int = -1
    flexible_backbone: str = AUTO
    base_filters: int = 0
    max_filters: int = 0
    patch_size: str = AUTO
    target_spacing: str = AUTO
    slicing: str = AUTO
    memory_budget_mb: int = 0
    foreground_fraction: float = -1.0
    ct_window: str = "-1000,1000"
    class_names: str = ""
    device: str = "auto"
    seed: int = 0
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_nodes: int = 1
    min_available_nodes: int = 1
    round_timeout: float = 3600.0
    overlap_evaluation: bool = False
    min_train_replies: int = 1
    update_norm_bound_factor: float = 10.0
    outlier_norm_factor: float = 100.0
    outlier_min_sites: int = 5
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_tau: float = 0.001
    trim_fraction: float = 0.2
    malicious_sites: int = 1
    multikrum_keep: int = 0
    resume_from: str = ""
    run_dir: str = ""
    simulation_sites: str = ""
    dp: bool = True
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_target_epsilon: float = 0.0
    dp_noise_from_budget: bool = True
    dp_grad_sample_mode: str = "auto"
    dp_level: str = "patient"
    dp_site_noise_multiplier: float = 1.0
    dp_site_clipping_norm: float = 0.0
    dp_site_delta: float = 1e-5
    secure_aggregation: bool = False
    secagg_threshold: int = 2
    secagg_clipping_range: float = 8.0
    secagg_quantization_range: int = 4194304
    secagg_modulus_range: int = 4294967296
    secagg_max_weight: float = 1000.0
    secagg_update_norm_bound: float = 0.0
    local_norm: bool = False
    initial_model: str = ""
    initial_model_key_map: str = ""
    evaluate_only: bool = False
    train_layers: str = "all"

    def __post_init__(self) -> None:
        self._check_types()
        require(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}", self.preset)
        self._apply_preset()
        check_ranges(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a config from run-config ``values`` (kebab-case keys).

        Missing keys take their defaults, then the preset's values. An unknown
        key or a bad value raises :class:`ConfigError` naming the key.
        """
        known = {to_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run config key(s): {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls(**{known[key]: value for key, value in values.items()})

    @classmethod
    def declared_defaults(cls) -> dict[str, Any]:
        """The dataclass defaults as run-config values, before any preset (what ``pyproject.toml`` lists)."""
        return {to_key(f.name): f.default for f in fields(cls)}

    def to_mapping(self) -> dict[str, Any]:
        """Return the config as run-config values (kebab-case keys), the preset applied."""
        return {to_key(k): v for k, v in dataclasses.asdict(self).items()}

    def is_set(self, field_name: str) -> bool:
        """True if ``field_name`` has a value (from the run config or the preset), not "unset"."""
        return getattr(self, field_name) != _DEFAULTS[field_name]

    @property
    def patient_dp(self) -> bool:
        """True when every site trains with DP-SGD (``dp`` on, ``dp-level`` patient or patient+site)."""
        return self.dp and "patient" in self.dp_level

    @property
    def site_dp(self) -> bool:
        """True when the aggregate gets hospital-level DP (``dp`` on, ``dp-level`` site or patient+site)."""
        return self.dp and "site" in self.dp_level

    def run_timeout_s(self) -> float:
        """The longest a run may take when the fingerprint phase and each round's training and
        evaluation all use their whole ``round-timeout``. A hung site is already cut off by
        ``round-timeout``: a whole-run limit only catches a run that stopped making progress and
        must not stop a slow one (25 rounds on CPU take hours)."""
        return (2 * self.num_rounds + 1) * self.round_timeout

    def ct_window_range(self) -> tuple[float, float]:
        """The CT intensity window (HU) as (low, high) that a manual plan clips CT channels to."""
        try:
            low, high = (float(part) for part in self.ct_window.split(","))
        except ValueError:
            raise ConfigError(f"run config key 'ct-window': expected 'LOW,HIGH' in HU, "
                              f"got {self.ct_window!r}") from None
        require(low < high, "ct-window", "needs LOW < HIGH", self.ct_window)
        return low, high

    def patch_size_tuple(self) -> tuple[int, ...] | None:
        """``patch-size`` per axis, or None when the plan derives it."""
        if self.patch_size == AUTO:
            return None
        sizes = parse_int_list(self.patch_size, key="patch-size")
        return per_axis(sizes, dims=self.spatial_dims, key="patch-size")

    def target_spacing_tuple(self) -> tuple[float, ...] | None:
        """``target-spacing`` in mm (one value, or one per axis: 2 in 2D, 3 in 3D), or None when planned."""
        if self.target_spacing == AUTO:
            return None
        return per_axis(parse_float_list(self.target_spacing, key="target-spacing"), dims=self.spatial_dims,
                        key="target-spacing")

    def _apply_preset(self) -> None:
        for key, value in PRESETS[self.preset].items():
            name = key.replace("-", "_")
            if not self.is_set(name):
                object.__setattr__(self, name, value)
        self._check_types()

    def _check_types(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"int": int, "float": float, "str": str, "bool": bool}[str(f.type)]
            if expected is bool:
                if not isinstance(value, bool):
                    raise ConfigError(f"run config key '{to_key(f.name)}': expected true or false, "
                                      f"got {type(value).__name__} {value!r}")
                continue
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                continue
            if f.name in NUMERIC_TEXT_KEYS and isinstance(value, int | float) and not isinstance(value, bool):
                object.__setattr__(self, f.name, str(value))
                continue
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(
                    f"run config key '{to_key(f.name)}': expected {expected.__name__}, "
                    f"got {type(value).__name__} {value!r}"
                )

_DEFAULTS = {f.name: f.default for f in fields(RunConfig)}


def _require(ok: bool, field_name: str, rule: str, value: Any) -> None:
    require(ok, to_key(field_name), rule, value)
