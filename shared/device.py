"""Pick the torch device: CUDA when present and asked for (``auto``), else CPU."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shared.errors import ConfigError

if TYPE_CHECKING:
    import torch


def resolve_device(name: str) -> torch.device:
    """Return the device for a config value ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"key 'device': {name!r} requested but CUDA is not available")
        return torch.device(name)
    raise ConfigError(f"key 'device': expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
