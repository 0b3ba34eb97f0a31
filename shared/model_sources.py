"""Where a run's starting model comes from (run config ``initial-model``), checked against the run's network.

Three kinds of source are read:

- a fedseg model file (``global_model.pt`` of an earlier run): weights, the
  model config they belong to and the run's plan, behind a sha256 of the weights;
- a MONAI bundle folder: the network definition ``network_def`` in one of
  ``configs/*.json`` (instantiated by MONAI's own ``ConfigParser``) and the
  weights in ``models/model.pt``;
- any other file ``torch.load`` reads with ``weights_only=True``: a state dict,
  or a checkpoint dict holding one under ``state_dict``, ``model`` or ``network``.

Names can be mapped first (run config ``initial-model-key-map``: a JSON object
``{"name in the file": "fedseg's name"}``; a key ending in ``.`` renames that
prefix, a ``null`` value drops the weight). :func:`fit_to_network` then checks
the architecture (a fedseg file's model config, a bundle's network class) and
every name and shape, and refuses a mismatch naming the keys at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError, WeightsError
from shared.json_files import read_json

if TYPE_CHECKING:
    import torch

    from shared.model import ModelConfig

KEY = "initial-model"
CHECKPOINT_KEYS = ("state_dict", "model", "network")
BUNDLE_WEIGHTS = Path("models") / "model.pt"
SHOWN_KEYS = 5


@dataclass(frozen=True)
class ModelSource:
    """A starting model as read from disk (names mapped, not yet checked against the run's network)."""

    path: Path
    kind: str  # "fedseg-model", "monai-bundle" or "state-dict"
    sha256: str  # of the weights file's bytes
    state_dict: dict[str, Any]
    model_config: dict[str, Any] | None = None  # a fedseg file's
    plan: dict[str, Any] | None = None  # a fedseg file's
    network_class: str | None = None  # a bundle's network_def class
    network_state: dict[str, tuple[int, ...]] = field(default_factory=dict)  # a bundle's network: name -> shape

    def provenance(self) -> dict[str, str]:
        """What a run records about where it started."""
        return {"path": str(self.path), "kind": self.kind, "sha256": self.sha256}


def open_model_source(path: Path | str, *, key_map: str = "") -> ModelSource:
    """Read the starting model at ``path`` (file or bundle folder) and apply ``key_map`` (a JSON file path)."""
    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"run config key '{KEY}': {path} does not exist")
    source = _open_bundle(path) if path.is_dir() else _open_file(path)
    if key_map:
        source = dataclasses.replace(source, state_dict=apply_key_map(source.state_dict, read_key_map(key_map)))
    return source


def fit_to_network(source: ModelSource, model_config: ModelConfig) -> dict[str, torch.Tensor]:
    """The source's weights in the order of the network ``model_config`` builds; raise naming what differs."""
    import torch

    from shared.model import ModelConfig, build_model

    if source.model_config is not None:
        theirs = ModelConfig.from_dict(source.model_config)
        differences = [f"{f.name} {getattr(theirs, f.name)!r} (run: {getattr(model_config, f.name)!r})"
                       for f in dataclasses.fields(model_config)
                       if getattr(theirs, f.name) != getattr(model_config, f.name)]
        if differences:
            raise WeightsError(f"{KEY} {source.path}: its network differs from this run's plan: "
                               f"{'; '.join(differences)}; reuse the plan it was trained with (run config "
                               "'plan' = its run folder's plan.json, or leave 'plan' = 'auto')")
    with torch.device("meta"):
        model = build_model(model_config)
    if source.network_class is not None and source.network_class != type(model).__name__:
        raise WeightsError(f"{KEY} {source.path}: the bundle's network_def is {source.network_class}, this run "
                           f"trains {type(model).__name__} (run config 'model' = {model_config.name!r})")
    expected = model.state_dict()
    if source.network_state:
        _check_names(source.path, "the bundle's network_def", source.network_state,
                     {k: tuple(v.shape) for k, v in expected.items()})
    _check_names(source.path, "the weights", {k: tuple(v.shape) for k, v in source.state_dict.items()},
                 {k: tuple(v.shape) for k, v in expected.items()})
    fitted = {}
    for name, reference in expected.items():
        tensor = source.state_dict[name]
        if tensor.dtype != reference.dtype:
            if not (tensor.is_floating_point() and reference.is_floating_point()):
                raise WeightsError(f"{KEY} {source.path}: weight '{name}' is {tensor.dtype}, the network's "
                                   f"{reference.dtype}")
            tensor = tensor.to(reference.dtype)
        fitted[name] = tensor.detach().cpu().contiguous()
    return fitted


