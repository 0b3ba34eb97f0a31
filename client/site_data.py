"""A site's training and validation cases, preprocessed the way the run asks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from client.datalist import load_datalist
from client.loading import preprocess_cases
from client.transforms import PreprocessSettings, evaluation_transforms, training_transforms

if TYPE_CHECKING:
    from pathlib import Path

    from shared.config import RunConfig


def preprocess_settings(config: RunConfig) -> PreprocessSettings:
    """The preprocessing implied by a run config."""
    return PreprocessSettings(spatial_dims=config.spatial_dims, target_spacing=config.target_spacing,
                              patch_size=config.patch_size, num_classes=config.num_classes)


def load_training_cases(datalist: Path, config: RunConfig) -> tuple[list[dict[str, Any]], Any]:
    """Return (preprocessed training cases, random augmentation pipeline).

    With DP on (run config ``dp``) each case yields one patch per draw, else two.
    """
    cases = load_datalist(datalist).training
    deterministic, augment = training_transforms(preprocess_settings(config),
                                                 samples_per_case=1 if config.dp else 2)
    return preprocess_cases(cases, deterministic), augment


def load_validation_cases(datalist: Path, config: RunConfig) -> list[dict[str, Any]]:
    """Return the preprocessed validation cases (whole images)."""
    cases = load_datalist(datalist).validation
    return preprocess_cases(cases, evaluation_transforms(preprocess_settings(config)))
