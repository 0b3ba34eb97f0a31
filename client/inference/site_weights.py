"""A site's own weights between rounds (run config ``local-norm``): kept in its state directory only.

ClientApps are stateless between rounds, so the weights that never travel
(:func:`shared.local_weights.local_weight_names`) are written to
``<state-dir>/local-weights/run-<id>.pt`` (``id``: the run id of the run that began
the federation, which a resumed run keeps) after each round's training and
laid over the received global model before the next round's training and every
evaluation. Until a site has trained once, the global model's own values serve
(the starting model's norm weights). The file is written atomically and holds
the model config it belongs to, so weights of another architecture are refused
instead of loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shared.atomic import atomic_write
from shared.errors import WeightsError

if TYPE_CHECKING:
    from collections.abc import Collection

    import torch

    from shared.model import ModelConfig

LOCAL_WEIGHTS_FORMAT = "fedseg-local-weights/1"


def local_weights_path(state_dir: Path | str, *, run_id: int) -> Path:
    """Where a site keeps its own weights of run ``run_id``."""
    return Path(state_dir) / "local-weights" / f"run-{run_id}.pt"


def restore_local_weights(model: torch.nn.Module, path: Path, *, names: Collection[str],
                          model_config: ModelConfig) -> bool:
    """Load the site's weights ``names`` from ``path`` into ``model``; False if the site has none yet.

    Raises :class:`WeightsError` naming the file when it belongs to another
    architecture or does not hold exactly ``names``.
    """
    import torch

    if not names or not path.exists():
        return False
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several types for damaged archives
        raise WeightsError(f"{path}: the site's local weights cannot be read ({exc})") from None
    if payload.get("format") != LOCAL_WEIGHTS_FORMAT or payload.get("model_config") != model_config.to_dict():
        raise WeightsError(f"{path}: the site's local weights belong to another model; remove the file to "
                           "start this site's local weights from the global model")
    state = payload["state_dict"]
    if set(state) != set(names):
        raise WeightsError(f"{path}: holds weights {sorted(set(state) ^ set(names))[:3]} that do not match the "
                           "model's local weights")
    current = model.state_dict()
    for name, tensor in state.items():
        if tensor.shape != current[name].shape:
            raise WeightsError(f"{path}: weight '{name}' has shape {tuple(tensor.shape)}, the model "
                               f"{tuple(current[name].shape)}")
    model.load_state_dict(state, strict=False)
    return True


def keep_local_weights(model: torch.nn.Module, path: Path, *, names: Collection[str],
                       model_config: ModelConfig) -> Path:
    """Write ``model``'s weights ``names`` to ``path`` atomically (owner-readable only)."""
    import torch

    state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items() if name in names}
    payload = {"format": LOCAL_WEIGHTS_FORMAT, "model_config": model_config.to_dict(), "state_dict": state}
    return atomic_write(path, lambda handle: torch.save(payload, handle))
