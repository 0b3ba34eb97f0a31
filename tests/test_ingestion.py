"""Reading hospital data: DICOM series vs NIfTI, DICOM SEG, pydicom's own files, cache, 2D on volumes."""

from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose
from pydicom.data import get_testdata_file

from client.data.case_cache import CaseCache
from client.data.loading import preprocess_cases
from client.data.site_data import load_training_cases, load_validation_cases, preprocess_settings
from client.data.transforms import evaluation_transforms, loading, settings_for
from client.training.local import evaluate_local
from shared.model import build_model
from shared.plan import ChannelNorm
from tests.conftest import tiny_plan
from tests.data_cases import ct_volume, write_datalist, write_dicom_case, write_nifti_case
from tests.dicom_seg_writer import write_seg

PLAN_3D = tiny_plan({"spatial-dims": 3, "patch-size": 16, "target-spacing": 1.0})
SETTINGS = settings_for(PLAN_3D, modalities=("CT",))


@pytest.fixture
def same_case_twice(tmp_path):
    image, label = ct_volume(0)
    nifti = write_nifti_case(tmp_path, "case", image, label)
    dicom = write_dicom_case(tmp_path, "case", image, label)
    return {k: str(tmp_path / v) for k, v in nifti.items()}, {k: str(tmp_path / v) for k, v in dicom.items()}


def test_dicom_series_and_nifti_load_to_the_same_array_and_geometry(same_case_twice):
    nifti, dicom = same_case_twice
    read = Compose(loading(SETTINGS))
    a, b = read(nifti), read(dicom)
    assert a["image"].shape == b["image"].shape
    assert torch.equal(a["image"].float(), b["image"].float())  # rescale slope/intercept applied
    assert torch.allclose(a["image"].affine, b["image"].affine, atol=1e-4)
    assert float(a["image"].min()) < -100  # HU values, not stored integers
    pre = Compose(evaluation_transforms(SETTINGS).transforms)
    assert torch.allclose(pre(nifti)["image"], pre(dicom)["image"], atol=1e-5)


def test_orientation_is_canonical_and_spacing_is_resampled(same_case_twice):
    nifti, _ = same_case_twice
    oriented = Compose(loading(SETTINGS))(nifti)["image"]
    # stored axes: i runs along +A (0.8 mm), j along -R (0.9 mm); RAS puts j first, flipped
    assert torch.allclose(oriented.affine[:3, :3], torch.diag(torch.tensor([0.9, 0.8, 2.0], dtype=torch.float64)))
    assert tuple(oriented.shape[1:]) == (18, 20, 8)
    case = evaluation_transforms(SETTINGS)(nifti)
    assert [abs(n - mm) <= 1 for n, mm in zip(case["image"].shape[1:], (18 * 0.9, 20 * 0.8, 8 * 2.0))] == [True] * 3
    assert 0.0 <= float(case["image"].min()) and float(case["image"].max()) <= 1.0  # CT window -> [0, 1]


def test_dicom_seg_label_loads_like_the_nifti_label(same_case_twice, tmp_path):
    nifti, dicom = same_case_twice
    _, label = ct_volume(0)
    seg = write_seg(dicom["image"], label, tmp_path / "case_seg.dcm")
    read = Compose(loading(SETTINGS))
    from_seg = read({"image": dicom["image"], "label": str(seg)})["label"]
    from_nifti = read(nifti)["label"]
    assert torch.equal(from_seg.int(), from_nifti.int()) and int(from_seg.sum()) == int(label.sum())


def test_pydicom_shipped_ct_and_mr_files_load_with_rescale():
    for name in ("CT_small.dcm", "MR_small.dcm"):
        path = get_testdata_file(name, download=False)
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array.astype(np.float32) * float(getattr(ds, "RescaleSlope", 1)) + float(
            getattr(ds, "RescaleIntercept", 0))
        loaded = Compose(loading(SETTINGS, keys=("image",)))({"image": path})["image"]
        assert loaded.shape[-1] == 1 and sorted(loaded.shape[1:3]) == sorted(expected.shape)
        assert np.isclose(float(loaded.sum()), float(expected.sum()), rtol=1e-6)


