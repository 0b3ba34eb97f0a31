"""``predict``'s fast path back to the input grid, ``--uncertainty``, ``--input-list`` and ``export``."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Compose

from client.__main__ import main
from client.data.transforms import orienting, reading, resampling, settings_for
from client.commands.export import export_model
from client.inference.model_files import PREPROCESSING_FILE, load_exported
from client.inference.predictor import STAGES
from client.inference.scan_grid import exact_view, resample_to_match
from client.inference.whole_volume import predict_volume
from client.commands.predict import predict_scan
from client.commands.predict_batch import predict_list
from shared.config import RunConfig
from shared.errors import WeightsError
from shared.model import build_model
from shared.model_file import save_model_file
from shared.plan import manual_plan
from tests.conftest import TINY_RUN_CONFIG


def _model_file(folder: Path, **overrides) -> Path:
    config = RunConfig.from_mapping({**TINY_RUN_CONFIG, "patch-size": 16, "spatial-dims": 3, **overrides})
    plan = manual_plan(config)
    torch.manual_seed(0)
    weights = build_model(plan.model_config()).state_dict()
    for name in list(weights)[-2:]:  # the output convolution: logits far from 0, so classes are mostly sure
        weights[name] = weights[name] * 30.0
    return save_model_file(folder / "global_model.pt", state_dict=weights, model_config=plan.model_config(),
                           extra={"plan": plan.to_dict()})


def _scan(path: Path, shape=(24, 20, 18), affine=None, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    volume = rng.normal(0, 1, size=shape).astype(np.float32)
    volume[6:14, 5:12, 4:10] += 3.0
    nib.save(nib.Nifti1Image(volume, np.eye(4) if affine is None else affine), path)
    return path


def _preprocessed(path: Path, plan) -> tuple:
    settings = settings_for(plan)
    raw = Compose(reading(("image",)))({"image": str(path)})["image"]
    return raw, Compose(orienting(settings, ("image",)) + resampling(settings, ("image",)))({"image": raw})["image"]


def test_a_reoriented_scan_is_mapped_back_voxel_for_voxel_as_the_resampler_would(tmp_path):
    # LPS-like axes, swapped and flipped, at the plan's 1 mm: preprocessing reorients and pads only
    affine = np.array([[0, -1.0, 0, 5], [-1.0, 0, 0, 3], [0, 0, 1.0, -2], [0, 0, 0, 1]])
    plan = manual_plan(RunConfig.from_mapping(dict(TINY_RUN_CONFIG, **{"patch-size": 16, "spatial-dims": 3})))
    raw, pre = _preprocessed(_scan(tmp_path / "a.nii.gz", shape=(20, 12, 9), affine=affine), plan)
    view = exact_view(pre.affine, raw.affine, pre.shape[1:], raw.shape[1:])
    values = torch.rand(2, *pre.shape[1:])
    assert view is not None and tuple(view(values).shape) == (2, 20, 12, 9)
    assert torch.allclose(view(values), resample_to_match(values, pre.affine, raw), atol=1e-5)
    coarse = np.diag([1.5, 1.5, 1.5, 1.0])  # resampled to 1 mm: no voxel-for-voxel map
    raw, pre = _preprocessed(_scan(tmp_path / "b.nii.gz", affine=coarse), plan)
    assert exact_view(pre.affine, raw.affine, pre.shape[1:], raw.shape[1:]) is None


def test_uncertainty_has_the_input_geometry_and_is_higher_where_flips_change_the_class(tmp_path):
    model_path, scan = _model_file(tmp_path), _scan(tmp_path / "scan.nii.gz", affine=np.diag([1.0, 1, 1, 1]))
    result = predict_scan(model_path=model_path, input_path=scan, output_path=tmp_path / "m.nii.gz",
                          uncertainty=True, device="cpu")
    written = nib.load(result.uncertainty)
    assert result.uncertainty == tmp_path / "m_uncertainty.nii.gz" and set(result.seconds) == set(STAGES)
    assert written.shape == nib.load(scan).shape and np.allclose(written.affine, nib.load(scan).affine)
    entropy = written.get_fdata()
    assert entropy.min() >= 0.0 and entropy.max() <= 1.0 + 1e-6
    # each flip's own class, computed here independently of predict's averaging
    from shared.model_file import load_model

    model, payload = load_model(model_path)
    from client.inference.model_files import plan_of_model

    plan = plan_of_model(payload, model_path)
    _, pre = _preprocessed(scan, plan)
    volume = pre.as_tensor()
    with torch.no_grad():
        classes = [torch.flip(predict_volume(model, torch.flip(volume, axis) if axis else volume, spatial_dims=3,
                                             patch_size=plan.patch_size)[0], axis).argmax(0)
                   for axis in [(), (1,), (2,), (3,)]]
    disagree = (torch.stack(classes) != classes[0]).any(0).numpy()  # pre grid == input grid here (1 mm, RAS)
    assert disagree.shape == entropy.shape and 0 < disagree.sum() < disagree.size
    assert entropy[disagree].mean() > 2 * entropy[~disagree].mean()


def test_input_list_skips_finished_scans_and_redoes_missing_ones(tmp_path, capsys):
    model_path = _model_file(tmp_path)
    (tmp_path / "scans").mkdir()
    for name in ("a", "b"):
        _scan(tmp_path / "scans" / f"{name}.nii.gz", seed=ord(name))
    listing = tmp_path / "scans" / "list.txt"
    listing.write_text("# scans to segment\na.nii.gz\nb.nii.gz\n")
    out = tmp_path / "out"
    assert predict_list(model_path=model_path, input_list=listing, output_dir=out, options={"device": "cpu"}) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    kept = (out / "a_seg.nii.gz").stat().st_mtime_ns
    (out / "b_seg.nii.gz").unlink()
    (out / ".b_seg.nii.gz.x1.tmp").write_bytes(b"half a mask")  # what a killed atomic write leaves: not a mask
    capsys.readouterr()
    assert main(["predict", "--model", str(model_path), "--input-list", str(listing), "--output-dir", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "1 done already, 1 to segment" in printed and "b_seg.nii.gz" in printed
    assert (out / "a_seg.nii.gz").stat().st_mtime_ns == kept and nib.load(out / "b_seg.nii.gz").shape == (24, 20, 18)
    # asking for uncertainty now: no scan has its map, both are redone
    assert predict_list(model_path=model_path, input_list=listing, output_dir=out, uncertainty=True,
                        options={"device": "cpu"}) == 0
    assert (out / "a_seg_uncertainty.nii.gz").exists() and (out / "b_seg_uncertainty.nii.gz").exists()


def test_a_bad_scan_in_a_list_fails_alone(tmp_path, capsys):
    model_path = _model_file(tmp_path)
    _scan(tmp_path / "good.nii.gz")
    (tmp_path / "list.txt").write_text("missing.nii.gz\ngood.nii.gz\n")
    code = predict_list(model_path=model_path, input_list=tmp_path / "list.txt", output_dir=tmp_path / "out")
    assert code == 1 and "missing.nii.gz" in capsys.readouterr().err
    assert (tmp_path / "out" / "good_seg.nii.gz").exists() and not (tmp_path / "out" / "missing_seg.nii.gz").exists()


@pytest.mark.parametrize(("fmt", "overrides"), [
    ("torchscript", {}), ("onnx", {}),
    ("torchscript", {"model": "dynunet", "channels": "4,8,16", "strides": "2,2", "num-res-units": -1,
                     "deep-supervision": 1, "spatial-dims": 2})])
def test_export_round_trip_gives_predicts_mask(tmp_path, fmt, overrides):
    model_path, scan = _model_file(tmp_path, **overrides), _scan(tmp_path / "scan.nii.gz", affine=np.diag([0.8, 0.9, 2.0, 1]))
    result = export_model(model_path=model_path, out_dir=tmp_path / "export", fmt=fmt)
    assert result.mismatched_voxels == 0 and result.check_voxels > 0
    spec = json.loads((tmp_path / "export" / PREPROCESSING_FILE).read_text())
    assert spec["plan"]["patch_size"] == list(manual_plan(RunConfig.from_mapping(
        {**TINY_RUN_CONFIG, "patch-size": 16, "spatial-dims": 3, **overrides})).patch_size)
    if fmt == "torchscript":
        network = torch.jit.load(str(result.network))  # runs with torch alone
        assert network(torch.zeros(1, 1, *spec["sliding_window"]["roi_size"])).shape[1] == 2
    from_model = predict_scan(model_path=model_path, input_path=scan, output_path=tmp_path / "a.nii.gz",
                              precision="float32")  # autocast does not reach an export: compare like with like
    from_export = predict_scan(model_path=tmp_path / "export", input_path=scan, output_path=tmp_path / "b.nii.gz")
    assert from_model.voxels_per_class == from_export.voxels_per_class
    assert np.array_equal(nib.load(tmp_path / "a.nii.gz").get_fdata(), nib.load(tmp_path / "b.nii.gz").get_fdata())


def test_export_cli_and_an_incomplete_export_folder(tmp_path, capsys):
    model_path = _model_file(tmp_path)
    assert main(["export", "--model", str(model_path), "--out", str(tmp_path / "ex")]) == 0
    assert "same mask as predict" in capsys.readouterr().out
    (tmp_path / "ex" / PREPROCESSING_FILE).unlink()
    with pytest.raises(WeightsError, match=PREPROCESSING_FILE):
        load_exported(tmp_path / "ex")


def test_predict_engine_onnx_gives_the_torch_mask(tmp_path, capsys):
    model_path, scan = _model_file(tmp_path), _scan(tmp_path / "scan.nii.gz")
    for engine in ("torch", "onnx"):  # float32 on both: autocast (auto on a CPU with AMX) does not reach onnx
        assert main(["predict", "--model", str(model_path), "--input", str(scan), "--engine", engine,
                     "--precision", "float32", "--output", str(tmp_path / f"{engine}.nii.gz")]) == 0
    masks = [nib.load(tmp_path / f"{engine}.nii.gz").get_fdata() for engine in ("torch", "onnx")]
    assert (masks[0] != masks[1]).mean() <= 1e-4 and 0 < masks[0].mean() < 1
    printed = capsys.readouterr()
    assert "network: 100%" in printed.err and "normalisation, float32;" in printed.out  # progress; what ran


def test_class_indices_is_argmax_over_classes():
    from client.inference.whole_volume import class_indices

    values = torch.randn(3, 7, 6, 5)
    values[:, 0, 0, 0] = 1.0  # a tie goes to the lower class, as argmax
    assert torch.equal(class_indices(values), values.argmax(dim=0).to(torch.uint8))


def test_dicom_input_with_uncertainty_writes_a_parametric_map_beside_the_seg(tmp_path):
    import pydicom

    from tests.data_cases import ct_volume, write_dicom_case

    dicom = write_dicom_case(tmp_path, "case", *ct_volume(1))
    result = predict_scan(model_path=_model_file(tmp_path), input_path=tmp_path / dicom["image"], device="cpu",
                          output_path=tmp_path / "m.nii.gz", dicom_seg_path=tmp_path / "m.dcm", uncertainty=True)
    assert result.dicom_uncertainty == tmp_path / "m_uncertainty.dcm" and result.dicom_seg == tmp_path / "m.dcm"
    pm = pydicom.dcmread(result.dicom_uncertainty)
    series = sorted((pydicom.dcmread(f) for f in (tmp_path / dicom["image"]).iterdir()), key=lambda d: d.InstanceNumber)
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert pm.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    entropy = nib.load(result.uncertainty).get_fdata()  # [cols, rows, slices], a slice per source image
    slice_at = {tuple(round(float(v), 3) for v in d.ImagePositionPatient): k for k, d in enumerate(series)}
    assert pm.pixel_array.shape == entropy.T.shape and 0 < entropy.max() <= 1.0 + 1e-6
    for frame, group in zip(pm.pixel_array, pm.PerFrameFunctionalGroupsSequence):
        position = tuple(round(float(v), 3) for v in group.PlanePositionSequence[0].ImagePositionPatient)
        assert np.allclose(frame, entropy[:, :, slice_at[position]].T, atol=1e-6)  # each frame where its slice is


def test_precision_bfloat16_autocasts_on_cpu_keeps_the_mask_near_and_needs_the_torch_engine(tmp_path):
    from client.inference.predictor import Predictor
    from client.inference.whole_volume import inference_context
    from shared.errors import ConfigError

    with inference_context(torch.device("cpu"), "bfloat16"):
        assert torch.nn.Conv3d(1, 2, 3)(torch.zeros(1, 1, 4, 4, 4)).dtype == torch.bfloat16
    model_path, scan = _model_file(tmp_path), _scan(tmp_path / "scan.nii.gz")
    masks = []
    for precision in ("float32", "bfloat16"):
        predict_scan(model_path=model_path, input_path=scan, output_path=tmp_path / f"{precision}.nii.gz",
                     device="cpu", precision=precision)
        masks.append(nib.load(tmp_path / f"{precision}.nii.gz").get_fdata())
    assert (masks[0] != masks[1]).mean() <= 0.02 and 0 < masks[0].mean() < 1
    with pytest.raises(ConfigError, match="--precision"):
        Predictor.load(model_path=model_path, engine="onnx", precision="bfloat16")


@pytest.mark.parametrize("amx", [True, False])
def test_precision_auto_is_bfloat16_only_where_the_cpu_has_amx_and_autocast_reaches(tmp_path, monkeypatch, amx):
    import client.inference.whole_volume
    from client.inference.predictor import Predictor
    from client.inference.whole_volume import resolve_precision

    monkeypatch.setattr(client.inference.whole_volume, "_cpu_has_amx", lambda: amx)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bfloat16" if amx else "float32")
    assert resolve_precision("auto", torch.device("cuda")) == "float16"
    assert resolve_precision("auto", cpu, autocast_reaches=False) == "float32"
    assert resolve_precision("float32", cpu) == "float32" and resolve_precision("bfloat16", cpu) == "bfloat16"
    model_path, scan = _model_file(tmp_path), _scan(tmp_path / "scan.nii.gz")
    result = predict_scan(model_path=model_path, input_path=scan, output_path=tmp_path / "m.nii.gz", device="cpu")
    assert result.precision == ("bfloat16" if amx else "float32")
    assert Predictor.load(model_path=model_path, engine="onnx", device="cpu").precision == "float32"
