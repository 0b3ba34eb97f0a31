"""Load a site's cases through the MONAI pipeline, with errors that name the file."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import DataError

if TYPE_CHECKING:
    import torch
    from monai.data import DataLoader


def preprocess_cases(cases: list[dict[str, str]], transform: Callable) -> list[dict[str, Any]]:
    """Apply the deterministic ``transform`` to every case; raise DataError naming the case."""
    loaded = []
    for case in cases:
        try:
            loaded.append(transform(dict(case)))
        except DataError:
            raise
        except Exception as exc:  # MONAI wraps reader errors in RuntimeError
            cause = _root_cause(exc)
            if isinstance(cause, DataError):
                raise cause from None
            raise DataError(f"{case['image']} / {case['label']}: cannot load case ({cause})") from exc
    return loaded


def training_loader(cases: list[dict[str, Any]], augment: Callable, *, batch_size: int,
                    generator: torch.Generator) -> DataLoader:
    """A shuffling loader over preprocessed cases, sampling augmented patches."""
    from monai.data import DataLoader, Dataset

    return DataLoader(Dataset(cases, transform=augment), batch_size=batch_size, shuffle=True,
                      num_workers=0, generator=generator)


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen

