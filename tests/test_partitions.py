"""Partition schemes: deterministic, every case exactly once, and the skew they claim."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shared.errors import ConfigError
from simulations import partitions
from simulations.layout import LayoutSpec, lay_out_sites

SCHEMES = {
    "iid": lambda seed: partitions.iid_partition(300, 20, seed=seed),
    "quantity": lambda seed: partitions.quantity_skew_partition(300, 20, exponent=1.0, seed=seed),
    "label": lambda seed: partitions.label_skew_partition([i % 3 for i in range(300)], 20, alpha=0.3, seed=seed),
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_scheme_is_deterministic_and_covers_every_case_once(scheme):
    first, again, other = SCHEMES[scheme](7), SCHEMES[scheme](7), SCHEMES[scheme](8)
    assert first == again and first != other
    flat = [case for site in first for case in site]
    assert sorted(flat) == list(range(300))
    assert all(len(site) >= 2 for site in first)


def test_iid_sizes_are_even():
    sizes = [len(s) for s in partitions.iid_partition(103, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_quantity_skew_follows_a_power_law():
    sizes = sorted(partitions.quantity_skew_sizes(1000, 50, exponent=1.0, seed=0), reverse=True)
    assert sum(sizes) == 1000 and min(sizes) >= 2
    assert sizes[0] > 10 * sizes[-1]
    assert sizes[0] / sizes[1] == pytest.approx(2.0, rel=0.15)
    even = partitions.quantity_skew_sizes(1000, 50, exponent=0.0, seed=0)
    assert max(even) - min(even) <= 1


def test_small_alpha_gives_uneven_label_shares_and_large_alpha_even_ones():
    categories = [i % 3 for i in range(3000)]
    skewed = partitions.category_shares(
        partitions.label_skew_partition(categories, 10, alpha=0.1, seed=1), categories)
    balanced = partitions.category_shares(
        partitions.label_skew_partition(categories, 10, alpha=1000.0, seed=1), categories)
    assert skewed.max(axis=1).mean() > 0.75
    assert np.abs(balanced - 1 / 3).max() < 0.1


def test_burden_categories_are_quantile_bins():
    cats = partitions.burden_categories([0.01, 0.02, 0.03, 0.10, 0.20, 0.30], bins=3)
    assert cats == [0, 0, 1, 1, 2, 2]


@pytest.mark.parametrize(("call", "match"), [
    (lambda: partitions.iid_partition(5, 3, seed=0), "cannot give 3 sites"),
    (lambda: partitions.label_skew_partition([0] * 10, 2, alpha=0.0, seed=0), "alpha"),
    (lambda: partitions.quantity_skew_sizes(10, 2, exponent=-1.0, seed=0), "exponent"),
])
def test_bad_partition_parameters_are_named(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


@pytest.mark.parametrize(("options", "match"), [
    (dict(scheme="label", dirichlet_alpha=0.0), "'--dirichlet-alpha' must be > 0"),
    (dict(scheme="quantity", quantity_exponent=float("nan")), "'--quantity-exponent' must be >= 0"),
    (dict(scheme="iid", pool_cases=-1), "'--pool-cases' must be >= 0"),
    (dict(scheme="iid", sites=10, pool_cases=19), "'--pool-cases' 19 cannot give 10 sites 2 cases each"),
    (dict(scheme="natural", min_cases=1), "'--min-cases'/'--max-cases' must satisfy 2 <= min <= max"),
    (dict(scheme="feature", min_cases=9, max_cases=8), "got 9..8"),
])
def test_bad_layout_options_are_named_by_their_command_line_option(options, match):
    with pytest.raises(ConfigError, match=match):
        LayoutSpec(**options)
    LayoutSpec(**dict(options, dirichlet_alpha=0.5, quantity_exponent=1.0, pool_cases=20, min_cases=2,
                      max_cases=8))  # the same layout with good values


@pytest.mark.parametrize("scheme", ["quantity", "label", "feature"])
def test_layout_writes_datalists_and_the_split(tmp_path, scheme):
    spec = LayoutSpec(scheme=scheme, sites=4, seed=2, min_cases=2, max_cases=4, pool_cases=14)
    sites = lay_out_sites(spec, tmp_path / "data", tmp_path)
    assert len(sites) == 4 and len({s for s, _ in sites}) == 4
    split = json.loads((tmp_path / "partition.json").read_text())
    assert split["scheme"] == scheme and len(split["members"]) == 4
    for _, datalist in sites:
        data = json.loads(datalist.read_text())
        assert data["training"] and data["validation"]
    if scheme != "feature":
        images = [img for members in split["members"].values() for img in members]
        assert len(images) == len(set(images)) == 14


def test_pool_split_of_given_datalists(tmp_path, two_sites):
    spec = LayoutSpec(scheme="iid", sites=3, seed=0, datalists=tuple(two_sites))
    sites = lay_out_sites(spec, tmp_path / "data", tmp_path)
    members = json.loads((tmp_path / "partition.json").read_text())["members"]
    total = sum(len(json.loads(d.read_text())["training"]) + len(json.loads(d.read_text())["validation"])
                for d in two_sites)
    assert len(sites) == 3 and sum(len(m) for m in members.values()) == total
