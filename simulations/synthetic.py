"""Synthetic hospitals: scans written as NIfTI files plus a Decathlon-style datalist.

Each virtual hospital draws a :class:`SiteProfile` from the seed, so sites
differ the way real scanners and populations do: intensity scale and offset,
bias field, noise, contrast and gamma, voxel spacing (so image size), lesion
size and count, and number of cases (quantity skew: a few large centres and
small clinics, see :func:`site_sizes`). Lesion masks come from
``monai.data.synthetic``; the acquisition model on top is ours.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError

FIELD_OF_VIEW_MM = {2: 96.0, 3: 48.0}
LABELS = {"0": "background", "1": "lesion"}


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital's scanner and population look."""

    site_id: str
    num_cases: int
    spacing_mm: float
    intensity_scale: float
    intensity_offset: float
    bias_strength: float
    noise_std: float
    lesion_contrast: float
    gamma: float
    lesion_count: tuple[int, int]
    lesion_radius_mm: tuple[float, float]


def make_site_profiles(num_sites: int, *, seed: int, min_cases: int = 8, max_cases: int = 20) -> list[SiteProfile]:
    """Draw ``num_sites`` heterogeneous, reproducible site profiles (sizes from :func:`site_sizes`)."""
    sizes = site_sizes(num_sites, min_cases=min_cases, max_cases=max_cases)
    rng = np.random.default_rng(seed)
    width = max(2, len(str(num_sites)))
    profiles = []
    for index in range(num_sites):
        small = rng.uniform(1.5, 3.0)
        profiles.append(SiteProfile(
            site_id=f"hospital-{index + 1:0{width}d}",
            num_cases=sizes[index],
            spacing_mm=float(rng.choice([0.75, 1.0, 1.25])),
            intensity_scale=float(rng.uniform(50.0, 2000.0)),
            intensity_offset=float(rng.uniform(-200.0, 300.0)),
            bias_strength=float(rng.uniform(0.0, 0.4)),
            noise_std=float(rng.uniform(0.02, 0.10)),
            lesion_contrast=float(rng.uniform(0.35, 0.8)),
            gamma=float(rng.uniform(0.8, 1.25)),
            lesion_count=(1, int(rng.integers(2, 5))),
            lesion_radius_mm=(small, small + float(rng.uniform(2.0, 6.0))),
        ))
    return profiles


def site_sizes(num_sites: int, *, min_cases: int, max_cases: int) -> list[int]:
    """Cases per site, largest first: a geometric series from ``max_cases`` down to ``min_cases``.

    Real federations mix a few large centres with many small clinics; with
    (60, 600) three sites get 600, 190 and 60 cases, so the small ones cannot
    learn alone as well as the federation lets them.
    """
    if num_sites < 1:
        raise ConfigError(f"'sites' must be >= 1, got {num_sites!r}")
    if not 2 <= min_cases <= max_cases:
        raise ConfigError(f"'cases' range must satisfy 2 <= min <= max, got {min_cases}..{max_cases}")
    ratios = np.linspace(0.0, 1.0, num_sites) if num_sites > 1 else np.zeros(1)
    return [int(round(max_cases * (min_cases / max_cases) ** r)) for r in ratios]


def synthesize_case(profile: SiteProfile, *, spatial_dims: int, rng: np.random.RandomState) -> tuple[np.ndarray, np.ndarray]:
    """Return (image float32, label uint8) of one case acquired at ``profile``'s site."""
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    size = int(round(FIELD_OF_VIEW_MM[spatial_dims] / profile.spacing_mm))
    rad_min = max(1, int(round(profile.lesion_radius_mm[0] / profile.spacing_mm)))
    rad_max = max(rad_min + 1, int(round(profile.lesion_radius_mm[1] / profile.spacing_mm)))
    num_objs = int(rng.randint(profile.lesion_count[0], profile.lesion_count[1] + 1))
    make = create_test_image_2d if spatial_dims == 2 else create_test_image_3d
    lesions, label = make(*([size] * spatial_dims), num_objs=num_objs, rad_max=rad_max, rad_min=rad_min,
                          noise_max=0.0, num_seg_classes=1, random_state=rng)
    grid = np.meshgrid(*[np.linspace(-1.0, 1.0, size)] * spatial_dims, indexing="ij")
    tissue = _tissue(grid, rng)
    image = tissue + profile.lesion_contrast * lesions * (label > 0)
    image = image * _bias_field(grid, profile.bias_strength, rng)
    image = np.clip(image, 0.0, None) ** profile.gamma
    image = image + rng.normal(0.0, profile.noise_std, size=image.shape)
    image = image * profile.intensity_scale + profile.intensity_offset
    return image.astype(np.float32), (label > 0).astype(np.uint8)


