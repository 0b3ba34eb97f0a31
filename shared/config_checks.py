"""The range checks and the rules that tie run-config keys together; every error names the key(s)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shared.config_values import AUTO, parse_int_list, require, require_together, to_key
from shared.local_weights import split_train_layers
from shared.strategy_table import check_mean_only, check_strategy

if TYPE_CHECKING:
    from shared.config import RunConfig

DEVICES = ("auto", "cpu", "cuda")
# Opacus per-sample gradient modes fedseg allows; "auto" picks the fastest measured one per model.
# "ghost" is excluded on purpose: it needs a per-sample loss and clips wrongly with MONAI's DiceCELoss.
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch")
DP_LEVELS = ("patient", "site", "patient+site")
OPTIMIZERS = ("adam", "sgd")
SLICINGS = ("lowest-resolution", "axial")
PLAN_MODES = ("auto", "manual")


def check_ranges(config: RunConfig) -> None:
    for name in ("in_channels", "round_timeout"):
        _require(getattr(config, name) > 0, name, "must be > 0", getattr(config, name))
    for name in ("num_rounds", "local_steps", "learning_rate", "base_filters", "max_filters", "memory_budget_mb"):
        unset = f" (preset {config.preset!r} leaves it unset)" if not config.is_set(name) else ""
        _require(getattr(config, name) > 0, name, f"must be > 0{unset}", getattr(config, name))
    _require(config.batch_size >= 0, "batch_size", "must be > 0 (or 0: from the plan)", config.batch_size)
    _require(config.spatial_dims in (2, 3), "spatial_dims", "must be 2 or 3", config.spatial_dims)
    _require(config.num_classes >= 2, "num_classes", "must be >= 2 (background + one class)",
             config.num_classes)
    _require(config.plan in PLAN_MODES or config.plan.endswith(".json"), "plan",
             f"must be one of {PLAN_MODES} or the path of a plan.json", config.plan)
    _require(config.slicing in SLICINGS, "slicing", f"must be one of {SLICINGS}", config.slicing)
    _require(0.0 <= config.foreground_fraction <= 1.0, "foreground_fraction", "must be in [0, 1]",
             config.foreground_fraction)
    _require(config.device in DEVICES or config.device.startswith("cuda:"), "device",
             f"must be one of {DEVICES} or 'cuda:N'", config.device)
    _require(config.optimizer in OPTIMIZERS, "optimizer", f"must be one of {OPTIMIZERS}", config.optimizer)
    check_strategy(config)
    for name in ("fraction_train", "fraction_evaluate"):
        _require(0.0 <= getattr(config, name) <= 1.0, name, "must be in [0, 1]", getattr(config, name))
    for name in ("update_norm_bound_factor", "proximal_mu"):
        _require(getattr(config, name) >= 0, name, "must be >= 0 (0 turns it off)", getattr(config, name))
    # update norm rule (server.norm_bounds): a bound below the median would scale the majority down,
    # and a norm rejection needs a median and a MAD that two or three sites cannot give
    bound_factor = config.update_norm_bound_factor
    _require(bound_factor == 0 or bound_factor >= 1, "update_norm_bound_factor",
             "must be 0 (off) or >= 1", bound_factor)
    _require(config.outlier_norm_factor >= max(1.0, bound_factor), "outlier_norm_factor",
             "must be >= 1 and >= update-norm-bound-factor", config.outlier_norm_factor)
    _require(config.outlier_min_sites == 0 or config.outlier_min_sites >= 4, "outlier_min_sites",
             "must be 0 (never reject on norm) or >= 4", config.outlier_min_sites)
    for name in ("server_learning_rate", "server_tau"):
        _require(getattr(config, name) > 0, name, "must be > 0", getattr(config, name))
    _require(0.0 <= config.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)", config.trim_fraction)
    for name in ("min_train_nodes", "min_available_nodes", "min_train_replies"):
        _require(getattr(config, name) >= 1, name, "must be >= 1", getattr(config, name))
    names = [n for n in config.class_names.split(",") if n.strip()]
    _require(not names or len(names) == config.num_classes, "class_names",
             f"needs one name per class ({config.num_classes}, background first)", config.class_names)
    config.ct_window_range()
    check_architecture(config)
    check_privacy(config)
    check_secure_aggregation(config)
    check_transfer(config)


def check_transfer(config: RunConfig) -> None:
    """``initial-model``, its key map and ``evaluate-only`` must fit together (the files are read by the server)."""
    require_together(not config.evaluate_only or bool(config.initial_model), ("evaluate-only", "initial-model"),
                     "an evaluate-only run validates a given model: name it in initial-model")
    _require(bool(split_train_layers(config.train_layers)), "train_layers",
             "must name what trains: 'all', 'decoder', 'norm' or weight name patterns, joined by '+' or ','",
             config.train_layers)
    require_together(not config.initial_model_key_map or bool(config.initial_model),
                     ("initial-model-key-map", "initial-model"), "a key map renames the initial model's weights")


def check_architecture(config: RunConfig) -> None:
    from shared.model import MODELS

    _require(config.model in MODELS, "model", f"must be one of {sorted(MODELS)}", config.model)
    require_together(config.model == "unet" or config.num_res_units < 0, ("num-res-units", "model"),
                     f"'num-res-units' shapes the 'unet' only, and model is {config.model!r} (preset "
                     f"{config.preset!r} or an explicit value sets it)")
    _require(config.deep_supervision >= -1, "deep_supervision", "must be >= 0, or -1 (nnU-Net's rule)",
             config.deep_supervision)
    require_together(config.deep_supervision <= 0 or config.model == "dynunet", ("deep-supervision", "model"),
                     f"deep-supervision heads are DynUNet's, and model is {config.model!r}")
    _require(config.max_filters >= config.base_filters, "max_filters", f"must be >= base-filters "
             f"({config.base_filters})", config.max_filters)
    check_network_keys(config)
    patch = config.patch_size_tuple()
    config.target_spacing_tuple()
    channels = None if config.channels == AUTO else parse_int_list(config.channels, key="channels")
    strides = None if config.strides == AUTO else parse_int_list(config.strides, key="strides")
    require_together((channels is None) == (strides is None), ("channels", "strides"),
                     "set both (the network's levels and the downsampling between them) or neither")
    if channels is None or strides is None:
        return
    _require(len(channels) >= 2, "channels", "needs at least two levels", config.channels)
    _require(len(strides) == len(channels) - 1, "strides",
             f"needs one entry fewer than channels ({len(channels) - 1})", config.strides)
    divisor = 1
    for stride in strides:
        divisor *= stride
    for size in patch or ():
        _require(size % divisor == 0, "patch_size",
                 f"must be divisible by the product of strides ({divisor})",
                 config.patch_size)
        # instance norm normalises over the lowest level's voxels: one voxel would make it fail in training
        _require(size // divisor >= 2, "patch_size",
                 f"must be at least twice the product of strides ({divisor})",
                 config.patch_size)
    check_network(config, channels, strides)


def check_network_keys(config: RunConfig) -> None:
    """The keys only some networks take (``flexible-backbone``, ``channels``/``strides``), and the patch of a
    network whose downsampling MONAI fixes (FlexibleUNet, SwinUNETR: 2**5 along every axis)."""
    from shared.model import MODELS
    from shared.networks.flexibleunet import BACKBONES

    network = MODELS[config.model]
    require_together(config.flexible_backbone == AUTO or "backbone" in network.takes, ("flexible-backbone", "model"),
                     f"'flexible-backbone' chooses FlexibleUNet's encoder, and model is {config.model!r}")
    _require(config.flexible_backbone in (AUTO, *BACKBONES), "flexible_backbone", f"must be one of {BACKBONES}",
             config.flexible_backbone)
    require_together(not config.dp or network.dp_modes is None or config.dp_grad_sample_mode in network.dp_modes,
                     ("dp-grad-sample-mode", "model"), f"model {config.model!r} has exact per-sample gradients in "
                     f"modes {network.dp_modes} only (fedseg's samplers; see client/training/dp_windows.py)")
    divisor = network.divisor(dims=config.spatial_dims)
    if divisor is None:
        return
    require_together(config.channels == AUTO and config.strides == AUTO, ("channels", "strides", "model"),
                     f"model {config.model!r} fixes its levels (MONAI halves every axis {network.fixed_halvings} "
                     "times): set its width with base-filters, not channels or strides")
    for size, d in zip(config.patch_size_tuple() or (), divisor):
        require_together(size % d == 0 and size // d >= 2, ("patch-size", "model"),
                         f"model {config.model!r} halves every axis {network.fixed_halvings} times: every patch "
                         f"edge must be a multiple of {d} and at least {2 * d}, got {config.patch_size!r}")


def check_network(config: RunConfig, channels: tuple[int, ...], strides: tuple[int, ...]) -> None:
    """Hand-set levels must make a network of ``model``: ModelConfig's rules, named as run config keys."""
    from shared.model import ModelConfig, ModelConfigError

    try:
        ModelConfig(name=config.model, spatial_dims=config.spatial_dims, in_channels=config.in_channels,
                    num_classes=config.num_classes, channels=channels, strides=strides,
                    num_res_units=max(config.num_res_units, 0) if config.model == "unet" else 0,
                    deep_supervision=max(config.deep_supervision, 0))
    except ModelConfigError as exc:
        field = {"name": "model"}.get(exc.field, exc.field)
        _require(False, field, exc.rule, getattr(config, field, exc.value))


