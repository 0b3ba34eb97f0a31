"""``client export --format onnx --quantize``: int8 calibrated on the site's cases, Dice change reported."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from client.__main__ import main
from client.commands.export import MAX_MISMATCH, export_model
from client.inference.model_files import PREPROCESSING_FILE
from client.commands.predict import predict_scan
from shared.errors import ConfigError
from tests.data_cases import ct_volume, write_datalist, write_nifti_case
from tests.test_predict_tools import _model_file


def _site(folder):
    cases = [write_nifti_case(folder, f"case{i}", *ct_volume(i), affine=np.eye(4)) for i in range(3)]
    return write_datalist(folder, cases[:2], validation=cases[2:])


def test_quantised_export_agrees_with_the_float_model_and_reports_the_dice_change(tmp_path):
    model_path, datalist = _model_file(tmp_path), _site(tmp_path)
    result = export_model(model_path=model_path, out_dir=tmp_path / "int8", fmt="onnx", quantize=True,
                          datalist=datalist)
    assert result.network.name == "model.int8.onnx"
    # the stated tolerance: at most 2% of the check volume's voxels change class
    assert result.mismatched_voxels <= MAX_MISMATCH["onnx-int8"] * result.check_voxels
    report = json.loads((tmp_path / "int8" / PREPROCESSING_FILE).read_text())["quantization"]
    assert report["validation_cases"] == 1 and report["calibration_patches"] == 8
    assert report["dice_change"] == pytest.approx(report["dice_int8"] - report["dice_float"])
    assert 0.0 <= report["dice_float"] <= 1.0 and report["seconds_int8"] > 0
    # the folder runs through predict, and its mask is near the float model's on a case of the site
    scan = tmp_path / "images" / "case2.nii.gz"
    predict_scan(model_path=model_path, input_path=scan, output_path=tmp_path / "float.nii.gz", modality="CT")
    predict_scan(model_path=tmp_path / "int8", input_path=scan, output_path=tmp_path / "q.nii.gz", modality="CT")
    float_mask, int8_mask = (nib.load(tmp_path / n).get_fdata() for n in ("float.nii.gz", "q.nii.gz"))
    assert (float_mask != int8_mask).mean() <= MAX_MISMATCH["onnx-int8"] and 0 < float_mask.mean() < 1
    assert result.quantization.describe().startswith(f"int8: Dice {report['dice_int8']:.4f} vs float")


def test_quantize_needs_onnx_and_a_datalist(tmp_path, capsys):
    assert main(["export", "--model", str(_model_file(tmp_path)), "--out", str(tmp_path / "x"), "--quantize",
                 "--datalist", str(tmp_path / "datalist.json")]) != 0
    assert "'--quantize': needs '--format onnx'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--datalist"):
        export_model(model_path=_model_file(tmp_path), out_dir=tmp_path / "y", fmt="onnx", quantize=True)
