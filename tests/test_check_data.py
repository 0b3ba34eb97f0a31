"""``python -m client check-data``: each problem is caught naming its file; exit codes 0/1/2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from client.__main__ import main
from client.commands.check_data import check_datalist
from shared.config import RunConfig
from shared.plan import manual_plan
from tests.data_cases import AFFINE, ct_volume, write_datalist, write_dicom_case, write_nifti_case
from tests.dicom_writer import write_series

CONFIG = RunConfig.from_mapping({"spatial-dims": 3, "patch-size": 16, "model": "unet", "channels": "4,8", "strides": "2"})


@pytest.fixture
def site(tmp_path):
    """A healthy site: two NIfTI cases and two DICOM-series cases; returns its folder."""
    entries = []
    for index in range(2):
        image, label = ct_volume(index)
        entries.append(write_nifti_case(tmp_path, f"n{index}", image, label))
        entries.append(write_dicom_case(tmp_path, f"d{index}", image, label))
    write_datalist(tmp_path, entries[:3], validation=entries[3:])
    return tmp_path


def _run(site: Path, capsys) -> tuple[int, str]:
    code = main(["check-data", str(site / "datalist.json"), "--spatial-dims", "3"])
    return code, capsys.readouterr().out


def test_a_healthy_site_passes_with_a_summary_table(site, capsys):
    before = {p: p.stat().st_mtime_ns for p in site.rglob("*")}
    code, out = _run(site, capsys)
    assert code == 0, out
    assert "4 readable case(s), modality CT; 0 problem(s), 0 warning(s)" in out
    assert "n0.nii.gz" in out and "d1 " in out and "0.9x0.8x2.0" in out and "20x18x8" not in out
    assert {p: p.stat().st_mtime_ns for p in site.rglob("*")} == before  # never modifies (or adds) anything


def _nifti(site, name="n0", kind="images"):
    return site / kind / f"{name}.nii.gz"


def _truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path


def _missing(site):
    path = _nifti(site, "n1")
    path.unlink()
    return path


def _truncated_nifti(site):
    return _truncate(_nifti(site))


def _corrupt_dicom(site):
    path = sorted((site / "dicom" / "d0").iterdir())[2]
    shutil.copy(get_testdata_file("MR_truncated.dcm", download=False), path)
    return path


def _truncated_dicom_slice(site):
    return _truncate(sorted((site / "dicom" / "d0").iterdir())[4])


def _not_dicom_slice(site):
    path = sorted((site / "dicom" / "d1").iterdir())[3]
    path.write_bytes(b"\x00garbage, not DICOM" * 40)  # no DICOM header: a slice damaged beyond recognition
    return path


def _mixed_series(site):
    image, _ = ct_volume(5)
    write_series(image[:, :, :2], AFFINE, site / "dicom" / "d0", first_instance=50)
    return site / "dicom" / "d0"


def _missing_slice(site):
    sorted((site / "dicom" / "d1").iterdir())[3].unlink()
    return site / "dicom" / "d1"


def _shape_mismatch(site):
    path = _nifti(site, "n0", "labels")
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 7), np.uint8), AFFINE), path)
    return path


def _geometry_mismatch(site):
    path = _nifti(site, "n0", "labels")
    label = nib.load(path)
    shifted = AFFINE.copy()
    shifted[2, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), shifted), path)
    return path


def _label_out_of_range(site):
    path = _nifti(site, "n1", "labels")
    values = np.asarray(nib.load(path).dataobj).copy()
    values[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(values, AFFINE), path)
    return path


def _nan_voxels(site):
    path = _nifti(site, "n1")
    values = np.asarray(nib.load(path).dataobj).copy()
    values[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(values, AFFINE), path)
    return path


@pytest.mark.parametrize(("breaker", "problem"), [
    (_missing, "does not exist"),
    (_truncated_nifti, "cannot read image"),
    (_corrupt_dicom, "unreadable DICOM file"),
    (_truncated_dicom_slice, "unreadable DICOM file"),
    (_not_dicom_slice, "not a readable DICOM file"),
    (_mixed_series, "mixes 2 DICOM series"),
    (_missing_slice, "missing slice"),
    (_shape_mismatch, "label shape"),
    (_geometry_mismatch, "geometry"),
    (_label_out_of_range, "outside the configured classes"),
    (_nan_voxels, "NaN or Inf"),
])
def test_each_problem_is_reported_naming_its_file(site, capsys, breaker, problem):
    bad = breaker(site)
    code, out = _run(site, capsys)
    lines = [line for line in out.splitlines() if problem in line]
    assert code == 1, out
    assert lines and lines[0].startswith(str(bad)), out
    assert "1 problem(s)" in out and "3 readable case(s)" in out  # the other cases are still read


def test_empty_label_map_is_a_warning_not_a_problem(site, capsys):
    path = _nifti(site, "n0", "labels")
    nib.save(nib.Nifti1Image(np.zeros((20, 18, 8), np.uint8), AFFINE), path)
    code, out = _run(site, capsys)
    assert code == 0
    assert f"{path}: warning: label map is empty" in out


def test_empty_datalist_is_a_problem(tmp_path, capsys):
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    code, out = _run(tmp_path, capsys)
    assert code == 1 and "'training' list is empty" in out


def test_datalist_disagreeing_with_the_model_is_a_problem(site):
    report = check_datalist(site / "datalist.json", plan=manual_plan(RunConfig.from_mapping({"num-classes": 3})))
    assert not report.ok and "num-classes = 3" in report.problems[0]


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["check-data", str(tmp_path / "nope.json")]) == 2
    with pytest.raises(SystemExit) as info:
        main(["check-data"])
    assert info.value.code == 2


def test_settings_can_come_from_a_runs_model_file(site, tmp_path, capsys):
    from shared.model import build_model
    from shared.model_file import save_model_file

    config = RunConfig.from_mapping({"num-classes": 3, "model": "unet", "channels": "4,8", "strides": "2"})
    model = save_model_file(tmp_path / "global_model.pt", state_dict=build_model(manual_plan(config).model_config()).state_dict(),
                            model_config=manual_plan(config).model_config(), extra={"run_config": config.to_mapping()})
    code = main(["check-data", str(site / "datalist.json"), "--model", str(model)])
    assert code == 1 and "num-classes = 3" in capsys.readouterr().out
    assert main(["check-data", str(site / "datalist.json"), "--model", str(model), "--num-classes", "2"]) == 0


def test_dicom_modality_contradicting_the_datalist_is_a_warning(site, capsys):
    content = json.loads((site / "datalist.json").read_text())
    content["modality"] = {"0": "MR"}
    (site / "datalist.json").write_text(json.dumps(content))
    code, out = _run(site, capsys)
    assert code == 0
    assert f"{site / 'dicom' / 'd0'}: warning: DICOM Modality is CT but the datalist says MR" in out
    assert "2 warning(s)" in out


def test_json_report_for_scripts(site, capsys):
    _nan_voxels(site)
    code = main(["check-data", str(site / "datalist.json"), "--spatial-dims", "3", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False and len(report["cases"]) == 3
    assert "NaN or Inf" in report["problems"][0] and report["cases"][0]["label_counts"]["1"] > 0