def _check_names(path: Path, what: str, found: dict[str, tuple[int, ...]],
                 expected: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"'{k}' {found[k]} (network: {shape})" for k, shape in expected.items()
              if k in found and tuple(found[k]) != tuple(shape)]
    problems = [f"{label} {len(keys)}: {', '.join(map(str, keys[:SHOWN_KEYS]))}{' ...' if len(keys) > SHOWN_KEYS else ''}"
                for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
    if problems:
        raise WeightsError(f"{KEY} {path}: {what} and this run's network differ: {'; '.join(problems)} "
                           f"(rename keys with run config 'initial-model-key-map')")


def _open_file(path: Path) -> ModelSource:
    from shared.model_file import MODEL_FORMAT, weights_digest

    payload = _torch_load(path)
    sha = file_sha256(path)
    if isinstance(payload, dict) and payload.get("format") == MODEL_FORMAT:
        if "sha256" in payload and payload["sha256"] != weights_digest(payload["state_dict"]):
            raise WeightsError(f"{KEY} {path}: the weights do not match the file's content hash (sha256)")
        return ModelSource(path=path, kind="fedseg-model", sha256=sha, state_dict=dict(payload["state_dict"]),
                           model_config=payload["model_config"], plan=payload.get("plan"))
    return ModelSource(path=path, kind="state-dict", sha256=sha, state_dict=_state_dict_of(payload, path))


def _open_bundle(folder: Path) -> ModelSource:
    import torch

    weights = folder / BUNDLE_WEIGHTS
    if not weights.is_file():
        raise ConfigError(f"run config key '{KEY}': {folder} is a folder but not a MONAI bundle "
                          f"(no {BUNDLE_WEIGHTS})")
    config_file, network = _bundle_network(folder)
    with torch.device("meta"):
        module = network()
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"run config key '{KEY}': network_def in {config_file} is not a torch module")
    return ModelSource(path=folder, kind="monai-bundle", sha256=file_sha256(weights),
                       state_dict=_state_dict_of(_torch_load(weights), weights), network_class=type(module).__name__,
                       network_state={k: tuple(v.shape) for k, v in module.state_dict().items()})


def _bundle_network(folder: Path) -> tuple[Path, Any]:
    """(config file, a function instantiating its ``network_def``) of the first ``configs/*.json`` defining one."""
    from monai.bundle import ConfigParser

    candidates = sorted((folder / "configs").glob("*.json"), key=lambda p: (p.name != "inference.json", p.name))
    for config_file in candidates:
        parser = ConfigParser()
        try:
            parser.read_config(str(config_file))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"run config key '{KEY}': {config_file} is not readable JSON ({exc})") from None
        if "network_def" not in parser:
            continue

        def instantiate(parser: ConfigParser = parser, config_file: Path = config_file) -> Any:
            try:
                return parser.get_parsed_content("network_def", instantiate=True)
            except Exception as exc:  # noqa: BLE001 - MONAI raises many types for a bad definition
                raise ConfigError(f"run config key '{KEY}': network_def in {config_file} cannot be built "
                                  f"({type(exc).__name__}: {exc})") from None

        return config_file, instantiate
    raise ConfigError(f"run config key '{KEY}': no configs/*.json of bundle {folder} defines 'network_def'")


def _torch_load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for unreadable or unsafe files
        raise WeightsError(f"{KEY} {path}: not a weights file torch can load safely (weights_only): "
                           f"{type(exc).__name__}") from None


def _state_dict_of(payload: Any, path: Path) -> dict[str, Any]:
    import torch

    def is_state(value: Any) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if is_state(payload):
        return dict(payload)
    for key in CHECKPOINT_KEYS:
        if isinstance(payload, dict) and is_state(payload.get(key)):
            return dict(payload[key])
    raise WeightsError(f"{KEY} {path}: holds no state dict (a dict of tensors, or one under "
                       f"{', '.join(map(repr, CHECKPOINT_KEYS))})")


def read_key_map(path: Path | str) -> dict[str, str | None]:
    """The JSON object of run config ``initial-model-key-map``; raise :class:`ConfigError` naming the key."""
    mapping = read_json(Path(path).expanduser(), error=ConfigError, context="run config key 'initial-model-key-map': ")
    if not isinstance(mapping, dict) or not all(isinstance(v, str | None) for v in mapping.values()):
        raise ConfigError(f"run config key 'initial-model-key-map': {path} must hold one JSON object of "
                          "\"name in the file\": \"fedseg's name\" (or null to drop it)")
    return mapping


def apply_key_map(state: dict[str, Any], mapping: dict[str, str | None]) -> dict[str, Any]:
    """Rename (or drop, for ``None``) names of ``state``: exact keys first, else the longest matching prefix
    (a key ending in ``.``)."""
    prefixes = sorted((k for k in mapping if k.endswith(".")), key=len, reverse=True)
    renamed: dict[str, Any] = {}
    for name, tensor in state.items():
        if name in mapping:
            new = mapping[name]
        else:
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            new = name if prefix is None else (None if mapping[prefix] is None
                                               else mapping[prefix] + name[len(prefix):])
        if new is None:
            continue
        if new in renamed:
            raise WeightsError(f"run config key 'initial-model-key-map': two weights map to '{new}'")
        renamed[new] = tensor
    return renamed


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