def write_case(profile: SiteProfile, out_dir: Path, name: str, *, spatial_dims: int,
               rng: np.random.RandomState) -> dict[str, Any]:
    """Write one case under ``out_dir/{images,labels}/``; return its datalist entry.

    The entry's paths are relative to ``out_dir``; ``lesion_fraction`` (the
    share of lesion voxels) is returned beside them for partitioning.
    """
    import nibabel as nib

    for sub in ("images", "labels"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    image, label = synthesize_case(profile, spatial_dims=spatial_dims, rng=rng)
    affine = np.diag([profile.spacing_mm] * 3 + [1.0])
    nib.save(nib.Nifti1Image(image, affine), out_dir / "images" / name)
    nib.save(nib.Nifti1Image(label, affine), out_dir / "labels" / name)
    return {"image": f"images/{name}", "label": f"labels/{name}", "lesion_fraction": float(label.mean())}


def write_datalist(path: Path, *, name: str, spatial_dims: int, training: list[dict[str, Any]],
                   validation: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    """Write a Decathlon-style datalist for synthetic cases."""
    datalist: dict[str, Any] = {
        "name": name, "description": "fedseg synthetic hospital",
        "modality": {"0": "MR"}, "labels": LABELS, "tensorImageSize": f"{spatial_dims}D",
        **(extra or {}), "training": training, "validation": validation,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(datalist, indent=2))
    return path


def validation_count(num_cases: int, fraction: float = 0.25) -> int:
    """How many of a site's cases go to validation: about ``fraction``, at least one."""
    return max(1, int(round(num_cases * fraction))) if num_cases >= 2 else 0


def write_site(profile: SiteProfile, out_dir: Path, *, spatial_dims: int, seed: int) -> Path:
    """Write one hospital's cases as NIfTI plus ``datalist.json``; return the datalist path."""
    out_dir = Path(out_dir)
    cases = []
    for index in range(profile.num_cases):
        rng = np.random.RandomState(_case_seed(seed, profile.site_id, index))
        case = write_case(profile, out_dir, f"case_{index:03d}.nii.gz", spatial_dims=spatial_dims, rng=rng)
        cases.append({"image": case["image"], "label": case["label"]})
    n_val = validation_count(len(cases))
    return write_datalist(out_dir / "datalist.json", name=profile.site_id, spatial_dims=spatial_dims,
                          training=cases[n_val:], validation=cases[:n_val], extra={"profile": asdict(profile)})


def write_hospitals(profiles: list[SiteProfile], out_dir: Path, *, spatial_dims: int, seed: int) -> list[Path]:
    """Write every hospital under ``out_dir/<site-id>/``; return their datalists."""
    if spatial_dims not in FIELD_OF_VIEW_MM:
        raise ConfigError(f"'spatial-dims' must be 2 or 3, got {spatial_dims!r}")
    return [write_site(p, Path(out_dir) / p.site_id, spatial_dims=spatial_dims, seed=seed) for p in profiles]


def _tissue(grid: list[np.ndarray], rng: np.random.RandomState) -> np.ndarray:
    radius = np.sqrt(sum(axis ** 2 for axis in grid))
    body = (radius < 0.92).astype(np.float64)
    phases = rng.uniform(0, 2 * np.pi, size=len(grid))
    texture = sum(np.sin(3.0 * axis + phase) for axis, phase in zip(grid, phases)) / len(grid)
    return body * (0.35 + 0.05 * texture)


def _bias_field(grid: list[np.ndarray], strength: float, rng: np.random.RandomState) -> np.ndarray:
    coefficients = rng.uniform(-1.0, 1.0, size=len(grid))
    linear = sum(c * axis for c, axis in zip(coefficients, grid))
    return np.exp(strength * linear)


def _case_seed(seed: int, site_id: str, index: int) -> int:
    import zlib

    return (seed * 7_919 + zlib.crc32(site_id.encode()) + index * 104_729) % (2**32)
