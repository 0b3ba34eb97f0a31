"""The work behind ``client predict``: one model load, then scan after scan, timed stage by stage.

A scan goes through the same preprocessing as training (client/data/transforms.py),
the network predicts (sliding window; a 2D model slice by slice), the result is
brought back to the input's own voxel grid (taken voxel by voxel when the scan
was only reoriented, else class probabilities are resampled bilinearly) and
the mask is written as NIfTI with the input's shape and affine. With
``uncertainty`` the prediction is the mean over test-time flips and their
normalised entropy is written beside the mask.
"""

from __future__ import annotations

import contextlib
import gzip
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.data.dicom import dicom_modality
from client.data.transforms import orienting, reading, resampling, settings_for
from client.inference.whole_volume import OVERLAP, PRECISIONS, SW_BATCH_SIZE, Progress
from shared.atomic import atomic_write
from shared.errors import ConfigError, DataError
from shared.plan import Plan

if TYPE_CHECKING:
    import torch

#: Stages of one prediction, in order (``Prediction.seconds`` keys).
STAGES = ("read", "preprocess", "network", "resample back", "write")
#: gzip level of written NIfTI files: level 9 (``gzip.compress``'s default) took 17 s on a noisy 6.5 M-voxel
#: mask where 1 took 0.06 s (a probe); smooth masks compress about as well at either.
GZIP_LEVEL = 1


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` wrote: the mask's shape, voxels per class and seconds per stage (:data:`STAGES`)."""

    output: Path
    shape: tuple[int, ...]
    voxels_per_class: dict[int, int]
    modality: str
    dicom_seg: Path | None = None
    uncertainty: Path | None = None
    dicom_uncertainty: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    #: What the network computed in (``--precision`` resolved: :func:`client.inference.whole_volume.resolve_precision`).
    precision: str = "float32"


def describe(result: Prediction) -> str:
    """The lines ``client predict`` prints for one written mask."""
    counts = ", ".join(f"class {k}: {v}" for k, v in result.voxels_per_class.items())
    stages = ", ".join(f"{name} {seconds:.1f}" for name, seconds in result.seconds.items())
    lines = [(f"wrote {result.output} (shape {'x'.join(map(str, result.shape))}, {result.modality} normalisation, "
              f"{result.precision}; {counts}; seconds: {stages})")]
    lines += [f"wrote {result.uncertainty} (uncertainty)"] if result.uncertainty else []
    lines += [f"wrote {result.dicom_seg} (DICOM SEG)"] if result.dicom_seg else []
    lines += [f"wrote {result.dicom_uncertainty} (uncertainty, DICOM parametric map)"] if result.dicom_uncertainty else []
    return "\n".join(lines)


def uncertainty_path(mask_path: Path) -> Path:
    """Where the uncertainty map of ``mask_path`` goes: ``NAME_uncertainty.nii.gz`` beside ``NAME.nii.gz``."""
    name = mask_path.name
    stem, suffix = (name[:-7], ".nii.gz") if name.endswith(".nii.gz") else (mask_path.stem, mask_path.suffix)
    return mask_path.with_name(f"{stem}_uncertainty{suffix}")


class Predictor:
    """A loaded model (a fedseg model file or an exported one, :mod:`client.commands.export`) that segments scans."""

    def __init__(self, *, network: torch.nn.Module, plan: Plan, device: str = "auto", overlap: float = OVERLAP,
                 sw_batch_size: int = SW_BATCH_SIZE, precision: str = "auto", progress: Progress | None = None) -> None:
        from client.inference.whole_volume import inplace_activations, resolve_precision
        from shared.device import resolve_device

        if not 0.0 <= overlap < 1.0:
            raise ConfigError(f"'--overlap': must be in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ConfigError(f"'--sw-batch-size': must be at least 1, got {sw_batch_size}")
        if precision not in PRECISIONS:
            raise ConfigError(f"'--precision': expected one of {PRECISIONS}, got {precision!r}")
        if precision == "bfloat16" and not _plain_torch(network):
            raise ConfigError("'--precision bfloat16': needs the torch engine and a fedseg model file (autocast does "
                              "not reach an ONNX or TorchScript network)")
        self.device, self.plan = resolve_device(device), plan
        self.network = inplace_activations(network.to(self.device).eval())
        #: What this predictor computes in: ``float32``, ``bfloat16`` or ``float16`` (``auto`` resolved).
        self.precision = resolve_precision(precision, self.device, autocast_reaches=_plain_torch(network))
        self.overlap, self.sw_batch_size, self.progress = overlap, sw_batch_size, progress

    @classmethod
    def load(cls, *, model_path: Path, engine: str = "torch", local_weights: Path | None = None,
             **options: Any) -> Predictor:
        """Load ``model_path`` (a fedseg model file or an export folder) once, to run on ``engine``
        (:func:`client.inference.model_files.load_network`), with a site's ``local_weights`` laid over it;
        ``options`` as for the class."""
        from client.inference.model_files import load_network

        network, plan = load_network(Path(model_path), engine=engine, local_weights=local_weights)
        return cls(network=network, plan=plan, **options)

    def predict(self, *, inputs: Sequence[Path], output: Path, modality: str | None = None,
                uncertainty: bool = False, dicom_seg_path: Path | None = None) -> Prediction:
        """Segment the scan ``inputs`` (one file or DICOM folder per channel) into ``output``."""
        import numpy as np

        inputs, output = [Path(p) for p in inputs], Path(output)
        _check_paths(inputs, output)
        seconds: dict[str, float] = {}
        with timed_stage(seconds, "read"):
            raw, was_2d = read_scan(inputs)
        if raw.shape[0] != self.plan.in_channels:
            raise DataError(f"{inputs[0]}: scan has {raw.shape[0]} channel(s), the model expects {self.plan.in_channels}")
        modalities = _modalities(modality, inputs[0], self.plan.in_channels)
        with timed_stage(seconds, "preprocess"):
            settings = settings_for(self.plan, modalities=modalities)
            image = _compose(orienting(settings, ("image",)) + resampling(settings, ("image",)))({"image": raw})["image"]
        mask, entropy = self._segment(image, raw, seconds=seconds, uncertainty=uncertainty)
        affine = np.asarray(raw.affine, dtype=float)
        with timed_stage(seconds, "write"):
            unc_path = None
            if entropy is not None:  # written before the mask: a mask on disk means the scan is done
                unc_path = write_nifti(uncertainty_path(output), entropy[..., 0] if was_2d else entropy, affine)
            mask_array = mask[..., 0] if was_2d else mask
            write_nifti(output, mask_array, affine)
            seg_path = dicom_unc = None
            if dicom_seg_path is not None:
                from client.inference.dicom_output import write_dicom_seg, write_dicom_uncertainty

                if entropy is not None:  # the uncertainty as a DICOM parametric map beside the SEG
                    dicom_unc = write_dicom_uncertainty(inputs[0], entropy, uncertainty_path(Path(dicom_seg_path)))
                seg_path = write_dicom_seg(inputs[0], mask, dicom_seg_path, num_classes=self.plan.num_classes)
        values, counts = np.unique(mask_array, return_counts=True)
        return Prediction(output=output, shape=mask_array.shape, modality=",".join(modalities), dicom_seg=seg_path,
                          uncertainty=unc_path, dicom_uncertainty=dicom_unc, seconds=seconds,
                          precision=self.precision, voxels_per_class={int(v): int(n) for v, n in zip(values, counts)})

    def _segment(self, image: Any, raw: Any, *, seconds: dict[str, float],
                 uncertainty: bool) -> tuple[Any, Any | None]:
        """(mask uint8, normalised entropy float32 or None) as numpy arrays on ``raw``'s grid."""
        import numpy as np
        import torch

        from client.inference.scan_grid import exact_view, resample_to_match
        from client.inference.whole_volume import (
            class_indices,
            flip_probabilities,
            inference_context,
            normalised_entropy,
            predict_volume,
        )

        plan = self.plan
        with timed_stage(seconds, "network"), inference_context(self.device, self.precision):
            volume = image.as_tensor().to(self.device)
            window = {"spatial_dims": plan.spatial_dims, "patch_size": plan.patch_size, "overlap": self.overlap,
                      "sw_batch_size": self.sw_batch_size, "progress": self.progress}
            if uncertainty:
                values = flip_probabilities(self.network, volume, flips=True, **window).cpu()
            else:  # logits: their argmax is the probabilities' argmax
                values = predict_volume(self.network, volume, **window)[0].float().cpu()
        with timed_stage(seconds, "resample back"), torch.inference_mode():
            view = exact_view(image.affine, raw.affine, tuple(image.shape[1:]), tuple(raw.shape[1:]))
            if view is None:
                values = resample_to_match(values if uncertainty else torch.softmax(values, dim=0), image.affine, raw)
                view = _identity
            mask = view(class_indices(values)).numpy()
            entropy = view(normalised_entropy(values)).numpy().astype(np.float32) if uncertainty else None
        return mask, entropy


def _plain_torch(network: Any) -> bool:
    import torch

    from client.inference.onnx_engine import OnnxNetwork

    return not isinstance(network, (torch.jit.ScriptModule, OnnxNetwork))


def _identity(tensor: Any) -> Any:
    return tensor


def read_scan(inputs: Sequence[Path]) -> tuple[Any, bool]:
    """The scan as :func:`client.data.transforms.reading` gives it (channel-first, own geometry); True if 2D."""
    from client.data.loading import preprocess_case

    source: str | list[str] = str(inputs[0]) if len(inputs) == 1 else [str(p) for p in inputs]
    image = preprocess_case({"image": source}, _compose(reading(("image",))))["image"]
    return image, len(image.meta.get("spatial_shape", image.shape[1:])) == 2


def write_nifti(path: Path, array: Any, affine: Any) -> Path:
    """Write ``array`` as NIfTI (gzip-compressed for ``.gz``) atomically: a reader sees all of it or nothing."""
    import nibabel as nib

    image = nib.Nifti1Image(array, affine)
    image.header.set_data_dtype(array.dtype)
    payload = image.to_bytes()
    if str(path).endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=GZIP_LEVEL)
    return atomic_write(path, lambda handle: handle.write(payload))


def _check_paths(inputs: list[Path], output: Path) -> None:
    if not str(output).endswith((".nii", ".nii.gz")):
        raise ConfigError(f"'--output': {output} must end in .nii or .nii.gz")
    for path in inputs:
        if not path.exists():
            raise DataError(f"{path}: input does not exist")


def _modalities(modality: str | None, first_input: Path, channels: int) -> tuple[str, ...]:
    names = [m.strip() for m in modality.split(",")] if modality else [dicom_modality(first_input) or "MR"]
    if len(names) == 1:
        names = names * channels
    if len(names) != channels:
        raise ConfigError(f"'--modality': {len(names)} modalities given, the model has {channels} input channels")
    return tuple(names)


@contextlib.contextmanager
def timed_stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds the ``with`` block takes to ``seconds[name]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started


def _compose(steps: list) -> Any:
    from monai.transforms import Compose

    return Compose(steps)

