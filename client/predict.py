"""``python -m client predict``: segment a site's scan with a federated model.

Input: a NIfTI file or a folder holding one DICOM series. The scan goes
through the same preprocessing as training (client/transforms.py), the model
predicts (sliding window; a 2D model slice by slice), class probabilities are
resampled back to the input's own voxel grid and the mask is written as NIfTI
with the input's shape and affine; optionally also as DICOM SEG.
"""

from __future__ import annotations

import argparse
import gzip
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.dicom import dicom_modality
from client.transforms import PreprocessSettings, orienting, reading, resampling, settings_for
from shared.atomic import atomic_write
from shared.config import RunConfig, to_key
from shared.errors import ConfigError, DataError, WeightsError
from shared.plan import Plan, manual_plan

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` wrote: the mask's shape and voxels per class."""

    output: Path
    shape: tuple[int, ...]
    voxels_per_class: dict[int, int]
    modality: str
    dicom_seg: Path | None = None


def predict_scan(*, model_path: Path, input_path: Path | Sequence[Path], output_path: Path, device: str = "auto",
                 modality: str | None = None, dicom_seg_path: Path | None = None,
                 local_weights: Path | None = None) -> Prediction:
    """Segment ``input_path`` with the model in ``model_path``; write the mask to ``output_path``.

    ``input_path`` is one scan, or one scan per input channel (same grid);
    ``modality`` is one name or one per channel, comma-separated (``"T1,FLAIR"``);
    ``local_weights`` is this site's own norm weights of a ``local-norm`` run
    (``<state-dir>/local-weights/run-N.pt``), laid over the global model: the site's personal model.
    """
    import numpy as np

    from shared.model_file import load_model

    inputs = [Path(p) for p in ([input_path] if isinstance(input_path, (str, Path)) else input_path)]
    output_path = Path(output_path)
    if not str(output_path).endswith((".nii", ".nii.gz")):
        raise ConfigError(f"'--output': {output_path} must end in .nii or .nii.gz")
    for path in inputs:
        if not path.exists():
            raise DataError(f"{path}: input does not exist")
    model, payload = load_model(model_path)
    plan = plan_of_model(payload, model_path)
    if local_weights is not None:
        use_local_weights(model, local_weights, plan=plan)
    modalities = _modalities(modality, inputs[0], plan.in_channels)
    settings = settings_for(plan, modalities=modalities)
    raw, was_2d = _read(inputs)
    if raw.shape[0] != plan.in_channels:
        raise DataError(f"{inputs[0]}: scan has {raw.shape[0]} channel(s), the model expects {plan.in_channels}")
    mask = segment(model, raw, settings=settings, device=device).numpy().astype(np.uint8)
    mask_array = mask[..., 0] if was_2d else mask
    _write_nifti(output_path, mask_array, np.asarray(raw.affine, dtype=float))
    seg_path = None
    if dicom_seg_path is not None:
        from client.dicom_seg import write_dicom_seg

        seg_path = write_dicom_seg(inputs[0], mask, dicom_seg_path, num_classes=plan.num_classes)
    values, counts = np.unique(mask_array, return_counts=True)
    return Prediction(output=output_path, shape=mask_array.shape, modality=",".join(modalities), dicom_seg=seg_path,
                      voxels_per_class={int(v): int(n) for v, n in zip(values, counts)})


def segment(model: torch.nn.Module, raw: Any, *, settings: PreprocessSettings, device: str = "auto") -> torch.Tensor:
    """Class indices on ``raw``'s own voxel grid, for a scan as :func:`reading` returns it."""
    import torch

    from client.inference import predict_volume
    from shared.device import resolve_device

    image = _compose(orienting(settings, ("image",)) + resampling(settings, ("image",)))({"image": raw})["image"]
    torch_device = resolve_device(device)
    with torch.no_grad():
        logits = predict_volume(model.to(torch_device).eval(), image.as_tensor().to(torch_device),
                                spatial_dims=settings.spatial_dims, patch_size=settings.patch_size)
    return _to_input_grid(torch.softmax(logits[0].cpu(), dim=0), image.affine, raw)


def use_local_weights(model: torch.nn.Module, path: Path, *, plan: Plan) -> None:
    """Lay a site's own norm weights (run config ``local-norm``) from ``path`` over ``model``."""
    from client.local_state import restore_local_weights
    from shared.local_weights import norm_weight_names

    if not restore_local_weights(model, Path(path), names=norm_weight_names(plan.model_config()),
                                 model_config=plan.model_config()):
        raise ConfigError(f"'--local-weights': {path} does not exist")


def _modalities(modality: str | None, first_input: Path, channels: int) -> tuple[str, ...]:
    names = [m.strip() for m in modality.split(",")] if modality else [dicom_modality(first_input) or "MR"]
    if len(names) == 1:
        names = names * channels
    if len(names) != channels:
        raise ConfigError(f"'--modality': {len(names)} modalities given, the model has {channels} input channels")
    return tuple(names)


def plan_of_model(payload: dict[str, Any], model_path: Path) -> Plan:
    """The plan a model file was trained with: its ``plan``, or for a file written before plans existed,
    the manual plan of its run config (only the keys that shape preprocessing and the network matter)."""
    if isinstance(payload.get("plan"), dict):
        return Plan.from_dict(payload["plan"], source=str(model_path))
    if not isinstance(payload.get("run_config"), dict):
        raise WeightsError(f"{model_path}: model file carries no plan (needed for spacing and patch size)")
    known = {to_key(f.name) for f in fields(RunConfig)}
    saved = {k: v for k, v in payload["run_config"].items() if k in known and k not in ("model", "preset")}
    name = payload.get("model_config", {}).get("name", "unet")
    return manual_plan(RunConfig.from_mapping({**saved, "model": name, "plan": "manual", "dp": False}))


def _read(inputs: list[Path]) -> tuple[Any, bool]:
    from client.loading import preprocess_case

    source: str | list[str] = str(inputs[0]) if len(inputs) == 1 else [str(p) for p in inputs]
    loaded = preprocess_case({"image": source}, _compose(reading(("image",))))
    image = loaded["image"]
    was_2d = len(image.meta.get("spatial_shape", image.shape[1:])) == 2
    return image, was_2d


def _to_input_grid(probabilities: Any, affine: Any, raw: Any) -> Any:
    """Resample class probabilities onto the input's voxel grid, then take the most likely class."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    if isinstance(probabilities, MetaTensor):
        probabilities = probabilities.as_tensor()
    probs = MetaTensor(probabilities, affine=affine)
    resampled = ResampleToMatch(mode="bilinear", padding_mode="border")(probs, img_dst=raw)
    return resampled.as_tensor().argmax(dim=0)


def _write_nifti(path: Path, mask: Any, affine: Any) -> None:
    import nibabel as nib

    image = nib.Nifti1Image(mask, affine)
    image.header.set_data_dtype("uint8")
    payload = image.to_bytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload)
    atomic_write(path, lambda handle: handle.write(payload))


def _compose(steps: list) -> Any:
    from monai.transforms import Compose

    return Compose(steps)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="global_model.pt written by a run")
    parser.add_argument("--input", type=Path, required=True, nargs="+", metavar="PATH",
                        help="a NIfTI file or a folder with one DICOM series (one per channel for "
                             "multi-modal models, same grid)")
    parser.add_argument("--output", type=Path, required=True, help="mask to write (.nii.gz)")
    parser.add_argument("--dicom-seg", type=Path, help="also write the mask as DICOM SEG here (DICOM input only)")
    parser.add_argument("--modality", help="CT (HU window) or another name (z-score), one or one per channel, "
                                           "comma-separated (default: the DICOM Modality tag, else MR)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--local-weights", type=Path,
                        help="this site's own norm weights of a local-norm run (<state-dir>/local-weights/run-N.pt)")


def run(args: argparse.Namespace) -> int:
    result = predict_scan(model_path=args.model, input_path=args.input, output_path=args.output,
                          device=args.device, modality=args.modality, dicom_seg_path=args.dicom_seg,
                          local_weights=args.local_weights)
    counts = ", ".join(f"class {k}: {v}" for k, v in result.voxels_per_class.items())
    print(f"wrote {result.output} (shape {'x'.join(map(str, result.shape))}, {result.modality} normalisation; "
          f"{counts})")
    if result.dicom_seg:
        print(f"wrote {result.dicom_seg} (DICOM SEG)")
    return 0
