"""The fedseg run configuration: one typed dataclass, read from Flower's run config.

The defaults below are the single source of truth. ``pyproject.toml`` lists the
same keys under ``[tool.flwr.app.config]`` (Flower only accepts overrides of
keys it lists there); a test keeps the two in agreement.

Run-config keys are flat and kebab-case (``learning-rate``); the dataclass
fields are the same names in snake_case (``learning_rate``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from shared.errors import ConfigError
from shared.model import DEFAULT_ACT, MODELS, ModelConfig, ModelConfigError, default_deep_supervision

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg")
DEVICES = ("auto", "cpu", "cuda")
# Opacus per-sample gradient modes fedseg allows; "auto" picks the fastest measured one per model.
# "ghost" is excluded on purpose: it needs a per-sample loss and clips wrongly with MONAI's DiceCELoss.
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch")
OPTIMIZERS = ("adam", "sgd")


def to_key(field_name: str) -> str:
    """Return the run-config key of a dataclass field (``a_b`` -> ``a-b``)."""
    return field_name.replace("_", "-")


def parse_int_list(value: str, *, key: str) -> tuple[int, ...]:
    """Parse a comma-separated list of positive integers such as ``"16,32,64"``."""
    try:
        items = tuple(int(part) for part in str(value).split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"run config key '{key}': expected comma-separated integers, got {value!r}"
        ) from None
    if not items or any(item <= 0 for item in items):
        raise ConfigError(
            f"run config key '{key}': expected positive integers, got {value!r}"
        )
    return items


@dataclass(frozen=True)
class RunConfig:
    """Everything the operator (or a researcher) sets for one federated run.

    The ``dp*`` keys choose the DP-SGD mechanism every site trains with: ``dp``
    (on/off), ``dp-noise-multiplier``, ``dp-max-grad-norm`` (per-case clipping
    norm), ``dp-target-epsilon`` (> 0: each site computes the noise that spends
    this epsilon per round, at its own delta), ``dp-noise-from-budget`` (true:
    each site computes the noise that spends what is left of its budget, node
    config ``max-epsilon`` minus what its privacy ledger holds, over this round
    and the run's remaining rounds) and ``dp-grad-sample-mode``. A site's
    budget, delta and whether it requires DP are node config (``client.site``),
    which no run config key can change.

    ``overlap-evaluation`` (true) sends round r's evaluation together with round
    r+1's training (:func:`server.rounds.run_rounds`): the same work and results,
    one wait for the slowest site per round instead of two, but round r's
    metrics and checkpoint are written only once round r+1's updates are in.

    ``model`` names the network (``shared.model.MODELS``): ``unet`` (MONAI
    UNet, ReLU) or ``dynunet`` (MONAI DynUNet, nnU-Net's network: plain
    convolution blocks, LeakyReLU; ``num-res-units`` is the U-Net's only).
    ``deep-supervision`` is DynUNet's number of deep-supervision heads (0 =
    off); -1 (default) = nnU-Net's rule, ``levels - 3`` heads for dynunet
    (``levels`` = entries of ``channels``) and none for unet.
    """

    num_rounds: int = 5
    local_epochs: int = 5
    batch_size: int = 4
    learning_rate: float = 0.005
    optimizer: str = "adam"
    spatial_dims: int = 2
    in_channels: int = 1
    num_classes: int = 2
    channels: str = "16,32,64,128"
    strides: str = "2,2,2"
    num_res_units: int = 1
    model: str = "unet"
    deep_supervision: int = -1
    patch_size: int = 64
    target_spacing: float = 1.0
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
    max_update_norm_factor: float = 10.0
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.01
    server_tau: float = 0.001
    trim_fraction: float = 0.2
    resume_from: str = ""
    run_dir: str = ""
    simulation_sites: str = ""
    dp: bool = True
    dp_noise_multiplier: float = 1.0
    dp_max_grad_norm: float = 1.0
    dp_target_epsilon: float = 0.0
    dp_noise_from_budget: bool = False
    dp_grad_sample_mode: str = "auto"

    def __post_init__(self) -> None:
        self._check_types()
        self._check_ranges()

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a config from run-config ``values`` (kebab-case keys).

        Missing keys take their defaults. An unknown key or a bad value raises
        :class:`ConfigError` naming the key.
        """
        known = {to_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run config key(s): {', '.join(map(repr, unknown))}; "
                f"known keys: {', '.join(sorted(known))}"
            )
        return cls(**{known[key]: value for key, value in values.items()})

    def to_mapping(self) -> dict[str, Any]:
        """Return the config as run-config values (kebab-case keys)."""
        return {to_key(k): v for k, v in dataclasses.asdict(self).items()}

    def model_config(self) -> ModelConfig:
        """Return the architecture this run trains."""
        channels = parse_int_list(self.channels, key="channels")
        deep_supervision = self.deep_supervision
        if deep_supervision == -1:
            deep_supervision = default_deep_supervision(self.model, levels=len(channels))
        return ModelConfig(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            channels=channels,
            strides=parse_int_list(self.strides, key="strides"),
            num_res_units=self.num_res_units if self.model == "unet" else 0,
            act=DEFAULT_ACT[self.model],
            name=self.model,
            deep_supervision=deep_supervision,
        )

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
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(
                    f"run config key '{to_key(f.name)}': expected {expected.__name__}, "
                    f"got {type(value).__name__} {value!r}"
                )

    def _check_ranges(self) -> None:
        positive = (
            "num_rounds", "local_epochs", "batch_size", "learning_rate",
            "in_channels", "patch_size", "target_spacing", "round_timeout",
        )
        for name in positive:
            _require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        _require(self.spatial_dims in (2, 3), "spatial_dims", "must be 2 or 3", self.spatial_dims)
        _require(self.num_classes >= 2, "num_classes", "must be >= 2 (background + one class)", self.num_classes)
        _require(self.num_res_units >= 0, "num_res_units", "must be >= 0", self.num_res_units)
        _require(self.device in DEVICES or self.device.startswith("cuda:"), "device",
                 f"must be one of {DEVICES} or 'cuda:N'", self.device)
        _require(self.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}", self.optimizer)
        _require(self.strategy in STRATEGIES, "strategy", f"must be one of {STRATEGIES}", self.strategy)
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            _require(0.0 <= value <= 1.0, name, "must be in [0, 1]", value)
        for name in ("max_update_norm_factor", "proximal_mu"):
            _require(getattr(self, name) >= 0, name, "must be >= 0 (0 turns it off)", getattr(self, name))
        for name in ("server_learning_rate", "server_tau"):
            _require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        _require(0.0 <= self.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)", self.trim_fraction)
        for name in ("min_train_nodes", "min_available_nodes", "min_train_replies"):
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        self._check_architecture()
        names = [n for n in self.class_names.split(",") if n.strip()]
        _require(not names or len(names) == self.num_classes, "class_names",
                 f"needs one name per class ({self.num_classes}, background first)", self.class_names)
        self.ct_window_range()
        self._check_privacy()

    def ct_window_range(self) -> tuple[float, float]:
        """The CT intensity window (HU) as (low, high); CT channels are clipped to it and scaled to [0, 1]."""
        try:
            low, high = (float(part) for part in self.ct_window.split(","))
        except ValueError:
            raise ConfigError(f"run config key 'ct-window': expected 'LOW,HIGH' in HU, got {self.ct_window!r}") from None
        _require(low < high, "ct_window", "needs LOW < HIGH", self.ct_window)
        return low, high

    def _check_privacy(self) -> None:
        for name in ("dp_noise_multiplier", "dp_max_grad_norm"):
            _require(getattr(self, name) > 0, name, "must be > 0", getattr(self, name))
        _require(self.dp_target_epsilon >= 0, "dp_target_epsilon",
                 "must be >= 0 (0 = use dp-noise-multiplier)", self.dp_target_epsilon)
        _require(not (self.dp_noise_from_budget and self.dp_target_epsilon > 0), "dp_noise_from_budget",
                 "cannot be combined with 'dp-target-epsilon' > 0 (each names the noise's source)",
                 self.dp_noise_from_budget)
        _require(self.dp_grad_sample_mode in GRAD_SAMPLE_MODES, "dp_grad_sample_mode",
                 f"must be one of {GRAD_SAMPLE_MODES}", self.dp_grad_sample_mode)

    def _check_architecture(self) -> None:
        channels = parse_int_list(self.channels, key="channels")
        strides = parse_int_list(self.strides, key="strides")
        _require(len(channels) >= 2, "channels", "needs at least two levels", self.channels)
        _require(len(strides) == len(channels) - 1, "strides",
                 f"needs one entry fewer than channels ({len(channels) - 1})", self.strides)
        divisor = 1
        for stride in strides:
            divisor *= stride
        _require(self.patch_size % divisor == 0, "patch_size",
                 f"must be divisible by the product of strides ({divisor})", self.patch_size)
        self._check_model(divisor)

    def _check_model(self, divisor: int) -> None:
        """The network keys (``model``, ``deep-supervision``); ModelConfig's rules, named as run config keys."""
        _require(self.model in MODELS, "model", f"must be one of {sorted(MODELS)}", self.model)
        _require(self.deep_supervision >= -1, "deep_supervision", "must be >= 0, or -1 (nnU-Net's rule)",
                 self.deep_supervision)
        # instance norm normalises over the lowest level's voxels: one voxel would make it fail in training
        _require(self.patch_size // divisor >= 2, "patch_size",
                 f"must be at least twice the product of strides ({divisor})", self.patch_size)
        try:
            self.model_config()
        except ModelConfigError as exc:
            field = {"name": "model"}.get(exc.field, exc.field)
            _require(False, field, exc.rule, getattr(self, field, exc.value))


def _require(ok: bool, field_name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"run config key '{to_key(field_name)}': {rule}, got {value!r}")
