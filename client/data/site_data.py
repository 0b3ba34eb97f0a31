"""A site's training and validation cases, preprocessed the way the run's plan asks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.data.case_cache import CaseCache
from client.data.datalist import Datalist, load_datalist
from client.data.loading import preprocess_cases
from client.data.transforms import (
    PreprocessSettings,
    evaluation_transforms,
    settings_for,
    training_transforms,
)
from shared.errors import DataError

if TYPE_CHECKING:
    from shared.plan import Plan


def preprocess_settings(plan: Plan, datalist: Datalist | None = None) -> PreprocessSettings:
    """The preprocessing implied by a plan and (for modalities and label map) a datalist."""
    if datalist is None:
        return settings_for(plan)
    return settings_for(plan, modalities=datalist.modalities, label_map=tuple(sorted(datalist.label_map.items())))


def check_task(datalist: Datalist, plan: Plan) -> None:
    """Refuse a datalist whose channels or classes disagree with the run's model."""
    if datalist.modality and len(datalist.modality) != plan.in_channels:
        raise DataError(f"{datalist.path}: 'modality' lists {len(datalist.modality)} input channel(s) "
                        f"{datalist.modalities}, but the run's model has in-channels = {plan.in_channels}")
    if datalist.labels and len(datalist.labels) != plan.num_classes:
        raise DataError(f"{datalist.path}: 'labels' lists {len(datalist.labels)} classes "
                        f"{sorted(datalist.labels.values())}, but the run's model has num-classes = "
                        f"{plan.num_classes}")


def load_training_cases(datalist: Path, plan: Plan, *,
                        cache_dir: Path | None = None) -> tuple[list[dict[str, Any]], Any]:
    """Return (preprocessed training cases, random augmentation pipeline: one patch per draw)."""
    site_data = load_datalist(datalist)
    check_task(site_data, plan)
    settings = preprocess_settings(plan, site_data)
    deterministic, augment = training_transforms(settings, foreground_fraction=plan.foreground_fraction)
    cache = _cache(cache_dir, settings)
    cases = preprocess_cases(site_data.training, deterministic, cache=cache)
    if cache is not None:
        cache.prune()  # once per round, after this round's entries were refreshed
    return cases, augment


def load_validation_cases(datalist: Path, plan: Plan, *,
                          cache_dir: Path | None = None) -> list[dict[str, Any]]:
    """Return the preprocessed validation cases (whole volumes)."""
    site_data = load_datalist(datalist)
    check_task(site_data, plan)
    settings = preprocess_settings(plan, site_data)
    return preprocess_cases(site_data.validation, evaluation_transforms(settings),
                            cache=_cache(cache_dir, settings))


def _cache(cache_dir: Path | None, settings: PreprocessSettings) -> CaseCache | None:
    return CaseCache(cache_dir, settings=settings) if cache_dir is not None else None