def test_cache_is_used_on_the_second_load_and_invalidated_by_a_changed_file(tmp_path):
    cases = []
    for index in range(2):
        image, label = ct_volume(index)
        entry = write_nifti_case(tmp_path, f"case{index}", image, label)
        cases.append({k: str(tmp_path / v) for k, v in entry.items()})
    transform = evaluation_transforms(SETTINGS)
    first = CaseCache(tmp_path / "cache", settings=SETTINGS)
    fresh = preprocess_cases(cases, transform, cache=first)
    assert (first.hits, first.misses) == (0, 2)
    second = CaseCache(tmp_path / "cache", settings=SETTINGS)
    cached = preprocess_cases(cases, transform, cache=second)
    assert (second.hits, second.misses) == (2, 0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(fresh, cached))

    image, label = ct_volume(7)
    write_nifti_case(tmp_path, "case1", image, label)  # same file names, new content
    third = CaseCache(tmp_path / "cache", settings=SETTINGS)
    reloaded = preprocess_cases(cases, transform, cache=third)
    assert (third.hits, third.misses) == (1, 1)
    assert not torch.equal(reloaded[1]["image"], cached[1]["image"])
    other_settings = CaseCache(tmp_path / "cache", settings=settings_for(
        tiny_plan({"spatial-dims": 3, "patch-size": 16, "target-spacing": 2.0}), modalities=("CT",)))
    preprocess_cases(cases, transform, cache=other_settings)
    assert other_settings.misses == 2


def test_an_entry_pruned_while_it_is_read_is_still_a_hit(tmp_path, monkeypatch):
    # with overlapped evaluation a site's training and evaluation run at once: one may prune
    # an old entry the other has just read
    image, label = ct_volume(0)
    case = {k: str(tmp_path / v) for k, v in write_nifti_case(tmp_path, "case0", image, label).items()}
    cache = CaseCache(tmp_path / "cache", settings=SETTINGS)
    preprocess_cases([case], evaluation_transforms(SETTINGS), cache=cache)
    real_load = torch.load

    def load_then_prune(path, **kwargs):
        entry = real_load(path, **kwargs)
        os.unlink(path)
        return entry

    monkeypatch.setattr(torch, "load", load_then_prune)
    assert cache.get(case) is not None and cache.hits == 1


def test_touching_one_dicom_slice_invalidates_the_case(tmp_path, same_case_twice):
    _, dicom = same_case_twice
    cache = CaseCache(tmp_path / "cache", settings=SETTINGS)
    key = cache.key(dicom)
    some_slice = sorted(os.scandir(dicom["image"]), key=lambda e: e.name)[3].path
    os.utime(some_slice, ns=(0, 1_000_000_000))
    assert cache.key(dicom) != key


def _volume_site(tmp_path, count=5):
    entries = []
    for index in range(count):
        image, label = ct_volume(index)
        entries.append(write_nifti_case(tmp_path, f"case{index}", image, label))
    return write_datalist(tmp_path, entries)


def test_a_2d_model_trains_on_slices_of_volumes_and_evaluates_slice_by_slice(tmp_path):
    plan = tiny_plan({"patch-size": 16})
    datalist = _volume_site(tmp_path)
    cases, augment = load_training_cases(datalist, plan, cache_dir=tmp_path / "cache")
    assert cases[0]["image"].ndim == 4 and cases[0]["image"].shape[-1] > 1
    samples = augment(cases[0])
    assert [tuple(s["image"].shape) for s in samples] == [(1, 16, 16)]
    validation = load_validation_cases(datalist, plan, cache_dir=tmp_path / "cache")
    result = evaluate_local(build_model(plan.model_config()), validation, plan=plan, device=torch.device("cpu"))
    assert result.num_examples == len(validation) and 0.0 <= result.dice <= 1.0


@pytest.mark.parametrize("fraction", [0.33, 0.8])
def test_2d_sampling_oversamples_foreground_as_the_plan_says(tmp_path, fraction):
    plan = tiny_plan({"patch-size": 8, "foreground-fraction": fraction})
    cases, augment = load_training_cases(_volume_site(tmp_path, 3), plan)
    augment.set_random_state(seed=0)
    centred = [bool(s["label"][..., 3:5, 3:5].sum() > 0) for _ in range(200) for s in augment(cases[0])]
    assert abs(sum(centred) / len(centred) - fraction) < 0.1


def test_a_3d_model_trains_on_patches(tmp_path):
    plan = tiny_plan({"patch-size": 8, "spatial-dims": 3})
    cases, augment = load_training_cases(_volume_site(tmp_path, 3), plan)
    assert [tuple(s["image"].shape) for s in augment(cases[0])] == [(1, 8, 8, 8)]


def test_settings_include_the_datalists_modality_and_label_map(tmp_path):
    datalist = _volume_site(tmp_path, 2)
    from client.data.datalist import load_datalist

    settings = preprocess_settings(tiny_plan(), load_datalist(datalist))
    assert settings.normalization == (ChannelNorm("ct", low=-1000.0, high=1000.0, mean=-1000.0, std=2000.0),)


def test_label_map_maps_stored_values_to_classes(tmp_path):
    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "case", image, (label * 5).astype(np.uint8))
    case = {k: str(tmp_path / v) for k, v in entry.items()}
    mapped = settings_for(PLAN_3D, label_map=((5, 1),))
    loaded = Compose(loading(mapped))(case)["label"]
    assert set(torch.unique(loaded).tolist()) == {0, 1}


