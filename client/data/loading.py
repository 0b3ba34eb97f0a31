"""Load a site's cases through the MONAI pipeline, with errors that name the file."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from shared.errors import DataError

if TYPE_CHECKING:
    import torch
    from monai.data import DataLoader

    from client.data.case_cache import CaseCache


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
                    generator: torch.Generator, steps: int | None = None) -> DataLoader:
    """A loader of augmented patches (one per case drawn).

    With ``steps``: exactly ``steps`` batches of ``batch_size`` cases drawn with
    replacement, whatever the number of cases (a round is a number of steps,
    as nnU-Net counts an epoch in iterations). Without: one shuffled pass over
    the cases, which DP-SGD turns into Poisson sampling.
    """
    from monai.data import DataLoader, Dataset
    from torch.utils.data import RandomSampler

    dataset = Dataset(cases, transform=augment)
    if steps is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0, generator=generator)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=generator)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0)


def root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` of a chain of exceptions."""
    seen = exc
    while seen.__cause__ is not None:
        seen = seen.__cause__
    return seen
