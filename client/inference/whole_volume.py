"""Whole-volume inference: sliding window for a 3D model, slice by slice for a 2D model.

Training's evaluation and ``client predict`` both call :func:`predict_volume`.
``predict`` adds test-time flips (:func:`flip_probabilities`), whose spread is
its uncertainty map, and a progress callback for long volumes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SLICES_PER_BATCH = 16
#: Patches per forward pass. For the planned DynUNet's 48x56x20 patches 8 took 1.12x the CPU work of 4 over a
#: volume (``benchmarks.inference_cpu_probe``; a quiet machine's network stage 70.9 s against 60.6 s), the small
#: U-Net alike; a GPU may want more.
SW_BATCH_SIZE = 4
#: ``--precision``: ``auto`` is float16 autocast on CUDA, bfloat16 autocast on a CPU with AMX tile units and
#: float32 on other CPUs (:func:`resolve_precision`); ``float32`` and ``bfloat16`` force one. With AMX the
#: planned DynUNet ran 2.9x faster in bfloat16 with 99.999 % of the mask's voxels the same (BENCHMARKS.md,
#: inference); without it bfloat16 is emulated and not faster.
PRECISIONS = ("auto", "float32", "bfloat16")
#: MONAI's default overlap of neighbouring windows (Gaussian-weighted where they overlap).
OVERLAP = 0.25

#: Called with (windows done, windows in all) after every batch of windows.
Progress = Callable[[int, int], None]


def predict_volume(model: torch.nn.Module, volume: torch.Tensor, *, spatial_dims: int, patch_size: Sequence[int],
                   sw_batch_size: int = SW_BATCH_SIZE, overlap: float = OVERLAP,
                   progress: Progress | None = None) -> torch.Tensor:
    """Return logits ``[1, K, X, Y, Z]`` for a preprocessed volume ``[C, X, Y, Z]``.

    A 3D model runs MONAI's sliding-window inference over the volume; a 2D
    model runs it over each axial slice and the slices are stacked back.
    """
    import torch
    from monai.inferers import sliding_window_inference

    if volume.ndim != 4:
        raise ValueError(f"volume must be [C, X, Y, Z], got shape {tuple(volume.shape)}")
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if len(patch_size) != spatial_dims:
        raise ValueError(f"patch_size needs {spatial_dims} entries, got {tuple(patch_size)}")
    counter = _WindowCounter(progress, total=_window_count(volume, spatial_dims, patch_size, overlap))

    def run(batch: torch.Tensor) -> torch.Tensor:
        return sliding_window_inference(batch, roi_size=tuple(patch_size), sw_batch_size=sw_batch_size,
                                        predictor=model, overlap=overlap, mode="gaussian",
                                        process_fn=counter if progress else None)

    if spatial_dims == 3:
        return run(volume.unsqueeze(0))
    slices = volume.permute(3, 0, 1, 2)  # [Z, C, X, Y]: slices as a batch
    logits = torch.cat([run(slices[start:start + SLICES_PER_BATCH])
                        for start in range(0, slices.shape[0], SLICES_PER_BATCH)])
    return logits.permute(1, 2, 3, 0).unsqueeze(0)


def flip_probabilities(model: torch.nn.Module, volume: torch.Tensor, *, spatial_dims: int,
                       patch_size: Sequence[int], flips: bool, sw_batch_size: int = SW_BATCH_SIZE,
                       overlap: float = OVERLAP, progress: Progress | None = None) -> torch.Tensor:
    """Class probabilities ``[K, X, Y, Z]``: softmax of :func:`predict_volume`, or with ``flips`` their mean
    over the volume as it is and mirrored along each axis the model convolves over (nnU-Net's test-time
    mirroring, one flip per axis: 1 + ``spatial_dims`` passes).

    MONAI's ``TestTimeAugmentation`` draws random invertible transforms through a data loader; fixed
    mirrorings of a tensor are a ``torch.flip`` each way, so they are done here directly.
    """
    import torch

    axes: list[tuple[int, ...]] = [()] + ([(axis,) for axis in range(1, spatial_dims + 1)] if flips else [])
    total = torch.zeros(())
    for done, axis in enumerate(axes):
        step = None if progress is None else _pass_progress(progress, done, len(axes))
        logits = predict_volume(model, torch.flip(volume, axis) if axis else volume, spatial_dims=spatial_dims,
                                patch_size=patch_size, sw_batch_size=sw_batch_size, overlap=overlap, progress=step)
        probabilities = torch.softmax(logits[0].float(), dim=0)
        total = total + (torch.flip(probabilities, axis) if axis else probabilities)
    return total / len(axes)


def class_indices(values: torch.Tensor) -> torch.Tensor:
    """The most likely class per voxel of ``values`` ``[K, ...]`` (logits or probabilities) as uint8; ties go to the
    lower class, as ``argmax``.

    ``values.argmax(dim=0)`` reduces across the outermost, strided axis: on a 512x512x200 CT with 2 classes it
    took 10.8 s where these K - 1 elementwise passes take a fraction of that (a probe; BENCHMARKS.md, inference).
    """
    import torch

    best, index = values[0].clone(), torch.zeros(values.shape[1:], dtype=torch.uint8, device=values.device)
    for k in range(1, values.shape[0]):
        better = values[k] > best
        index.masked_fill_(better, k)
        best = torch.maximum(best, values[k])
    return index


def normalised_entropy(probabilities: torch.Tensor) -> torch.Tensor:
    """Voxel-wise entropy of class probabilities ``[K, ...]`` divided by ``log K``: 0 certain, 1 all classes equal."""
    import math

    import torch

    return torch.special.entr(probabilities).sum(dim=0) / math.log(probabilities.shape[0])


def resolve_precision(precision: str, device: torch.device, *, autocast_reaches: bool = True) -> str:
    """What ``precision`` (:data:`PRECISIONS`) means on ``device``: ``float32``, ``bfloat16`` or ``float16``.

    ``auto`` is float16 on CUDA (mixed precision), bfloat16 on a CPU with AMX tile units, float32 elsewhere and
    wherever autocast does not reach the network (``autocast_reaches`` false: an ONNX or TorchScript one).
    A resolved value (``float16`` included) is returned as it is.
    """
    import torch

    if precision not in (*PRECISIONS, "float16"):
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if not autocast_reaches:
        return "float32"
    if device.type == "cuda":
        return "float16"
    return "bfloat16" if device.type == "cpu" and _cpu_has_amx() else "float32"


def _cpu_has_amx() -> bool:
    import torch

    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3 has it; older ones say no
    return bool(probe is not None and probe())


@contextlib.contextmanager
def inference_context(device: torch.device, precision: str = "auto") -> Iterator[None]:
    """No autograd, and autocast to what ``precision`` resolves to on ``device`` (:func:`resolve_precision`)."""
    import torch

    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(resolve_precision(precision, device))
    with torch.inference_mode():
        if dtype is not None:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield
        else:
            yield


def inplace_activations(network: torch.nn.Module) -> torch.nn.Module:
    """Let a MONAI ``DynUNet``'s or ``UNet``'s (Leaky)ReLUs overwrite their input, for inference only.

    fedseg builds them out of place for Opacus; in these networks every activation's input is a norm's fresh
    output that nothing else reads, so the values are the same and a tensor per layer is not allocated (in
    ``benchmarks.inference_cpu_probe`` the time gained was within its noise). Other networks are left alone.
    """
    import torch
    from monai.networks.nets import DynUNet, UNet

    if isinstance(network, (DynUNet, UNet)):
        for module in network.modules():
            if isinstance(module, (torch.nn.ReLU, torch.nn.LeakyReLU)):
                module.inplace = True
    return network


def _window_count(volume: torch.Tensor, spatial_dims: int, patch_size: Sequence[int], overlap: float) -> int:
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval  # the windows MONAI will run, counted the same way

    spatial = tuple(max(s, p) for s, p in zip(volume.shape[1:1 + spatial_dims], patch_size))
    scan = _get_scan_interval(spatial, tuple(patch_size), spatial_dims, (overlap,) * spatial_dims)
    windows = len(dense_patch_slices(spatial, tuple(patch_size), scan))
    return windows if spatial_dims == 3 else windows * volume.shape[3]


def _pass_progress(progress: Progress, done_passes: int, passes: int) -> Progress:
    return lambda done, total: progress(done_passes * total + done, passes * total)


class _WindowCounter:
    """MONAI's ``process_fn`` hook: counts windows as they pass and reports them; the outputs pass unchanged."""

    def __init__(self, progress: Progress | None, *, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, outputs: tuple[torch.Tensor, ...], window: torch.Tensor,
                 importance_map: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        self.done += int(window.shape[0])
        if self.progress is not None:
            self.progress(min(self.done, self.total), self.total)
        return outputs, importance_map
