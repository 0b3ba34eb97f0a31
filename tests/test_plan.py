"""The federated plan: nnU-Net's topology, derivation from hand-checked fingerprints, the plan file."""

from __future__ import annotations

import json

import pytest

from server.planning import derive_plan, pool_fingerprints, target_spacing, weighted_median
from shared.config import RunConfig
from shared.errors import ConfigError
from shared.fingerprint import ChannelIntensity, Fingerprint
from shared.plan import Plan, manual_plan, read_plan_file
from shared.topology import pool_and_conv_props


def test_topology_matches_nnunet_on_an_isotropic_patch():
    # nnU-Net v2's plan for the Decathlon hippocampus task: 1 mm, patch 40x56x40
    topology = pool_and_conv_props((1.0, 1.0, 1.0), (40, 56, 40))
    assert topology.strides == ((2, 2, 2),) * 3
    assert topology.kernels == ((3, 3, 3),) * 4 and topology.patch_size == (40, 56, 40)


def test_topology_of_anisotropic_ct_pools_the_thick_axis_late_and_convolves_it_late():
    # worked by hand from nnU-Net's rule: 0.8 x 0.8 x 2.5 mm, patch 160 x 160 x 48
    topology = pool_and_conv_props((0.8, 0.8, 2.5), (160, 160, 48))
    assert topology.strides == ((2, 2, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 1))
    assert topology.kernels == ((3, 3, 1),) + ((3, 3, 3),) * 5
    assert topology.divisor == (32, 32, 8) and topology.patch_size == (160, 160, 48)


def test_topology_pads_the_patch_to_what_the_strides_divide():
    assert pool_and_conv_props((1.0, 1.0), (100, 60)).patch_size == (112, 64)  # 4 poolings each: divisor 16


def _site(cases: int, *, spacing: tuple, p10: tuple, extent: tuple, voxels: int, mean: float, std: float,
          low: float, high: float, ct: bool = True) -> Fingerprint:
    table = {10: p10, 50: spacing, 90: spacing}
    extents = {p: extent for p in (10, 50, 90)}
    return Fingerprint(cases=cases, channels=1, classes=2, spacing=table, extent=extents, sliced_spacing=table,
                       sliced_extent=extents, thickest_axis_cases=(0, 0, cases), isotropic_cases=0,
                       intensity=(ChannelIntensity(voxels=voxels, mean=mean, std=std,
                                                   percentiles={0.5: low, 50.0: mean, 99.5: high}),),
                       class_fractions={1: 0.01}, ct_channels=(ct,))


CT_SITES = {
    "thick": _site(30, spacing=(0.8, 0.8, 5.0), p10=(0.7, 0.7, 2.5), extent=(400.0, 400.0, 300.0), voxels=1000,
                   mean=40.0, std=10.0, low=-100.0, high=200.0),
    "thin": _site(10, spacing=(0.9, 0.9, 1.0), p10=(0.8, 0.8, 1.0), extent=(400.0, 400.0, 300.0), voxels=3000,
                  mean=60.0, std=20.0, low=-50.0, high=300.0),
}


def test_weighted_median_counts_each_sites_cases():
    assert weighted_median([5.0, 1.0], [30, 10]) == 5.0
    assert weighted_median([5.0, 1.0], [10, 30]) == 1.0


def test_anisotropic_ct_gets_nnunets_target_spacing_and_pooled_ct_normalisation():
    pooled = pool_fingerprints(CT_SITES, spatial_dims=3)
    assert pooled.cases == 40 and pooled.median_spacing == (0.8, 0.8, 5.0)
    # 5.0 > 3 x 0.8 and 60 slices x 3 < 500 voxels in plane: the coarse axis takes the 10th percentile
    assert target_spacing(pooled, spatial_dims=3) == (0.8, 0.8, 2.5)
    config = RunConfig.from_mapping({"spatial-dims": 3, "dp": False, "memory-budget-mb": 256})
    plan, _ = derive_plan(config, CT_SITES)
    (norm,) = plan.normalization
    # exact pooled mean and std from counts, means and stds; percentiles weighted by foreground voxels
    assert norm.scheme == "ct" and norm.mean == pytest.approx(55.0) and norm.std == pytest.approx(20.0)
    assert (norm.low, norm.high) == pytest.approx((-62.5, 275.0))
    assert plan.target_spacing == (0.8, 0.8, 2.5) and plan.model == "dynunet"
    assert plan.kernels[0][2] == 1  # thick axis not convolved at full resolution
    assert plan.batch_size >= 2 and all(p % d == 0 for p, d in zip(plan.patch_size, _divisor(plan)))


