"""Lay out a simulated federation on disk: one datalist per virtual site.

Schemes (``--partition``):

- ``natural``: one synthetic hospital per site (its own scanner, population
  and size), or one site per given datalist;
- ``feature``: synthetic hospitals sharing one lesion distribution and equal
  sizes, differing only in acquisition (intensity, bias field, noise, gamma,
  resolution): pure feature skew;
- ``iid``, ``quantity``, ``label``: a pool of cases (synthetic under one
  reference acquisition, or the union of the given datalists) split across
  sites evenly, with power-law sizes, or with Dirichlet skew over lesion burden.

Site data stays on disk and each site's ClientApp loads it only when that site
is sampled; the harness itself keeps only the list of datalist paths. The
split is written to ``partition.json`` in the run folder.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import ConfigError
from simulations import partitions
from simulations.synthetic import (
    SiteProfile,
    make_site_profiles,
    validation_count,
    write_case,
    write_datalist,
    write_hospitals,
)

POOL_PROFILE = SiteProfile(
    site_id="pool", num_cases=0, spacing_mm=1.0, intensity_scale=1000.0, intensity_offset=0.0,
    bias_strength=0.1, noise_std=0.05, lesion_contrast=0.6, gamma=1.0,
    lesion_count=(1, 4), lesion_radius_mm=(1.5, 9.0),
)


@dataclass(frozen=True)
class LayoutSpec:
    """How to populate the virtual sites."""

    scheme: str = "natural"
    sites: int = 3
    spatial_dims: int = 2
    seed: int = 0
    min_cases: int = 8
    max_cases: int = 20
    pool_cases: int = 0
    quantity_exponent: float = 1.0
    dirichlet_alpha: float = 0.5
    datalists: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        if self.scheme not in partitions.SCHEMES:
            raise ConfigError(f"'--partition' must be one of {partitions.SCHEMES}, got {self.scheme!r}")
        if self.scheme == "feature" and self.datalists:
            raise ConfigError("'--partition feature' synthesises acquisition shifts; it does not take --datalists")
        if not self.quantity_exponent >= 0:
            raise ConfigError(f"'--quantity-exponent' must be >= 0, got {self.quantity_exponent!r}")
        if not self.dirichlet_alpha > 0:
            raise ConfigError(f"'--dirichlet-alpha' must be > 0, got {self.dirichlet_alpha!r}")
        if self.pool_cases < 0:
            raise ConfigError(f"'--pool-cases' must be >= 0, got {self.pool_cases!r}")
        if not self.datalists:
            self._check_synthetic_sizes()

    def _check_synthetic_sizes(self) -> None:
        if not partitions.MIN_CASES_PER_SITE <= self.min_cases <= self.max_cases:
            raise ConfigError(f"'--min-cases'/'--max-cases' must satisfy {partitions.MIN_CASES_PER_SITE} <= min "
                              f"<= max, got {self.min_cases}..{self.max_cases}")
        needed = self.sites * partitions.MIN_CASES_PER_SITE
        if self.scheme in ("iid", "quantity", "label") and self.pool_size < needed:
            raise ConfigError(f"'--pool-cases' {self.pool_size} cannot give {self.sites} sites "
                              f"{partitions.MIN_CASES_PER_SITE} cases each; use at least {needed}")

    @property
    def pool_size(self) -> int:
        return self.pool_cases or self.sites * (self.min_cases + self.max_cases) // 2


def lay_out_sites(spec: LayoutSpec, data_dir: Path, run_dir: Path) -> list[tuple[str, Path]]:
    """Write the sites' data and datalists; return (site id, datalist) per site."""
    if spec.scheme == "natural" and spec.datalists:
        sites = [(Path(d).stem, Path(d)) for d in spec.datalists]
        _write_partition(run_dir, spec, {s: [str(d)] for s, d in sites})
        return sites
    if spec.scheme in ("natural", "feature"):
        profiles = make_site_profiles(spec.sites, seed=spec.seed, min_cases=spec.min_cases, max_cases=spec.max_cases)
        if spec.scheme == "feature":
            profiles = [_acquisition_only(p, spec) for p in profiles]
        datalists = write_hospitals(profiles, data_dir, spatial_dims=spec.spatial_dims, seed=spec.seed)
        sites = [(p.site_id, d) for p, d in zip(profiles, datalists)]
        _write_partition(run_dir, spec, {s: [str(d)] for s, d in sites})
        return sites
    cases, fractions = (_pool_from_datalists(spec.datalists) if spec.datalists
                        else _synthetic_pool(spec, data_dir / "pool"))
    split = _split(spec, len(cases), fractions)
    width = max(4, len(str(spec.sites)))
    sites = []
    for index, members in enumerate(split):
        site_id = f"site-{index + 1:0{width}d}"
        site_cases = [cases[i] for i in members]
        n_val = validation_count(len(site_cases))
        path = write_datalist(data_dir / "sites" / f"{site_id}.json", name=site_id, spatial_dims=spec.spatial_dims,
                              training=site_cases[n_val:], validation=site_cases[:n_val])
        sites.append((site_id, path))
    _write_partition(run_dir, spec, {s: [cases[i]["image"] for i in m] for (s, _), m in zip(sites, split)})
    return sites


