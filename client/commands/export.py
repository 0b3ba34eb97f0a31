"""``python -m client export``: the model as TorchScript or ONNX, runnable without fedseg, its preprocessing as JSON.

The export folder holds the network (``model.torchscript.pt``, traced by
``torch.jit.trace``, which ``torch.jit.load`` runs with torch alone; or
``model.onnx``, which onnxruntime runs) and ``preprocessing.json`` (the plan:
orientation, spacing, intensity normalisation, patch size, and the
sliding-window settings ``predict`` uses). Before the JSON is written, the
exported network segments a test volume through ``predict``'s pipeline and must
give the mask the model file gives (ONNX: up to :data:`MAX_MISMATCH` of voxels
may differ, where float rounding tips a near-tie between classes); a folder
without the JSON is not an export. ``predict --model FOLDER`` runs it.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.inference.model_files import (
    EXPORT_FORMAT,
    PREPROCESSING_FILE,
    load_network_file,
    onnx_bytes,
    plan_of_model,
)
from shared.atomic import atomic_write, atomic_write_json
from shared.errors import ConfigError, WeightsError
from shared.plan import Plan

if TYPE_CHECKING:
    import torch

NETWORK_FILES = {"torchscript": "model.torchscript.pt", "onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
#: Share of the check volume's voxels an export's mask may differ in (0 for TorchScript, which computes alike;
#: int8 rounds every activation, so voxels near a tie between classes flip: its cost is the Dice change reported).
MAX_MISMATCH = {"torchscript": 0.0, "onnx": 1e-4, "onnx-int8": 0.02}


@dataclass(frozen=True)
class ExportResult:
    """What ``export`` wrote and how its check went."""

    folder: Path
    network: Path
    check_input: str
    check_voxels: int
    mismatched_voxels: int
    quantization: Any = None


def export_model(*, model_path: Path, out_dir: Path, fmt: str = "torchscript", check_input: Path | None = None,
                 modality: str | None = None, quantize: bool = False, datalist: Path | None = None) -> ExportResult:
    """Export the model file ``model_path`` into ``out_dir`` and check it against ``predict``.

    ``check_input`` is the scan both segment (default: a synthetic volume at the plan's spacing).
    With ``quantize`` (ONNX only) the network is int8, calibrated on the training cases of the site's
    ``datalist`` and compared with the float model on its validation cases (:mod:`client.inference.quantize`).
    Raises :class:`WeightsError` if the masks differ (no ``preprocessing.json`` is written then).
    """

    from shared.model_file import load_model

    if fmt not in ("torchscript", "onnx"):
        raise ConfigError(f"'--format': {fmt!r} is not available; choose torchscript or onnx")
    if quantize and (fmt != "onnx" or datalist is None):
        raise ConfigError("'--quantize': needs '--format onnx' and '--datalist' (the site's cases: training ones "
                          "calibrate, validation ones measure the Dice change)")
    model, payload = load_model(model_path)
    plan = plan_of_model(payload, model_path)
    fmt, out_dir = "onnx-int8" if quantize else fmt, Path(out_dir)
    report = None
    if quantize:
        network_path, report, site_case = _write_quantized(model.eval(), plan, out_dir / NETWORK_FILES[fmt],
                                                           Path(datalist))
        if check_input is None:  # a site case: int8 is calibrated to the site's intensities, not to a noise volume
            check_input, modality = site_case
    else:
        network_path = _write_network(model.eval(), plan, out_dir / NETWORK_FILES[fmt], fmt=fmt)
    checked, total, mismatched = _check(model, load_network_file(network_path), plan, check_input, modality)
    if mismatched > MAX_MISMATCH[fmt] * total:
        raise WeightsError(f"{network_path}: the exported network's mask differs from predict's on {checked} "
                           f"in {mismatched} of {total} voxels; {PREPROCESSING_FILE} not written")
    spec = preprocessing_spec(plan, network=network_path.name, sha256=str(payload.get("sha256", "")))
    atomic_write_json(out_dir / PREPROCESSING_FILE, {**spec, **({"quantization": report.to_dict()} if report else {})})
    return ExportResult(folder=out_dir, network=network_path, check_input=checked, check_voxels=total,
                        mismatched_voxels=mismatched, quantization=report)


def _write_quantized(model: torch.nn.Module, plan: Plan, path: Path,
                     datalist_path: Path) -> tuple[Path, Any, tuple[Any, str]]:
    """The int8 network at ``path``, calibrated and compared on the site's datalist (:mod:`client.inference.quantize`);
    the report, and the first validation case's image and modalities (the check's default input)."""
    from client.data.datalist import load_datalist
    from client.inference.onnx_engine import OnnxNetwork
    from client.inference.quantize import (
        calibration_patches,
        compare_on_cases,
        preprocessed_cases,
        quantize_network,
    )

    datalist = load_datalist(datalist_path)
    training = preprocessed_cases(datalist.training, plan=plan, modalities=datalist.modalities)
    patches = calibration_patches(training, plan=plan)
    quantize_network(onnx_model=onnx_bytes(model, plan), patches=patches, out_path=path)
    validation = preprocessed_cases(datalist.validation, plan=plan, modalities=datalist.modalities)
    report = compare_on_cases(model=model, quantized=OnnxNetwork(path), plan=plan, cases=validation,
                              calibration=(min(len(training), len(patches)), len(patches)))
    image = datalist.validation[0]["image"]
    return path, report, ([Path(p) for p in image] if isinstance(image, list) else Path(image),
                          ",".join(datalist.modalities))


def _write_network(model: torch.nn.Module, plan: Plan, path: Path, *, fmt: str) -> Path:
    """Trace ``model`` on one patch and write it atomically (ONNX: the batch axis left free)."""
    import torch

    example = torch.zeros(1, plan.in_channels, *plan.patch_size)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer warns of shape checks (channel counts) it fixes as constants: they are constant
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            return atomic_write(path, lambda handle: torch.jit.save(traced, handle))
    payload = onnx_bytes(model, plan)
    return atomic_write(path, lambda handle: handle.write(payload))


def preprocessing_spec(plan: Plan, *, network: str, sha256: str) -> dict[str, Any]:
    """What a program without fedseg must do to a scan before and after the network (``preprocessing.json``)."""
    from client.inference.whole_volume import OVERLAP

    return {
        "format": EXPORT_FORMAT, "network": network, "source_model_sha256": sha256, "plan": plan.to_dict(),
        "steps": [
            "read the scan channel-first [C, X, Y, Z] (a 2D image: Z = 1); one file per input channel",
            ("reorient to RAS (MONAI Orientation axcodes='RAS'); a 2D plan with slicing 'lowest-resolution' then "
             "turns the case's coarsest axis last"),
            "resample to plan.target_spacing (bilinear; a 2D plan keeps the slice spacing)",
            ("normalise each channel as plan.normalization says ('ct': clip to [low, high], subtract mean, divide "
             "by std; 'zscore': per-case mean and std); empty: CT channels clip to plan.ct_window and scale, "
             "others z-score"),
            "pad to at least plan.patch_size (centred, zeros)",
        ],
        "sliding_window": {"roi_size": list(plan.patch_size), "overlap": OVERLAP, "mode": "gaussian",
                           "spatial_dims": plan.spatial_dims,
                           "note": "a 2D network runs over each slice along the last axis"},
        "input": f"float32 [B, {plan.in_channels}, *roi_size] (ONNX input 'image', output 'logits')",
        "output": f"logits [B, {plan.num_classes}, *roi_size]; the mask is the argmax over classes, mapped back "
                  f"onto the scan's own grid",
    }


def _check(model: Any, exported: Any, plan: Plan, check_input: Path | list[Path] | None,
           modality: str | None) -> tuple[str, int, int]:
    """(input used, voxels, voxels whose class differs) between the model file and the exported network."""
    import numpy as np

    from client.inference.predictor import Predictor

    with tempfile.TemporaryDirectory(prefix="fedseg-export-") as tmp:
        folder = Path(tmp)
        if check_input is None:
            check_input, modality = _test_volume(plan, folder / "check.nii.gz"), modality or _modality_of(plan)
        masks, inputs = [], check_input if isinstance(check_input, list) else [check_input]
        for name, network in (("model", model), ("exported", exported)):
            out = folder / f"{name}.nii.gz"
            predictor = Predictor(network=network, plan=plan, device="cpu", precision="float32")
            predictor.predict(inputs=inputs, output=out, modality=modality)
            masks.append(np.asarray(_read_mask(out)))
    return str(check_input), int(masks[0].size), int((masks[0] != masks[1]).sum())


def _read_mask(path: Path) -> Any:
    import nibabel as nib

    return nib.load(path).get_fdata()


def _modality_of(plan: Plan) -> str:
    return "CT" if plan.normalization and plan.normalization[0].scheme == "ct" else "MR"


def _test_volume(plan: Plan, path: Path) -> Path:
    """A noise volume with a brighter box, 1.5 patches wide (2D: 3 slices), at the plan's spacing."""
    import nibabel as nib
    import numpy as np

    shape = [int(p * 1.5) for p in plan.patch_size] + ([3] if plan.spatial_dims == 2 else [])
    spacing = list(plan.target_spacing) + ([1.0] if plan.spatial_dims == 2 else [])
    rng = np.random.default_rng(0)
    volume = rng.normal(0.0, 100.0, size=(*shape, plan.in_channels)).astype(np.float32)
    volume[tuple(slice(s // 4, s // 2) for s in shape)] += 300.0
    array = volume[..., 0] if plan.in_channels == 1 else volume
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="global_model.pt written by a run")
    parser.add_argument("--format", default="torchscript", choices=("onnx", "torchscript"),
                        help="torchscript (runs with torch alone) or onnx (onnxruntime; which is faster depends on "
                             "the network and the machine: BENCHMARKS.md)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write the export into")
    parser.add_argument("--check-input", type=Path, help="a scan both must segment alike (default: a synthetic one; with --quantize the "
                             "datalist's first validation case)")
    parser.add_argument("--modality", help="the check scan's modality (as for predict)")
    parser.add_argument("--quantize", action="store_true",
                        help="int8 for CPU inference (with --format onnx): calibrated on the training cases of "
                             "--datalist, the Dice change on its validation cases reported")
    parser.add_argument("--datalist", type=Path, help="the site's datalist (with --quantize)")


def run(args: argparse.Namespace) -> int:
    result = export_model(model_path=args.model, out_dir=args.out, fmt=args.format, check_input=args.check_input,
                          modality=args.modality, quantize=args.quantize, datalist=args.datalist)
    agreement = "same mask as predict" if result.mismatched_voxels == 0 else "mask checked against predict's"
    print(f"wrote {result.network} and {result.folder / PREPROCESSING_FILE}: {agreement} on "
          f"{result.check_input} ({result.check_voxels} voxels, {result.mismatched_voxels} differ)")
    if result.quantization is not None:
        print(result.quantization.describe())
    return 0
