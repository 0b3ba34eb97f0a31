"""Load a site's cases through the MONAI pipeline, with errors that name the file."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import DataError

if TYPE_CHECKING:
    import torch
    from monai.data import DataLoader

    from client.case_cache import CaseCache


def preprocess_cases(cases: list[dict[str, Any]], transform: Callable, *,
                     cache: CaseCache | None = None) -> list[dict[str, Any]]:
    """Apply the deterministic ``transform`` to every case (through ``cache`` if given)."""
    loaded = []
    for case in cases:
        cached = cache.get(case) if cache is not None else None
        if cached is None:
            cached = preprocess_case(case, transform)
            if cache is not None:
                cache.put(case, cached)
        loaded.append(cached)
    return loaded


def preprocess_case(case: dict[str, Any], transform: Callable) -> dict[str, Any]:
    """Apply ``transform`` to one case; any failure becomes a DataError naming the file."""
    try:
        return transform(dict(case))
    except DataError:
        raise
    except Exception as exc:  # MONAI wraps errors of its transforms in RuntimeError
        cause = root_cause(exc)
        if isinstance(cause, DataError):
            raise cause from None
        raise DataError(f"{case['image']} / {case.get('label', '-')}: cannot load case ({cause})") from exc


def training_loader(cases: list[dict[str, Any]], augment: Callable, *, batch_size: int,
                    generator: torch.Generator) -> DataLoader:
    """A shuffling loader over preprocessed cases, sampling augmented patches."""
    from monai.data import DataLoader, Dataset

    return DataLoader(Dataset(cases, transform=augment), batch_size=batch_size, shuffle=True,
                      num_workers=0, generator=generator)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` of a chain of exceptions."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen
