"""A site's training and validation cases, preprocessed the way the run asks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.case_cache import CaseCache
from client.datalist import Datalist, load_datalist
from client.loading import preprocess_cases
from client.transforms import PreprocessSettings, evaluation_transforms, training_transforms
from shared.errors import DataError

if TYPE_CHECKING:
    from shared.config import RunConfig


def preprocess_settings(config: RunConfig, datalist: Datalist | None = None) -> PreprocessSettings:
    """The preprocessing implied by a run config and (for modalities and label map) a datalist."""
    return PreprocessSettings(
        spatial_dims=config.spatial_dims, target_spacing=config.target_spacing,
        patch_size=config.patch_size, num_classes=config.num_classes,
        modalities=datalist.modalities if datalist else ("MR",) * config.in_channels,
        ct_window=config.ct_window_range(),
        label_map=tuple(sorted(datalist.label_map.items())) if datalist else (),
    )


def check_task(datalist: Datalist, config: RunConfig) -> None:
    """Refuse a datalist whose channels or classes disagree with the run's model."""
    if datalist.modality and len(datalist.modality) != config.in_channels:
        raise DataError(f"{datalist.path}: 'modality' lists {len(datalist.modality)} input channel(s) "
                        f"{datalist.modalities}, but the run's model has in-channels = {config.in_channels}")
    if datalist.labels and len(datalist.labels) != config.num_classes:
        raise DataError(f"{datalist.path}: 'labels' lists {len(datalist.labels)} classes "
                        f"{sorted(datalist.labels.values())}, but the run's model has num-classes = "
                        f"{config.num_classes}")


def load_training_cases(datalist: Path, config: RunConfig, *,
                        cache_dir: Path | None = None) -> tuple[list[dict[str, Any]], Any]:
    """Return (preprocessed training cases, random augmentation pipeline).

    With DP on (run config ``dp``) each case yields one patch per draw, else two:
    the privacy unit is a case (a patient), never a patch.
    """
    site_data = load_datalist(datalist)
    check_task(site_data, config)
    settings = preprocess_settings(config, site_data)
    deterministic, augment = training_transforms(settings, samples_per_case=1 if config.dp else 2)
    cache = _cache(cache_dir, settings)
    cases = preprocess_cases(site_data.training, deterministic, cache=cache)
    if cache is not None:
        cache.prune()  # once per round, after this round's entries were refreshed
    return cases, augment


def load_validation_cases(datalist: Path, config: RunConfig, *,
                          cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Return the preprocessed validation cases (whole volumes)."""
    site_data = load_datalist(datalist)
    check_task(site_data, config)
    settings = preprocess_settings(config, site_data)
    return preprocess_cases(site_data.validation, evaluation_transforms(settings),
                            cache=_cache(cache_dir, settings))


def _cache(cache_dir: Path | None, settings: PreprocessSettings) -> CaseCache | None:
    return CaseCache(cache_dir, settings=settings) if cache_dir is not None else None