def check_privacy(config: RunConfig) -> None:
    _require(config.dp_max_grad_norm > 0, "dp_max_grad_norm", "must be > 0", config.dp_max_grad_norm)
    for name in ("dp_noise_multiplier", "dp_target_epsilon"):
        _require(getattr(config, name) >= 0, name, "must be >= 0 (0: not the noise's source)", getattr(config, name))
    sources = [key for key, on in (("dp-noise-from-budget", config.dp_noise_from_budget),
                                   ("dp-target-epsilon", config.dp_target_epsilon > 0),
                                   ("dp-noise-multiplier", config.dp_noise_multiplier > 0)) if on]
    require_together(not config.patient_dp or len(sources) == 1, ("dp-noise-from-budget", "dp-target-epsilon",
                                                        "dp-noise-multiplier"),
                     f"exactly one must name the DP noise's source, got {sources or 'none'} (set "
                     f"dp-noise-from-budget = false to use another)")
    check_site_privacy(config)
    require_together(not (config.patient_dp and config.strategy == "fedprox"), ("dp", "strategy"),
                     "FedProx cannot be combined with DP: Opacus clips and noises per-sample gradients only, "
                     "so the proximal term would be dropped")
    _require(config.dp_grad_sample_mode in GRAD_SAMPLE_MODES, "dp_grad_sample_mode",
             f"must be one of {GRAD_SAMPLE_MODES}", config.dp_grad_sample_mode)


