"""``client export --format onnx --quantize``: the ONNX network in int8 for CPU inference, and what it costs in Dice.

onnxruntime's static quantisation (``onnxruntime.quantization.quantize_static``, QDQ format, int8 weights per
output channel and int8 activations) calibrates the activations' ranges (min/max) on patches of the site's own
training cases, preprocessed as ``predict`` does. Torch's eager quantisation would need DynUNet's and UNet's
``torch.cat`` and instance norms rewritten; onnxruntime quantises the exported graph as it is. Then the float
network (torch) and the int8 one (onnxruntime) segment the site's validation cases side by side: the Dice change
and the speed ratio of their network stages are what ``export`` reports.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.atomic import atomic_write
from shared.errors import DataError
from shared.plan import Plan

if TYPE_CHECKING:
    import numpy as np
    import torch

#: Random patches per training case used to calibrate, and cases used at most (calibration takes seconds).
CALIBRATION_PATCHES_PER_CASE = 4
MAX_CALIBRATION_CASES = 16
#: Largest Dice drop (float minus int8, mean over validation cases and foreground classes) the issue accepts.
DICE_DROP_TARGET = 0.005


@dataclass(frozen=True)
class QuantizationReport:
    """Calibration used, and float against int8 on the validation cases (Dice; network-stage seconds)."""

    calibration_cases: int
    calibration_patches: int
    validation_cases: int
    dice_float: float
    dice_int8: float
    seconds_float: float
    seconds_int8: float

    @property
    def dice_change(self) -> float:
        return self.dice_int8 - self.dice_float

    @property
    def speed_ratio(self) -> float:
        """How many times faster the int8 network ran than the float one (> 1: faster)."""
        return self.seconds_float / max(self.seconds_int8, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "dice_change": self.dice_change, "speed_ratio": self.speed_ratio,
                "dice_drop_target": DICE_DROP_TARGET, "method": "onnxruntime quantize_static, QDQ, int8, MinMax"}

    def describe(self) -> str:
        verdict = "within" if -self.dice_change <= DICE_DROP_TARGET else "ABOVE"
        return (f"int8: Dice {self.dice_int8:.4f} vs float {self.dice_float:.4f} on {self.validation_cases} "
                f"validation case(s) (change {self.dice_change:+.4f}, {verdict} the {DICE_DROP_TARGET} target); "
                f"network {self.seconds_int8:.1f} s vs {self.seconds_float:.1f} s in torch "
                f"({self.speed_ratio:.2f}x); calibrated on {self.calibration_patches} patches of "
                f"{self.calibration_cases} training case(s)")


def quantize_network(*, onnx_model: bytes, patches: Sequence[np.ndarray], out_path: Path) -> Path:
    """Write ``onnx_model`` statically quantised to int8 (calibrated on ``patches``, each ``[C, *patch]``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Patches(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining = iter(patches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            patch = next(self.remaining, None)
            return None if patch is None else {"image": patch[None]}

    with tempfile.TemporaryDirectory(prefix="fedseg-quantize-") as tmp:
        float_path, int8_path = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        float_path.write_bytes(onnx_model)
        quantize_static(float_path, int8_path, Patches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        payload = int8_path.read_bytes()
    return atomic_write(out_path, lambda handle: handle.write(payload))


def preprocessed_cases(cases: Sequence[dict[str, Any]], *, plan: Plan, modalities: Sequence[str]) -> list[dict]:
    """The datalist ``cases`` as evaluation sees them (the plan's grid, normalised, padded), image and label."""
    from client.data.loading import preprocess_case
    from client.data.transforms import evaluation_transforms, settings_for

    transform = evaluation_transforms(settings_for(plan, modalities=modalities))
    return [preprocess_case(case, transform) for case in cases]


def calibration_patches(cases: Sequence[dict], *, plan: Plan, seed: int = 0) -> list[np.ndarray]:
    """Random windows of the model's patch size (:data:`CALIBRATION_PATCHES_PER_CASE` per case) from ``cases``
    (as :func:`preprocessed_cases` gives them); a 2D plan takes one slice per window."""
    import numpy as np

    rng, patches = np.random.default_rng(seed), []
    for case in cases[:MAX_CALIBRATION_CASES]:
        image = np.asarray(case["image"], dtype=np.float32)
        for _ in range(CALIBRATION_PATCHES_PER_CASE):
            if plan.spatial_dims == 2:
                volume = image[..., int(rng.integers(0, image.shape[-1]))]
            else:
                volume = image
            corner = [int(rng.integers(0, s - p + 1)) for s, p in zip(volume.shape[1:], plan.patch_size)]
            window = tuple(slice(c, c + p) for c, p in zip(corner, plan.patch_size))
            patches.append(np.ascontiguousarray(volume[(slice(None), *window)]))
    if not patches:
        raise DataError("'--quantize': no training cases to calibrate on")
    return patches


def compare_on_cases(*, model: torch.nn.Module, quantized: torch.nn.Module, plan: Plan, cases: Sequence[dict],
                     calibration: tuple[int, int]) -> QuantizationReport:
    """Dice (mean over cases and foreground classes) and network seconds of ``model`` (torch, float32, as
    ``predict`` runs it) and ``quantized`` on the preprocessed validation ``cases``."""
    import math

    import torch

    from client.inference.whole_volume import inplace_activations, predict_volume
    from shared.metrics import dice_per_class

    if not cases:
        raise DataError("'--quantize': the datalist has no validation cases to measure the Dice change on")
    networks = {"float": inplace_activations(model.eval()), "int8": quantized}
    dice: dict[str, list[float]] = {"float": [], "int8": []}
    seconds = {"float": 0.0, "int8": 0.0}
    for case in cases:
        volume, label = torch.as_tensor(case["image"]).float(), torch.as_tensor(case["label"])[None].long()
        for name, network in networks.items():
            started = time.perf_counter()
            with torch.inference_mode():
                logits = predict_volume(network, volume, spatial_dims=plan.spatial_dims, patch_size=plan.patch_size)
            seconds[name] += time.perf_counter() - started
            values = dice_per_class(logits.float(), label, num_classes=plan.num_classes).flatten().tolist()
            dice[name] += [v for v in values if not math.isnan(v)]
    mean = {name: sum(v) / max(len(v), 1) for name, v in dice.items()}
    return QuantizationReport(calibration_cases=calibration[0], calibration_patches=calibration[1],
                              validation_cases=len(cases), dice_float=mean["float"], dice_int8=mean["int8"],
                              seconds_float=seconds["float"], seconds_int8=seconds["int8"])
