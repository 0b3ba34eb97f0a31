"""Split a pool of cases across many virtual sites: IID, quantity skew, label skew.

Every scheme is deterministic from its seed, assigns every case to exactly one
site, and gives every site at least ``min_per_site`` cases (a site needs one
case to train on and one to validate on). The natural and feature-skew
schemes are not splits of a pool: they are synthetic hospitals (see
:mod:`simulations.layout`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shared.errors import ConfigError

SCHEMES = ("natural", "iid", "quantity", "label", "feature")
MIN_CASES_PER_SITE = 2  # one to train, one to validate


def _check(num_cases: int, num_sites: int, min_per_site: int) -> None:
    if num_sites < 1:
        raise ConfigError(f"'sites' must be >= 1, got {num_sites!r}")
    if min_per_site < 1:
        raise ConfigError(f"'min_per_site' must be >= 1, got {min_per_site!r}")
    if num_cases < num_sites * min_per_site:
        raise ConfigError(
            f"a pool of {num_cases} cases cannot give {num_sites} sites {min_per_site} cases each; "
            f"use more cases or fewer sites"
        )


def iid_partition(num_cases: int, num_sites: int, *, seed: int,
                  min_per_site: int = MIN_CASES_PER_SITE) -> list[list[int]]:
    """Shuffle the cases and deal them out round-robin (sizes differ by at most one)."""
    _check(num_cases, num_sites, min_per_site)
    order = np.random.default_rng(seed).permutation(num_cases)
    return [sorted(int(i) for i in order[site::num_sites]) for site in range(num_sites)]


def quantity_skew_sizes(num_cases: int, num_sites: int, *, exponent: float, seed: int,
                        min_per_site: int = MIN_CASES_PER_SITE) -> list[int]:
    """Site sizes following a power law: size of the k-th largest site ~ k^-exponent.

    ``exponent = 0`` gives equal sizes; 1 is Zipf-like (a few large centres,
    many small clinics). Sizes sum to ``num_cases``; each is >= ``min_per_site``.
    """
    _check(num_cases, num_sites, min_per_site)
    if exponent < 0:
        raise ConfigError(f"'exponent' must be >= 0, got {exponent!r}")
    weights = np.arange(1, num_sites + 1, dtype=np.float64) ** -exponent
    spare = num_cases - num_sites * min_per_site
    extra = np.floor(weights / weights.sum() * spare).astype(int)
    for index in np.argsort(-weights)[: spare - int(extra.sum())]:
        extra[index] += 1
    sizes = extra + min_per_site
    return [int(s) for s in np.random.default_rng(seed).permutation(sizes)]


def quantity_skew_partition(num_cases: int, num_sites: int, *, exponent: float = 1.0, seed: int,
                            min_per_site: int = MIN_CASES_PER_SITE) -> list[list[int]]:
    """Shuffle the cases, then cut them into power-law sized sites."""
    sizes = quantity_skew_sizes(num_cases, num_sites, exponent=exponent, seed=seed, min_per_site=min_per_site)
    order = np.random.default_rng(seed + 1).permutation(num_cases)
    bounds = np.cumsum([0, *sizes])
    return [sorted(int(i) for i in order[bounds[s]:bounds[s + 1]]) for s in range(num_sites)]


def label_skew_partition(categories: Sequence[int], num_sites: int, *, alpha: float, seed: int,
                         min_per_site: int = MIN_CASES_PER_SITE) -> list[list[int]]:
    """Dirichlet label skew (Hsu et al. 2019) over per-case categories.

    For each category (e.g. lesion burden small / medium / large), the shares
    of its cases across sites are drawn from ``Dirichlet(alpha)``: a small
    ``alpha`` concentrates each category on few sites, a large one is nearly
    IID. Sites left with fewer than ``min_per_site`` cases take cases from the
    largest sites.
    """
    _check(len(categories), num_sites, min_per_site)
    if alpha <= 0:
        raise ConfigError(f"'alpha' must be > 0, got {alpha!r}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(categories)
    sites: list[list[int]] = [[] for _ in range(num_sites)]
    for category in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == category))
        shares = rng.dirichlet([alpha] * num_sites)
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for site, chunk in enumerate(np.split(members, cuts)):
            sites[site].extend(int(i) for i in chunk)
    _top_up(sites, min_per_site)
    return [sorted(site) for site in sites]


def _top_up(sites: list[list[int]], min_per_site: int) -> None:
    """Move cases from the largest sites to those below ``min_per_site`` (deterministic)."""
    for site in sites:
        while len(site) < min_per_site:
            donor = max(range(len(sites)), key=lambda s: (len(sites[s]), -s))
            site.append(sites[donor].pop())


def burden_categories(lesion_fractions: Sequence[float], *, bins: int = 3) -> list[int]:
    """Category of each case by lesion burden: quantile bins of the lesion voxel fraction."""
    values = np.asarray(lesion_fractions, dtype=np.float64)
    if bins < 1:
        raise ConfigError(f"'bins' must be >= 1, got {bins!r}")
    edges = np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]) if len(values) else []
    return [int(c) for c in np.searchsorted(edges, values, side="right")]


def category_shares(partition: list[list[int]], categories: Sequence[int]) -> np.ndarray:
    """Matrix [site, category] of each site's share of its cases per category."""
    labels = np.asarray(categories)
    num_categories = int(labels.max()) + 1 if len(labels) else 0
    shares = np.zeros((len(partition), num_categories))
    for site, cases in enumerate(partition):
        for case in cases:
            shares[site, labels[case]] += 1
        shares[site] /= max(1, len(cases))
    return shares