def _split(spec: LayoutSpec, num_cases: int, fractions: list[float]) -> list[list[int]]:
    schemes: dict[str, Callable[[], list[list[int]]]] = {
        "iid": lambda: partitions.iid_partition(num_cases, spec.sites, seed=spec.seed),
        "quantity": lambda: partitions.quantity_skew_partition(
            num_cases, spec.sites, exponent=spec.quantity_exponent, seed=spec.seed),
        "label": lambda: partitions.label_skew_partition(
            partitions.burden_categories(fractions), spec.sites, alpha=spec.dirichlet_alpha, seed=spec.seed),
    }
    return schemes[spec.scheme]()


def _synthetic_pool(spec: LayoutSpec, pool_dir: Path) -> tuple[list[dict[str, str]], list[float]]:
    cases, fractions = [], []
    for index in range(spec.pool_size):
        rng = np.random.RandomState((spec.seed * 7_919 + index * 104_729) % (2**32))
        case = write_case(POOL_PROFILE, pool_dir, f"case_{index:05d}.nii.gz", spatial_dims=spec.spatial_dims, rng=rng)
        cases.append({"image": str((pool_dir / case["image"]).resolve()),
                      "label": str((pool_dir / case["label"]).resolve())})
        fractions.append(case["lesion_fraction"])
    return cases, fractions


def _pool_from_datalists(datalists: tuple[Path, ...]) -> tuple[list[dict[str, str]], list[float]]:
    import nibabel as nib

    from client.data.datalist import load_datalist

    cases, fractions = [], []
    for path in datalists:
        datalist = load_datalist(path)
        for case in datalist.training + datalist.validation:
            cases.append({"image": case["image"], "label": case["label"]})
            label = np.asarray(nib.load(case["label"]).dataobj)
            fractions.append(float((label > 0).mean()))
    return cases, fractions


def _acquisition_only(profile: SiteProfile, spec: LayoutSpec) -> SiteProfile:
    """Keep the site's scanner; give every site the same population and size."""
    return dataclasses.replace(profile, num_cases=(spec.min_cases + spec.max_cases) // 2,
                               lesion_count=POOL_PROFILE.lesion_count, lesion_radius_mm=POOL_PROFILE.lesion_radius_mm)


def _write_partition(run_dir: Path, spec: LayoutSpec, members: dict[str, list[str]]) -> None:
    payload: dict[str, Any] = {
        "scheme": spec.scheme, "seed": spec.seed, "sites": len(members),
        "params": {"quantity_exponent": spec.quantity_exponent, "dirichlet_alpha": spec.dirichlet_alpha,
                   "pool_cases": spec.pool_size if spec.scheme in ("iid", "quantity", "label") else None},
        "members": members,
    }
    (run_dir / "partition.json").write_text(json.dumps(payload, indent=1))
