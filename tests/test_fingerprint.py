"""A site's fingerprint (what it holds and never holds), 2D slicing across the coarsest axis, DP advice."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from client.__main__ import main
from client.data.site_data import load_training_cases, load_validation_cases
from client.data.site_fingerprint import site_fingerprint
from client.runtime.egress.guard import EgressBlocked, check_reply
from shared.dp_advice import LEARNABLE_NOISE_RATIO, dp_advice
from shared.fingerprint import Fingerprint, fingerprint_key_allowed
from shared.protocol import FINGERPRINT, FINGERPRINT_QUERY
from tests.conftest import tiny_plan
from tests.data_cases import ct_volume, write_datalist, write_nifti_case

AXIAL = np.diag([1.0, 1.0, 1.0, 1.0])
CORONAL_THICK = np.diag([1.0, 3.0, 1.0, 1.0])  # 3 mm along A-P: coronal slices


def _site(folder, cases: int, *, affine=AXIAL, shape=(24, 24, 24), modality="MR"):
    entries = []
    for index in range(cases):
        image, label = ct_volume(index, shape)
        entries.append(write_nifti_case(folder, f"case{index}", image, label, affine))
    return write_datalist(folder, entries[:-1], validation=entries[-1:], modality=modality)


def test_a_fingerprint_holds_aggregates_whose_size_does_not_grow_with_the_cases(tmp_path):
    small = site_fingerprint(_site(tmp_path / "small", 3))
    large = site_fingerprint(_site(tmp_path / "large", 6))
    assert small.cases == 2 and large.cases == 5  # training cases only
    assert set(small.to_metrics()) == set(large.to_metrics())  # no per-case entry anywhere
    assert all(fingerprint_key_allowed(key) for key in large.to_metrics())
    assert all(isinstance(v, int | float) for v in large.to_metrics().values())
    assert large.spacing[50] == (1.0, 1.0, 1.0) and large.extent[50] == (24.0, 24.0, 24.0)
    assert Fingerprint.from_metrics(large.to_metrics()) == large


def test_foreground_intensity_and_class_fractions_are_those_of_the_labels(tmp_path):
    fingerprint = site_fingerprint(_site(tmp_path, 4, modality="CT"))
    stats = fingerprint.intensity[0]
    # ct_volume puts the lesion 400 stored units (200 HU) above a 1800..2300 background
    assert -1024 + 0.5 * 2200 < stats.mean < -1024 + 0.5 * 2700 and stats.voxels > 0
    assert stats.percentiles[0.5] < stats.percentiles[50.0] < stats.percentiles[99.5]
    assert 0.0 < fingerprint.class_fractions[1] < 0.2 and fingerprint.ct_channels == (True,)


def test_thick_coronal_cases_are_counted_and_sliced_across_their_coarse_axis(tmp_path):
    datalist = _site(tmp_path, 3, affine=CORONAL_THICK, shape=(24, 10, 24))
    fingerprint = site_fingerprint(datalist)
    assert fingerprint.thickest_axis_cases == (0, 2, 0) and fingerprint.isotropic_cases == 0
    assert fingerprint.sliced_spacing[50] == (1.0, 1.0, 3.0)  # in-plane R and S, then the thick A-P axis
    plan = tiny_plan({"patch-size": 16})
    cases, augment = load_training_cases(datalist, plan)
    assert tuple(cases[0]["image"].shape[1:]) == (24, 24, 10)  # whole coronal slices, 10 of them
    assert cases[0]["spacing"].tolist() == [1.0, 1.0, 3.0]
    axial = load_training_cases(datalist, tiny_plan({"patch-size": 16, "slicing": "axial"}))[0]
    assert axial[0]["image"].shape[-1] == 24 and axial[0]["spacing"].tolist()[1] == 1.0  # S slices, A resampled
    validation = load_validation_cases(datalist, plan)
    assert tuple(validation[0]["label"].shape[1:]) == (24, 24, 10)


def test_the_cli_shows_exactly_what_would_leave(tmp_path, capsys):
    datalist = _site(tmp_path, 3)
    assert main(["fingerprint", str(datalist), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == site_fingerprint(datalist).to_metrics()
    assert main(["fingerprint", str(tmp_path / "missing.json")]) != 0


def test_the_egress_guard_lets_a_fingerprint_out_only_as_a_fingerprint_reply(tmp_path):
    record = MetricRecord(site_fingerprint(_site(tmp_path, 3)).to_metrics())
    content = RecordDict({FINGERPRINT: record, "site": ConfigRecord({"site-id": "a"})})
    check_reply(content, message_type=FINGERPRINT_QUERY, expected=None)
    with pytest.raises(EgressBlocked, match="not allowed"):
        check_reply(content, message_type="train", expected=None)
    record["case-0-spacing"] = 1.0
    with pytest.raises(EgressBlocked, match="'case-0-spacing' is not on the allow-list"):
        check_reply(content, message_type=FINGERPRINT_QUERY, expected=None)


def test_dp_advice_warns_a_small_site_with_a_large_network_and_not_a_large_site():
    small = dp_advice(cases=12, batch_size=32, steps_per_round=50, rounds=5, epsilon=8.0, delta=1e-5,
                      weights=2_000_000)
    large = dp_advice(cases=2000, batch_size=256, steps_per_round=50, rounds=5, epsilon=8.0, delta=1e-5,
                      weights=12_000)
    assert small.sample_rate == 1.0 and small.noise_ratio > LEARNABLE_NOISE_RATIO
    assert large.learnable and large.warning("big") is None
    warning = small.warning("clinic")
    assert "clinic" in warning and "'max-epsilon'" in warning and "'require-dp'" in warning


def test_the_plan_derives_from_real_fingerprints_of_two_sites(tmp_path):
    from server.planning import derive_plan
    from shared.config import RunConfig

    fingerprints = {"axial": site_fingerprint(_site(tmp_path / "a", 4)),
                    "coronal": site_fingerprint(_site(tmp_path / "c", 4, affine=CORONAL_THICK, shape=(24, 10, 24)))}
    plan, pooled = derive_plan(RunConfig.from_mapping({"dp": False}), fingerprints)
    assert plan.target_spacing == (1.0, 1.0) and pooled.cases == 6
    assert all(size <= 32 for size in plan.patch_size)  # clipped to the 24 mm images (then divisible)
    assert plan.model_config().name == "dynunet"


def test_the_plan_notes_thick_coronal_sites_and_isotropic_volumes(tmp_path):
    from server.planning import plan_notes
    from shared.config import RunConfig

    fingerprints = {"axial": site_fingerprint(_site(tmp_path / "a", 4)),
                    "coronal": site_fingerprint(_site(tmp_path / "c", 4, affine=CORONAL_THICK, shape=(24, 10, 24)))}
    notes = plan_notes(RunConfig.from_mapping({"slicing": "axial"}), fingerprints)
    assert any("coronal (A-P) slices: 3" in n and "strips" in n for n in notes)
    isotropic = plan_notes(RunConfig(), {"axial": fingerprints["axial"]})
    assert any("spatial-dims = 3" in n for n in isotropic)


def test_dp_outlook_depends_on_the_runs_steps_not_on_how_they_are_split_into_rounds():
    long_rounds = dp_advice(cases=100, batch_size=32, steps_per_round=250, rounds=5, epsilon=8.0, delta=1e-5,
                            weights=500_000)
    short_rounds = dp_advice(cases=100, batch_size=32, steps_per_round=50, rounds=25, epsilon=8.0, delta=1e-5,
                             weights=500_000)
    assert short_rounds.noise_multiplier == pytest.approx(long_rounds.noise_multiplier)
    assert short_rounds.noise_ratio == pytest.approx(long_rounds.noise_ratio)
