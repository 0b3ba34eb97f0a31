"""``client predict`` in float32 and in bfloat16 with a trained model on real anatomy: same masks? same Dice?

``--precision auto`` computes in bfloat16 on a CPU with AMX (issue 24). A
synthetic CT with a briefly trained model (``benchmarks.inference``) says how
fast that is, but its masks are near-empty; this says what it does to a model
that segments: every validation case of the given datalists segmented with one
model file at each precision, in one run, interleaved case by case.

Run (after a federation on a real task, e.g. ``benchmarks.real_tasks``)::

    .venv/bin/python -m benchmarks.precision_agreement --model RUN/global_model.pt \\
        --datalists benchmarks/.data/real_tasks/donors-*/*/*.json

Prints per site: voxels whose class differs, mean Dice (foreground classes, MONAI's ``DiceMetric``) in
each precision, the largest per-case Dice change, and the network stage's seconds in each.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PRECISIONS = ("float32", "bfloat16")


def validation_cases(datalist: Path) -> list[tuple[Path, Path]]:
    """(image, label) of a datalist's ``validation`` entries, paths resolved beside the file."""
    entries = json.loads(Path(datalist).read_text())["validation"]
    return [(datalist.parent / e["image"], datalist.parent / e["label"]) for e in entries]


def mean_dice(mask: Any, label: Any, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in ``label`` or ``mask`` (MONAI's ``DiceMetric``)."""
    import torch
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    def encode(array: Any) -> Any:
        return one_hot(torch.as_tensor(array, dtype=torch.long)[None, None], num_classes=num_classes)

    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    per_class = metric(encode(mask), encode(label))[0]
    return float(per_class.nanmean())


def compare(model: Path, datalists: list[Path], *, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """Per site: voxels, differing voxels, Dice per precision, largest per-case Dice change, network seconds."""
    import nibabel as nib
    import numpy as np

    from client.inference.predictor import Predictor

    predictors = {p: Predictor.load(model_path=model, device=device, precision=p) for p in PRECISIONS}
    num_classes = predictors["float32"].plan.num_classes
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="fedseg-precision-") as tmp:
        for datalist in datalists:
            site = {"cases": 0, "voxels": 0, "differing": 0, "dice": {p: [] for p in PRECISIONS},
                    "seconds": {p: 0.0 for p in PRECISIONS}}
            for image, label_path in validation_cases(datalist):
                label, masks = np.asarray(nib.load(label_path).dataobj), {}
                for precision, predictor in predictors.items():
                    out = Path(tmp) / f"{precision}.nii.gz"
                    result = predictor.predict(inputs=[image], output=out)
                    masks[precision] = np.asarray(nib.load(out).dataobj)
                    site["seconds"][precision] += result.seconds["network"]
                    site["dice"][precision].append(mean_dice(masks[precision], label, num_classes))
                site["cases"] += 1
                site["voxels"] += int(label.size)
                site["differing"] += int((masks["float32"] != masks["bfloat16"]).sum())
            results[datalist.stem] = site
            print(row(datalist.stem, site), flush=True)
    return results


def row(name: str, site: dict[str, Any]) -> str:
    """One Markdown table row of :func:`compare`'s result for a site."""
    f32, bf16 = (site["dice"][p] for p in PRECISIONS)
    change = max(abs(a - b) for a, b in zip(f32, bf16, strict=True))
    return (f"| {name} | {site['cases']} | {100 * site['differing'] / site['voxels']:.4f}% | "
            f"{sum(f32) / len(f32):.4f} | {sum(bf16) / len(bf16):.4f} | {change:.4f} | "
            f"{site['seconds']['float32'] / site['seconds']['bfloat16']:.2f}x |")


HEADER = ("| site | cases | voxels of another class | Dice float32 | Dice bfloat16 | largest per-case Dice change | "
          "network float32 / bfloat16 |\n|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision_agreement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a fedseg model file (global_model.pt)")
    parser.add_argument("--datalists", type=Path, nargs="+", required=True, help="datalists with validation cases")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    compare(args.model, args.datalists, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
