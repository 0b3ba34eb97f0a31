"""The model file a run writes (``global_model.pt``): weights plus what rebuilds them.

The file is a ``torch.save`` of a plain dict of tensors, numbers and strings
(loadable with ``weights_only=True``), written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import atomic_write
from shared.errors import WeightsError
from shared.model import ModelConfig, build_model

if TYPE_CHECKING:
    import torch

MODEL_FORMAT = "fedseg-model/1"


def save_model_file(path: Path | str, *, state_dict: dict[str, torch.Tensor], model_config: ModelConfig,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write weights, the model config, their content hash and ``extra`` provenance to ``path`` atomically."""
    import torch

    weights = {k: v.detach().cpu() for k, v in state_dict.items()}
    payload = {"format": MODEL_FORMAT, "model_config": model_config.to_dict(), "state_dict": weights,
               **(extra or {}), "sha256": weights_digest(weights)}
    return atomic_write(path, lambda handle: torch.save(payload, handle))


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``state_dict`` (sorted by name).

    Two models have the same digest exactly when their weights are bitwise equal.
    """
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def read_model_file(path: Path | str) -> dict[str, Any]:
    """Load a model file's dict; raise :class:`WeightsError` naming the file if it is not one."""
    import torch

    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: model file does not exist") from None
    except Exception as exc:  # torch raises several types for corrupt archives
        raise WeightsError(f"{path}: not a readable model file ({exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise WeightsError(f"{path}: not a fedseg model file (expected format {MODEL_FORMAT!r})")
    return payload


def load_model(path: Path | str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the network saved in ``path``; return (model in eval mode, file dict)."""
    from shared.weights import check_state_dict

    payload = read_model_file(path)
    model = build_model(ModelConfig.from_dict(payload["model_config"]))
    try:
        check_state_dict(model, payload["state_dict"])
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc}") from None
    if "sha256" in payload and payload["sha256"] != weights_digest(payload["state_dict"]):
        raise WeightsError(f"{path}: the weights do not match the file's content hash (sha256); "
                           f"the file was altered or damaged")
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.eval(), payload
