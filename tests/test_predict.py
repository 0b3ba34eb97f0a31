"""``python -m client predict``: the mask lands in the input's own geometry (shape and affine)."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from client.__main__ import main
from client.data.transforms import orienting, reading, resampling, settings_for
from client.inference.scan_grid import resample_to_match
from client.commands.predict import predict_scan
from shared.config import RunConfig
from shared.errors import DataError
from shared.model import build_model
from shared.model_file import save_model_file
from shared.plan import manual_plan
from tests.conftest import TINY_RUN_CONFIG, tiny_plan
from tests.data_cases import ct_volume, write_dicom_case, write_nifti_case

SETTINGS_3D = settings_for(tiny_plan({"spatial-dims": 3, "patch-size": 16, "target-spacing": 1.0}))

def _model_file(tmp_path: Path, **overrides) -> Path:
    config = RunConfig.from_mapping(dict(TINY_RUN_CONFIG, **{"patch-size": 16}, **overrides))
    return save_model_file(tmp_path / "global_model.pt", state_dict=build_model(manual_plan(config).model_config()).state_dict(),
                           model_config=manual_plan(config).model_config(), extra={"round": 3, "run_config": config.to_mapping()})


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mask_has_the_input_volumes_shape_and_affine(tmp_path, spatial_dims):
    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "case", image, label)
    out = tmp_path / "mask.nii.gz"
    result = predict_scan(model_path=_model_file(tmp_path, **{"spatial-dims": spatial_dims}),
                          input_path=tmp_path / entry["image"], output_path=out, device="cpu")
    written, source = nib.load(out), nib.load(tmp_path / entry["image"])
    assert written.shape == source.shape == result.shape
    assert np.allclose(written.affine, source.affine, atol=1e-5)
    assert written.get_data_dtype() == np.uint8 and set(np.unique(written.get_fdata())) <= {0.0, 1.0}


def test_a_2d_image_gets_a_2d_mask(tmp_path):
    affine = np.diag([0.7, 1.3, 1.0, 1.0])
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=(40, 30)).astype(np.float32), affine), path)
    predict_scan(model_path=_model_file(tmp_path), input_path=path, output_path=tmp_path / "m.nii.gz")
    written = nib.load(tmp_path / "m.nii.gz")
    assert written.shape == (40, 30) and np.allclose(written.affine, affine)


def test_probabilities_map_back_onto_the_input_grid(tmp_path):
    """Round trip: push a label through preprocessing, map it back, recover the label."""
    label = np.zeros((30, 26, 10), np.uint8)
    label[8:20, 6:18, 2:8] = 1
    entry = write_nifti_case(tmp_path, "case", label.astype(np.float32), label)
    settings = SETTINGS_3D
    raw = Compose(reading(("image",)))({"image": str(tmp_path / entry["image"])})["image"]
    pre = Compose(orienting(settings, ("image",)) + resampling(settings, ("image",)))({"image": raw})["image"]
    foreground = (pre[0] > (pre[0].max() + pre[0].min()) / 2).float()
    mask = resample_to_match(torch.stack([1 - foreground, foreground]), pre.affine, raw).argmax(dim=0)
    assert tuple(mask.shape) == label.shape
    agreement = float((mask.numpy() == label).mean())
    assert agreement > 0.98, agreement  # only boundary voxels may differ after two resamplings


def test_dicom_series_in_nifti_and_dicom_seg_out(tmp_path):
    image, label = ct_volume(1)
    nifti = write_nifti_case(tmp_path, "case", image, label)
    dicom = write_dicom_case(tmp_path, "case", image, label)
    model = _model_file(tmp_path, **{"spatial-dims": 3})
    predict_scan(model_path=model, input_path=tmp_path / nifti["image"],
                 output_path=tmp_path / "a.nii.gz", modality="CT")
    from_dicom = predict_scan(model_path=model, input_path=tmp_path / dicom["image"],
                              output_path=tmp_path / "b.nii.gz", dicom_seg_path=tmp_path / "b.dcm")
    assert from_dicom.modality == "CT"  # from the DICOM Modality tag
    a, b = nib.load(tmp_path / "a.nii.gz"), nib.load(tmp_path / "b.nii.gz")
    assert np.allclose(a.affine, b.affine, atol=1e-4) and np.array_equal(a.get_fdata(), b.get_fdata())
    seg = hd.seg.segread(tmp_path / "b.dcm")
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 1
    from client.data.readers import load_image

    seg_volume = Compose(reading() + orienting(SETTINGS_3D))(
        {"image": str(tmp_path / dicom["image"]), "label": str(tmp_path / "b.dcm")})["label"]
    expected = Compose(reading(("image",)) + orienting(SETTINGS_3D, ("image",)))(
        {"image": str(tmp_path / "b.nii.gz")})["image"]
    assert torch.equal(seg_volume.int(), expected.int())
    assert load_image(str(tmp_path / "b.dcm")).meta["filename_or_obj"].endswith("b.dcm")


def test_cli_writes_the_mask_and_reports_errors(tmp_path, capsys):
    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "case", image, label)
    model = _model_file(tmp_path)
    code = main(["predict", "--model", str(model), "--input", str(tmp_path / entry["image"]),
                 "--output", str(tmp_path / "out.nii.gz"), "--device", "cpu"])
    assert code == 0 and "wrote" in capsys.readouterr().out and (tmp_path / "out.nii.gz").exists()
    code = main(["predict", "--model", str(tmp_path / "missing.pt"), "--input", str(tmp_path / entry["image"]),
                 "--output", str(tmp_path / "x.nii.gz")])
    assert code == 1 and "missing.pt" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_a_two_channel_model_takes_one_scan_per_channel(tmp_path):
    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "case", image, label)
    second = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(image * 0.1 + 40.0, nib.load(tmp_path / entry["image"]).affine), second)
    model = _model_file(tmp_path, **{"in-channels": 2})
    result = predict_scan(model_path=model, input_path=[tmp_path / entry["image"], second],
                          output_path=tmp_path / "m.nii.gz", modality="CT,MR")
    assert result.modality == "CT,MR" and nib.load(tmp_path / "m.nii.gz").shape == image.shape
    with pytest.raises(DataError, match="model expects 2"):
        predict_scan(model_path=model, input_path=second, output_path=tmp_path / "x.nii.gz", modality="MR")


def test_pydicom_ct_small_single_file_in_mask_and_seg_out(tmp_path):
    from pydicom.data import get_testdata_file

    source = get_testdata_file("CT_small.dcm", download=False)
    raw = Compose(reading(("image",)))({"image": source})["image"]
    result = predict_scan(model_path=_model_file(tmp_path), input_path=Path(source),
                          output_path=tmp_path / "m.nii.gz", dicom_seg_path=tmp_path / "m_seg.dcm")
    written = nib.load(tmp_path / "m.nii.gz")
    assert written.shape == tuple(raw.shape[1:3]) == result.shape and result.modality == "CT"
    assert np.allclose(written.affine, np.asarray(raw.affine), atol=1e-4)
    seg = hd.seg.segread(tmp_path / "m_seg.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom_series_uid(source)


def pydicom_series_uid(path: str) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_a_model_from_a_run_with_other_config_keys_still_predicts(tmp_path):
    import torch as _torch

    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "case", image, label)
    model = _model_file(tmp_path)
    payload = _torch.load(model, weights_only=True)
    payload["run_config"]["dp-noise-multiplier"] = 1.1  # a key of another fedseg version
    _torch.save(payload, model)
    result = predict_scan(model_path=model, input_path=tmp_path / entry["image"], output_path=tmp_path / "m.nii.gz")
    assert result.shape == image.shape


def test_predict_with_a_planned_dynunet_uses_the_plan_in_the_model_file(tmp_path):
    from client.data.site_fingerprint import site_fingerprint
    from server.planning import derive_plan
    from tests.data_cases import write_datalist

    entries = [write_nifti_case(tmp_path, f"case{i}", *ct_volume(i, (24, 20, 12))) for i in range(3)]
    fingerprint = site_fingerprint(write_datalist(tmp_path, entries[:2], validation=entries[2:]))
    config = RunConfig.from_mapping({"spatial-dims": 3, "base-filters": 4, "max-filters": 8,
                                     "memory-budget-mb": 64, "dp": False})
    plan, _ = derive_plan(config, {"site": fingerprint})
    assert plan.model == "dynunet" and plan.normalization[0].scheme == "ct"
    model = build_model(plan.model_config())
    path = save_model_file(tmp_path / "global_model.pt", state_dict=model.state_dict(),
                           model_config=plan.model_config(), extra={"plan": plan.to_dict()})
    result = predict_scan(model_path=path, input_path=tmp_path / entries[2]["image"],
                          output_path=tmp_path / "mask.nii.gz")
    assert result.shape == (24, 20, 12) and sum(result.voxels_per_class.values()) == 24 * 20 * 12


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_a_dynunet_model_file_predicts_in_the_input_geometry(tmp_path, spatial_dims, capsys):
    image, label = ct_volume(0)
    entry = write_nifti_case(tmp_path, "case", image, label)
    model = _model_file(tmp_path, **{"model": "dynunet", "channels": "4,8,16", "strides": "2,2", "num-res-units": -1,
                                     "deep-supervision": 1, "spatial-dims": spatial_dims})
    code = main(["predict", "--model", str(model), "--input", str(tmp_path / entry["image"]),
                 "--output", str(tmp_path / "out.nii.gz"), "--device", "cpu"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    written = nib.load(tmp_path / "out.nii.gz")
    assert written.shape == image.shape and set(np.unique(written.get_fdata())) <= {0.0, 1.0}