def test_multimodal_image_as_a_file_list_or_a_4d_nifti(tmp_path):
    import nibabel as nib

    from tests.data_cases import AFFINE

    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "ct", image, label)
    mr = np.random.default_rng(1).normal(300.0, 50.0, size=image.shape).astype(np.float32)
    nib.save(nib.Nifti1Image(mr, AFFINE), tmp_path / "mr.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([image, mr], axis=-1), AFFINE), tmp_path / "both.nii.gz")
    settings = settings_for(tiny_plan({"spatial-dims": 3, "patch-size": 16, "in-channels": 2}),
                            modalities=("CT", "MR"))
    transform = Compose(loading(settings))
    as_list = transform({"image": [str(tmp_path / entry["image"]), str(tmp_path / "mr.nii.gz")],
                         "label": str(tmp_path / entry["label"])})
    as_4d = transform({"image": str(tmp_path / "both.nii.gz"), "label": str(tmp_path / entry["label"])})
    assert as_list["image"].shape[0] == 2 and torch.equal(as_list["image"], as_4d["image"])
    normalised = evaluation_transforms(settings)({"image": str(tmp_path / "both.nii.gz"),
                                                  "label": str(tmp_path / entry["label"])})["image"]
    assert 0.0 <= float(normalised[0].min()) and float(normalised[0].max()) <= 1.0  # CT: HU window
    assert float(normalised[1].max()) > 1.5 and float(normalised[1].min()) < -1.5  # MR: z-score


def test_a_dicom_seg_of_another_grid_is_a_geometry_problem(same_case_twice, tmp_path):
    from shared.errors import DataError
    from tests.data_cases import AFFINE
    from tests.dicom_writer import write_series

    _, dicom = same_case_twice
    image, label = ct_volume(0)
    shifted = AFFINE.copy()
    shifted[:3, 3] += 0.4  # less than a voxel: a different grid
    write_series(image, shifted, tmp_path / "other")
    seg = write_seg(tmp_path / "other", label, tmp_path / "other_seg.dcm")
    with pytest.raises(DataError, match="do not lie on the image's voxel grid") as info:
        preprocess_cases([{"image": dicom["image"], "label": str(seg)}], Compose(loading(SETTINGS)))
    assert str(seg) in str(info.value)


def test_other_file_formats_are_refused_naming_the_file(tmp_path):
    from client.data.readers import load_image
    from shared.errors import DataError

    path = tmp_path / "scan.png"
    path.write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="not a NIfTI file") as info:
        load_image(str(path))
    assert str(path) in str(info.value)


def test_prune_drops_entries_unused_for_a_while_and_keeps_used_ones(tmp_path):
    cases = []
    for index in range(2):
        entry = write_nifti_case(tmp_path, f"case{index}", *ct_volume(index))
        cases.append({k: str(tmp_path / v) for k, v in entry.items()})
    transform = evaluation_transforms(SETTINGS)
    preprocess_cases(cases, transform, cache=CaseCache(tmp_path / "cache", settings=SETTINGS))
    entries = sorted((tmp_path / "cache").glob("*/*.pt"))
    for entry in entries:
        os.utime(entry, (1_000_000_000, 1_000_000_000))  # last used in 2001
    cache = CaseCache(tmp_path / "cache", settings=SETTINGS)
    preprocess_cases(cases[:1], transform, cache=cache)  # a hit refreshes case0's entry
    assert cache.prune(max_age_s=3600) == 1
    assert len(list((tmp_path / "cache").glob("*/*.pt"))) == 1
    assert CaseCache(tmp_path / "cache", settings=SETTINGS).get(cases[0]) is not None


def test_cache_entries_skip_the_disk_flush_and_an_entry_left_empty_is_rebuilt(tmp_path, monkeypatch):
    entry = write_nifti_case(tmp_path, "case0", *ct_volume(0))
    cases = [{k: str(tmp_path / v) for k, v in entry.items()}]
    transform = evaluation_transforms(SETTINGS)
    flushes = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: flushes.append(fd) or real_fsync(fd))
    fresh = preprocess_cases(cases, transform, cache=CaseCache(tmp_path / "cache", settings=SETTINGS))
    assert flushes == []  # derived data: no fsync of the entry or its directory
    (stored,) = (tmp_path / "cache").glob("*/*.pt")
    stored.write_bytes(b"")  # what a power loss before writeback can leave
    cache = CaseCache(tmp_path / "cache", settings=SETTINGS)
    rebuilt = preprocess_cases(cases, transform, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1)
    assert torch.equal(rebuilt[0]["image"], fresh[0]["image"]) and stored.stat().st_size > 0
