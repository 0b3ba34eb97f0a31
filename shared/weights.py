"""Model weights to and from Flower's ``ArrayRecord``, with strict checks."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from shared.errors import WeightsError

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord


def model_to_arrays(model: torch.nn.Module, *, exclude: Collection[str] = ()) -> ArrayRecord:
    """Return the model's ``state_dict`` as an ``ArrayRecord`` (CPU tensors), without the names in ``exclude``."""
    from flwr.app import ArrayRecord

    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items() if name not in exclude}
    return ArrayRecord(state)


def arrays_to_state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    """Return the torch ``state_dict`` an ``ArrayRecord`` carries."""
    return dict(arrays.to_torch_state_dict())


def load_arrays(model: torch.nn.Module, arrays: ArrayRecord) -> None:
    """Load ``arrays`` into ``model``; raise :class:`WeightsError` on any mismatch.

    Names, shapes and dtypes must match the model exactly: a partial or
    reshaped update is never silently accepted.
    """
    state = arrays_to_state_dict(arrays)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise :class:`WeightsError` unless ``state`` matches ``model`` name by name."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            f"weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, tensor in expected.items():
        other = state[name]
        if tuple(other.shape) != tuple(tensor.shape) or other.dtype != tensor.dtype:
            raise WeightsError(
                f"weight '{name}': expected {tuple(tensor.shape)} {tensor.dtype}, "
                f"got {tuple(other.shape)} {other.dtype}"
            )
