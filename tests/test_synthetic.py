"""Synthetic hospitals: reproducible from a seed, and different from site to site."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from shared.errors import ConfigError
from simulations.synthetic import make_site_profiles, site_sizes, write_hospitals


def _arrays(datalist):
    data = json.loads(datalist.read_text())
    cases = data["training"] + data["validation"]
    root = datalist.parent
    return [(nib.load(root / c["image"]), nib.load(root / c["label"])) for c in cases]


def test_same_seed_writes_identical_data(tmp_path):
    first = write_hospitals(make_site_profiles(2, seed=5, min_cases=3, max_cases=4), tmp_path / "a",
                            spatial_dims=2, seed=5)
    second = write_hospitals(make_site_profiles(2, seed=5, min_cases=3, max_cases=4), tmp_path / "b",
                             spatial_dims=2, seed=5)
    for a, b in zip(first, second):
        for (img_a, lab_a), (img_b, lab_b) in zip(_arrays(a), _arrays(b)):
            assert np.array_equal(img_a.get_fdata(), img_b.get_fdata())
            assert np.array_equal(lab_a.get_fdata(), lab_b.get_fdata())


def test_another_seed_writes_other_data(tmp_path):
    a = write_hospitals(make_site_profiles(1, seed=1, min_cases=3, max_cases=3), tmp_path / "a", spatial_dims=2, seed=1)
    b = write_hospitals(make_site_profiles(1, seed=2, min_cases=3, max_cases=3), tmp_path / "b", spatial_dims=2, seed=2)
    assert not np.array_equal(_arrays(a[0])[0][0].get_fdata(), _arrays(b[0])[0][0].get_fdata())


def test_sites_differ_like_hospitals(tmp_path):
    profiles = make_site_profiles(6, seed=0, min_cases=3, max_cases=12)
    for attribute in ("num_cases", "spacing_mm", "intensity_scale", "intensity_offset", "bias_strength",
                      "noise_std", "lesion_contrast", "gamma", "lesion_radius_mm", "lesion_count"):
        assert len({getattr(p, attribute) for p in profiles}) > 1, attribute
    datalists = write_hospitals(profiles[:3], tmp_path, spatial_dims=2, seed=0)
    medians = [np.median(_arrays(d)[0][0].get_fdata()) for d in datalists]
    assert max(medians) - min(medians) > 10.0
    shapes = {_arrays(d)[0][0].shape for d in datalists}
    spacings = {_arrays(d)[0][0].header.get_zooms()[0] for d in datalists}
    assert len(spacings) == len(shapes)


def test_labels_are_binary_and_images_match_labels(tmp_path):
    datalist = write_hospitals(make_site_profiles(1, seed=0, min_cases=3, max_cases=3), tmp_path,
                               spatial_dims=3, seed=0)[0]
    for image, label in _arrays(datalist):
        assert image.shape == label.shape and len(image.shape) == 3
        assert np.allclose(image.affine, label.affine)
        assert set(np.unique(label.get_fdata())) <= {0.0, 1.0}
        assert label.get_fdata().sum() > 0


def test_datalist_is_decathlon_style(tmp_path):
    datalist = write_hospitals(make_site_profiles(1, seed=0, min_cases=8, max_cases=8), tmp_path,
                               spatial_dims=2, seed=0)[0]
    data = json.loads(datalist.read_text())
    assert data["labels"] == {"0": "background", "1": "lesion"} and data["modality"] == {"0": "MR"}
    assert len(data["training"]) == 6 and len(data["validation"]) == 2
    assert all((datalist.parent / c["image"]).exists() for c in data["training"])


def test_bad_site_count_is_refused():
    with pytest.raises(ConfigError, match="sites"):
        make_site_profiles(0, seed=0)


def test_site_sizes_mix_large_centres_and_small_clinics():
    assert site_sizes(3, min_cases=60, max_cases=600) == [600, 190, 60]
    assert site_sizes(1, min_cases=60, max_cases=600) == [600]
    assert site_sizes(4, min_cases=5, max_cases=5) == [5, 5, 5, 5]
    sizes = [p.num_cases for p in make_site_profiles(5, seed=0, min_cases=3, max_cases=40)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 40 and sizes[-1] == 3
    with pytest.raises(ConfigError, match="2 <= min <= max"):
        site_sizes(3, min_cases=9, max_cases=8)
