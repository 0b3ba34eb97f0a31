"""Datalist reading: relative paths, deterministic split, clear errors naming the file."""

from __future__ import annotations

import json

import pytest

from client.data.datalist import load_datalist, split_cases
from shared.errors import DataError


def _write(tmp_path, content):
    path = tmp_path / "datalist.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _files(tmp_path, n):
    for i in range(n):
        (tmp_path / f"img{i}.nii.gz").write_bytes(b"x")
        (tmp_path / f"lab{i}.nii.gz").write_bytes(b"x")
    return [{"image": f"img{i}.nii.gz", "label": f"lab{i}.nii.gz"} for i in range(n)]


def test_paths_resolve_relative_to_the_json(tmp_path):
    datalist = load_datalist(_write(tmp_path, {"training": _files(tmp_path, 3), "validation": []}))
    assert datalist.training[0]["image"] == str((tmp_path / "img0.nii.gz").resolve())


def test_split_without_validation_is_deterministic_and_disjoint(tmp_path):
    cases = _files(tmp_path, 10)
    first = load_datalist(_write(tmp_path, {"training": cases}))
    second = load_datalist(_write(tmp_path, {"training": list(reversed(cases))}))
    assert {c["image"] for c in first.validation} == {c["image"] for c in second.validation}
    assert len(first.validation) == 2 and len(first.training) == 8
    assert not {c["image"] for c in first.validation} & {c["image"] for c in first.training}


def test_split_of_one_case_keeps_it_for_training():
    assert split_cases([{"image": "a", "label": "b"}]) == ([{"image": "a", "label": "b"}], [])


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "not valid JSON"),
    ({"validation": []}, "'training' list"),
    ({"training": []}, "empty"),
    ({"training": [{"image": "img0.nii.gz"}]}, r"training\[0\] needs"),
])
def test_broken_datalist_is_named(tmp_path, content, message):
    path = _write(tmp_path, content)
    with pytest.raises(DataError, match=message) as info:
        load_datalist(path)
    assert str(path) in str(info.value)


def test_missing_datalist_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_datalist(tmp_path / "nope.json")


def test_missing_image_file_is_named(tmp_path):
    path = _write(tmp_path, {"training": [{"image": "gone.nii.gz", "label": "gone2.nii.gz"}]})
    with pytest.raises(DataError, match="gone.nii.gz"):
        load_datalist(path)


def test_multimodal_image_lists_modalities_and_label_map(tmp_path):
    cases = _files(tmp_path, 2)
    (tmp_path / "flair0.nii.gz").write_bytes(b"x")
    cases[0]["image"] = ["img0.nii.gz", "flair0.nii.gz"]
    datalist = load_datalist(_write(tmp_path, {"training": cases, "validation": [],
                                               "modality": {"1": "FLAIR", "0": "T1"}, "label_map": {"4": 1}}))
    assert datalist.training[0]["image"] == [str(tmp_path / "img0.nii.gz"), str(tmp_path / "flair0.nii.gz")]
    assert datalist.modalities == ("T1", "FLAIR") and datalist.label_map == {4: 1}


@pytest.mark.parametrize(("extra", "message"), [
    ({"modality": {"first": "CT"}}, "'modality' must map"),
    ({"label_map": {"a": "b"}}, "'label_map' must map"),
])
def test_bad_modality_or_label_map_is_named(tmp_path, extra, message):
    path = _write(tmp_path, {"training": _files(tmp_path, 1), **extra})
    with pytest.raises(DataError, match=message):
        load_datalist(path)


def test_missing_files_can_be_left_to_the_caller(tmp_path):
    path = _write(tmp_path, {"training": [{"image": "gone.nii.gz", "label": "gone2.nii.gz"}]})
    assert load_datalist(path, check_files=False).training[0]["image"].endswith("gone.nii.gz")