def check_site_privacy(config: RunConfig) -> None:
    _require(config.dp_level in DP_LEVELS, "dp_level", f"must be one of {DP_LEVELS}", config.dp_level)
    _require(config.dp_site_noise_multiplier > 0, "dp_site_noise_multiplier", "must be > 0",
             config.dp_site_noise_multiplier)
    _require(0 < config.dp_site_delta < 1, "dp_site_delta", "must be in (0, 1)", config.dp_site_delta)
    _require(config.dp_site_clipping_norm >= 0, "dp_site_clipping_norm", "must be >= 0",
             config.dp_site_clipping_norm)
    if not config.site_dp:
        return
    _require(config.dp_site_clipping_norm > 0, "dp_site_clipping_norm",
             "must be > 0 with dp-level site or patient+site: set it near the sites' update norms "
             "('update-norm' in a run's metrics.jsonl)", config.dp_site_clipping_norm)
    check_mean_only(config, key="dp-level", why="hospital-level DP adds noise to the sum of clipped updates")


def check_secure_aggregation(config: RunConfig) -> None:
    _require(config.secagg_threshold >= 2, "secagg_threshold",
             "must be >= 2 (one share would reveal a site's secret)", config.secagg_threshold)
    for name in ("secagg_clipping_range", "secagg_max_weight"):
        _require(getattr(config, name) > 0, name, "must be > 0", getattr(config, name))
    _require(config.secagg_update_norm_bound >= 0, "secagg_update_norm_bound", "must be >= 0 (0 turns it off)",
             config.secagg_update_norm_bound)
    _require(config.secagg_quantization_range >= 2, "secagg_quantization_range", "must be >= 2",
             config.secagg_quantization_range)
    modulus = config.secagg_modulus_range
    _require(modulus > config.secagg_quantization_range and modulus & (modulus - 1) == 0 and modulus <= 2**32,
             "secagg_modulus_range", "must be a power of 2, above secagg-quantization-range and at most 2**32",
             modulus)
    if not config.secure_aggregation:
        return
    check_mean_only(config, key="secure-aggregation", why="secure aggregation releases only the sum of the updates")
    require_together(not config.overlap_evaluation, ("secure-aggregation", "overlap-evaluation"),
                     "a secure round exchanges four messages with every site; evaluation cannot travel with "
                     "its training message (set overlap-evaluation = false)")


def _require(ok: bool, field_name: str, rule: str, value: Any) -> None:
    require(ok, to_key(field_name), rule, value)