def test_the_memory_budget_shrinks_the_patch_and_batch():
    small = derive_plan(RunConfig.from_mapping({"spatial-dims": 3, "dp": False, "memory-budget-mb": 128}),
                        CT_SITES)[0]
    large = derive_plan(RunConfig.from_mapping({"spatial-dims": 3, "dp": False, "memory-budget-mb": 4096}),
                        CT_SITES)[0]
    voxels = [p.patch_size[0] * p.patch_size[1] * p.patch_size[2] * p.batch_size for p in (small, large)]
    assert voxels[0] < voxels[1]


def test_2d_plans_in_the_sliced_frame_and_mr_is_zscored_per_case():
    sites = {name: _site(5, spacing=(1.0, 1.2, 3.0), p10=(1.0, 1.2, 3.0), extent=(200.0, 240.0, 150.0),
                         voxels=100, mean=1.0, std=1.0, low=0.0, high=2.0, ct=False) for name in ("a", "b")}
    plan, _ = derive_plan(RunConfig.from_mapping({"dp": False}), sites)
    assert plan.spatial_dims == 2 and plan.target_spacing == (1.0, 1.2)
    assert [n.scheme for n in plan.normalization] == ["zscore"] and plan.slicing == "lowest-resolution"
    assert plan.patch_size[0] <= 256 and plan.patch_size[1] <= 256  # clipped to the median image (200 x 200)


def test_explicit_keys_win_over_the_derivation():
    config = RunConfig.from_mapping({"spatial-dims": 3, "target-spacing": "1.5", "patch-size": "64,64,32",
                                     "batch-size": 3, "dp": False})
    plan, _ = derive_plan(config, CT_SITES)
    assert (plan.target_spacing, plan.patch_size, plan.batch_size) == ((1.5, 1.5, 1.5), (64, 64, 32), 3)


def test_sites_that_disagree_on_the_task_are_named():
    other = dict(CT_SITES)
    other["three"] = Fingerprint(**{**CT_SITES["thin"].__dict__, "classes": 3, "class_fractions": {1: 0.1, 2: 0.1}})
    with pytest.raises(ConfigError, match="disagree on the number of classes"):
        derive_plan(RunConfig(), other)
    with pytest.raises(ConfigError, match="'num-classes'"):
        derive_plan(RunConfig.from_mapping({"num-classes": 3}), CT_SITES)
    with pytest.raises(ConfigError, match="no site sent a fingerprint"):
        derive_plan(RunConfig(), {})


def test_a_plan_round_trips_through_json_and_its_file(tmp_path):
    plan, _ = derive_plan(RunConfig.from_mapping({"spatial-dims": 3, "memory-budget-mb": 256}), CT_SITES)
    assert Plan.from_json(plan.to_json()) == plan
    (tmp_path / "plan.json").write_text(json.dumps({"plan": plan.to_dict(), "sites": {}}))
    assert read_plan_file(tmp_path / "plan.json") == plan
    assert manual_plan(RunConfig.from_mapping({"plan": str(tmp_path / "plan.json")})) != plan  # manual ignores it


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "other"}, "not a fedseg plan"),
    ({"patch_size": [30, 30, 30]}, "not divisible"),
    ({"normalization": [{"scheme": "minmax"}]}, "scheme must be one of"),
    ({"batch_size": 0}, "batch_size"),
])
def test_a_malformed_plan_is_refused_naming_its_source(change, message):
    plan = manual_plan(RunConfig.from_mapping({"spatial-dims": 3}))
    with pytest.raises(ConfigError, match=message) as info:
        Plan.from_dict({**plan.to_dict(), **change}, source="the-source")
    assert "the-source" in str(info.value) or message != "not a fedseg plan"


def _divisor(plan: Plan) -> tuple[int, ...]:
    import math

    return tuple(math.prod(level[a] for level in plan.strides) for a in range(plan.spatial_dims))


def test_under_dp_the_plan_narrows_the_presets_network_until_most_cases_can_learn():
    import dataclasses

    from server.dp_sizing import learnable_case_share

    sites = {name: dataclasses.replace(
        _site(cases, spacing=(1.0, 1.0, 1.0), p10=(1.0, 1.0, 1.0), extent=(96.0, 96.0, 96.0), voxels=1000,
              mean=1.0, std=1.0, low=0.0, high=2.0, ct=False), dp_epsilon_left=8.0, dp_delta=1e-5)
        for name, cases in (("a", 80), ("b", 50))}
    wide = derive_plan(RunConfig.from_mapping({"dp": False}), sites)[0]
    config = RunConfig.from_mapping({"num-rounds": 5})
    narrow = derive_plan(config, sites)[0]
    assert wide.channels[0] == 16 and narrow.channels[0] == 8  # halved once: both sites can then learn
    assert learnable_case_share(config, narrow, sites) >= 0.5 > learnable_case_share(config, wide, sites)
    fixed = derive_plan(RunConfig.from_mapping({"channels": "16,32,64,128,256", "strides": "2,2,2,2"}), sites)[0]
    assert fixed.channels[0] == 16  # a width set by hand is kept (and its sites warned)
