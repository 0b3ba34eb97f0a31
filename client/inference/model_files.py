"""Load a network and its plan for inference: a fedseg model file, or a folder written by ``client export``.

What ``predict``, ``export``, ``finetune``, ``check-data`` and the baselines share: the plan a model file was
trained with, a site's own norm weights laid over it, and the TorchScript/ONNX engines an export runs on.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.config import RunConfig, to_key
from shared.errors import ConfigError, WeightsError
from shared.json_files import read_json
from shared.plan import Plan, manual_plan

if TYPE_CHECKING:
    import torch

EXPORT_FORMAT = "fedseg-export/1"
PREPROCESSING_FILE = "preprocessing.json"
ONNX_OPSET = 17
#: What runs the network in ``predict``: torch, or onnxruntime on CPU.
ENGINES = ("torch", "onnx")


def load_network(path: Path, *, engine: str = "torch",
                 local_weights: Path | None = None) -> tuple[torch.nn.Module, Plan]:
    """The network and plan in ``path``: a fedseg model file, or an export folder written by
    :func:`client.commands.export.export_model`.

    With ``engine="onnx"`` a model file's network is converted to ONNX in memory and run by onnxruntime
    (an export folder runs on the engine of the file it holds). ``local_weights`` (a site's own norm
    weights, run config ``local-norm``) are laid over a model file's network before any conversion.
    """
    from shared.model_file import load_model

    if engine not in ENGINES:
        raise ConfigError(f"'--engine': expected one of {ENGINES}, got {engine!r}")
    if path.is_dir():
        if local_weights is not None:
            raise ConfigError(f"'--local-weights': needs a fedseg model file, not the export folder {path} "
                              "(export the personal model instead)")
        return load_exported(path)
    model, payload = load_model(path)
    plan = plan_of_model(payload, path)
    if local_weights is not None:
        use_local_weights(model, local_weights, plan=plan)
    if engine == "onnx":
        from client.inference.onnx_engine import OnnxNetwork

        return OnnxNetwork(onnx_bytes(model.eval(), plan)), plan
    return model, plan


def load_exported(folder: Path) -> tuple[torch.nn.Module, Plan]:
    """Load an export folder; raise :class:`WeightsError` naming the file if it is incomplete."""

    spec_path = folder / PREPROCESSING_FILE
    spec = read_json(spec_path, error=WeightsError, missing=f"does not exist: {folder} is not an export folder")
    if not isinstance(spec, dict) or spec.get("format") != EXPORT_FORMAT:
        raise WeightsError(f"{spec_path}: not a fedseg export (expected format {EXPORT_FORMAT!r})")
    network_path = folder / str(spec.get("network", ""))
    return load_network_file(network_path).eval(), Plan.from_dict(spec.get("plan"), source=str(spec_path))


def load_network_file(network_path: Path) -> torch.nn.Module:
    import torch

    if network_path.suffix == ".onnx":
        from client.inference.onnx_engine import OnnxNetwork

        return OnnxNetwork(network_path)
    try:
        return torch.jit.load(str(network_path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise WeightsError(f"{network_path}: not a loadable TorchScript network ({exc})") from None


def onnx_bytes(model: torch.nn.Module, plan: Plan) -> bytes:
    """``model`` as an ONNX graph (input ``image``, output ``logits``, the batch axis free)."""
    import io

    import torch

    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shape checks it fixes as constants
        torch.onnx.export(model, (torch.zeros(1, plan.in_channels, *plan.patch_size),), buffer, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def plan_of_model(payload: dict[str, Any], model_path: Path) -> Plan:
    """The plan a model file was trained with: its ``plan``, or for a file written before plans existed,
    the manual plan of its run config (only the keys that shape preprocessing and the network matter)."""
    if isinstance(payload.get("plan"), dict):
        return Plan.from_dict(payload["plan"], source=str(model_path))
    if not isinstance(payload.get("run_config"), dict):
        raise WeightsError(f"{model_path}: model file carries no plan (needed for spacing and patch size)")
    known = {to_key(f.name) for f in fields(RunConfig)}
    saved = {k: v for k, v in payload["run_config"].items() if k in known and k not in ("model", "preset")}
    name = payload.get("model_config", {}).get("name", "unet")
    return manual_plan(RunConfig.from_mapping({**saved, "model": name, "plan": "manual", "dp": False}))


def use_local_weights(model: torch.nn.Module, path: Path, *, plan: Plan) -> None:
    """Lay a site's own norm weights (run config ``local-norm``) from ``path`` over ``model``."""
    from client.inference.site_weights import restore_local_weights
    from shared.local_weights import norm_weight_names

    if not restore_local_weights(model, Path(path), names=norm_weight_names(plan.model_config()),
                                 model_config=plan.model_config()):
        raise ConfigError(f"'--local-weights': {path} does not exist")
