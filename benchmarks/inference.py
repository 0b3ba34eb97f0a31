"""``client predict`` on a CT-sized volume: seconds end to end and per stage, before and after (issue 24).

Run: ``.venv/bin/python -m benchmarks.inference [--shape 512x512x200] [--spacing 1,1,1] [--write]``.
Writes one synthetic CT (int16 NIfTI: a body ellipse of soft tissue in air with
brighter organs and 20 HU noise) and, per network, a model briefly trained on
it (``--train-steps`` Adam steps on patches, so the mask is a plausible one and
not the noise of untrained weights), then times side by side in one run:
``before`` (the pipeline as it was: windows 4 at a time under ``no_grad``,
class probabilities always resampled back, gzip level 9), ``after`` (``predict``
now), ``after`` at ``--overlap 0.125``, the TorchScript export (``predict
--model EXPORT``), the ONNX export (onnxruntime), ``after`` with 8 windows per
pass (the default until 2026-12-07), with ``--precision float32`` (the CPU default until
2026-12-07; ``auto`` is bfloat16 on a CPU with AMX since), and the int8 ONNX
export (``export --quantize``, calibrated on this CT; its Dice change measured
on a second synthetic CT). Networks: ``small-unet`` (the harness's 8-16-32 U-Net on
32^3 patches, manual 1 mm plan) and ``planned`` (the default preset's
nnU-Net-style DynUNet as ``derive_plan`` sizes it for this CT's fingerprint).
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import load_average, write_section
from client.inference.predictor import STAGES, Predictor, read_scan, timed_stage
from shared.config import RunConfig
from shared.plan import Plan, manual_plan

ROWS = ("before", "after", "after, overlap 0.125", "after, TorchScript export", "after, ONNX export",
        "after, 8 windows per pass", "after, float32", "after, int8 ONNX export")


def ct_volume(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(HU int16, organ label uint8): air, a body ellipse at 40 HU, two brighter organs (label 1), noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.ogrid[:shape[0], :shape[1], :shape[2]]
    cx, cy, cz = (s / 2 for s in shape)
    body = ((x - cx) / (0.42 * shape[0])) ** 2 + ((y - cy) / (0.32 * shape[1])) ** 2 <= 1
    organs = (((x - 0.38 * shape[0]) / (0.1 * shape[0])) ** 2 + ((y - cy) / (0.12 * shape[1])) ** 2
              + ((z - cz) / (0.3 * shape[2])) ** 2 <= 1)
    organs |= (((x - 0.62 * shape[0]) / (0.08 * shape[0])) ** 2 + ((y - 0.45 * shape[1]) / (0.08 * shape[1])) ** 2
               + ((z - 0.4 * shape[2]) / (0.2 * shape[2])) ** 2 <= 1)
    hu = np.where(body, 40.0, -1000.0) + np.where(organs, 110.0, 0.0)
    hu = hu + rng.normal(0.0, 20.0, size=shape)
    return hu.astype(np.int16), organs.astype(np.uint8)


def planned_plan(shape: tuple[int, ...], spacing: tuple[float, ...]) -> Plan:
    """The default preset's 3D plan for twenty cases like this one (no DP), as the server derives it."""
    from server.planning import derive_plan
    from shared.fingerprint import ChannelIntensity, Fingerprint

    geometry = {p: tuple(spacing) for p in (10, 50, 90)}
    extent = {p: tuple(n * s for n, s in zip(shape, spacing)) for p in (10, 50, 90)}
    intensity = ChannelIntensity(voxels=100_000, mean=150.0, std=20.0, percentiles={0.5: 100.0, 50.0: 150.0, 99.5: 200.0})
    fingerprint = Fingerprint(cases=20, channels=1, classes=2, spacing=geometry, extent=extent, sliced_spacing=geometry,
                              sliced_extent=extent, thickest_axis_cases=(0, 0, 20), isotropic_cases=20,
                              intensity=(intensity,), class_fractions={1: 0.05}, ct_channels=(True,))
    return derive_plan(RunConfig.from_mapping({"spatial-dims": 3, "dp": False}), {"site": fingerprint})[0]


def small_unet_plan() -> Plan:
    return manual_plan(RunConfig.from_mapping({"preset": "small-unet", "spatial-dims": 3, "patch-size": 32,
                                               "plan": "manual", "dp": False}))


def trained_model_file(plan: Plan, scan: Path, label: np.ndarray, path: Path, *, steps: int) -> Path:
    """A model file of ``plan``'s network after ``steps`` Adam steps on random patches of ``scan``."""
    import torch
    from monai.losses import DiceCELoss
    from monai.transforms import Compose

    from client.data.transforms import orienting, resampling, settings_for
    from shared.model import build_model
    from shared.model_file import save_model_file

    torch.manual_seed(0)
    model, settings = build_model(plan.model_config()), settings_for(plan, modalities=("CT",))
    image = Compose(orienting(settings, ("image",)) + resampling(settings, ("image",)))(
        {"image": read_scan([scan])[0]})["image"].as_tensor()
    if tuple(image.shape[1:]) != label.shape:  # resampled: the label would need the same; train on nothing
        steps = 0
    target = torch.as_tensor(label)[None].float()
    optimiser, loss_fn, rng = torch.optim.Adam(model.parameters(), lr=3e-3), DiceCELoss(to_onehot_y=True, softmax=True), np.random.default_rng(0)
    for _ in range(steps):
        corners = [[int(rng.integers(0, s - p + 1)) for s, p in zip(image.shape[1:], plan.patch_size)] for _ in range(2)]
        crop = [tuple(slice(c, c + p) for c, p in zip(corner, plan.patch_size)) for corner in corners]
        x = torch.stack([image[(slice(None), *c)] for c in crop])
        y = torch.stack([target[(slice(None), *c)] for c in crop])
        optimiser.zero_grad()
        output = model(x)
        loss_fn(output[:, 0] if output.ndim == x.ndim + 1 else output, y).backward()
        optimiser.step()
    return save_model_file(path, state_dict=model.state_dict(), model_config=plan.model_config(),
                           extra={"plan": plan.to_dict()})


def before(model_path: Path, scan: Path, output: Path) -> dict[str, float]:
    """The pipeline as ``predict`` ran it before issue 24, stage by stage."""
    import nibabel as nib
    import torch
    from monai.transforms import Compose

    from client.data.transforms import orienting, resampling, settings_for
    from client.inference.model_files import load_network
    from client.inference.scan_grid import resample_to_match
    from client.inference.whole_volume import predict_volume

    seconds: dict[str, float] = {}
    with timed_stage(seconds, "read"):
        network, plan = load_network(model_path)
        raw, _ = read_scan([scan])
    with timed_stage(seconds, "preprocess"):
        settings = settings_for(plan, modalities=("CT",))
        image = Compose(orienting(settings, ("image",)) + resampling(settings, ("image",)))({"image": raw})["image"]
    with timed_stage(seconds, "network"), torch.no_grad():
        logits = predict_volume(network.eval(), image.as_tensor(), spatial_dims=3, patch_size=plan.patch_size,
                                sw_batch_size=4)
    with timed_stage(seconds, "resample back"):
        mask = resample_to_match(torch.softmax(logits[0], dim=0), image.affine, raw).argmax(dim=0).numpy()
    with timed_stage(seconds, "write"):
        nifti = nib.Nifti1Image(mask.astype(np.uint8), np.asarray(raw.affine, dtype=float))
        output.write_bytes(gzip.compress(nifti.to_bytes()))
    return seconds


def measure(name: str, plan: Plan, scan: Path, label: np.ndarray, folder: Path, *, steps: int,
            rows: tuple[str, ...] = ROWS) -> dict[str, dict]:
    """Seconds per stage for each of ``rows`` (:data:`ROWS`; ``before`` always), and the masks' agreement."""
    import nibabel as nib

    from client.commands.export import export_model

    model_path = trained_model_file(plan, scan, label, folder / f"{name}.pt", steps=steps)
    for row, fmt in ((ROWS[3], "torchscript"), (ROWS[4], "onnx")):
        if row in rows:
            export_model(model_path=model_path, out_dir=folder / f"{name}-{fmt}", fmt=fmt)
    results: dict[str, dict] = {}
    if ROWS[7] in rows:  # calibrated on this CT, Dice change measured on another (seed 1) of the same size
        quantized = export_model(model_path=model_path, out_dir=folder / f"{name}-int8", fmt="onnx", quantize=True,
                                 datalist=_site_datalist(folder, scan, label))
        print(quantized.quantization.describe(), flush=True)
        results["int8 report"] = quantized.quantization
    outputs = {row: folder / f"{name}-{index}.nii.gz" for index, row in enumerate(ROWS)}
    results["before"] = {"seconds": before(model_path, scan, outputs["before"])}
    for row, model, options in ((ROWS[1], model_path, {}), (ROWS[2], model_path, {"overlap": 0.125}),
                                (ROWS[3], folder / f"{name}-torchscript", {}), (ROWS[4], folder / f"{name}-onnx", {}),
                                (ROWS[5], model_path, {"sw_batch_size": 8}),
                                (ROWS[6], model_path, {"precision": "float32"}),
                                (ROWS[7], folder / f"{name}-int8", {})):
        if row not in rows:
            continue
        started = time.perf_counter()
        predictor = Predictor.load(model_path=model, device="auto", **options)
        load = time.perf_counter() - started
        result = predictor.predict(inputs=[scan], output=outputs[row], modality="CT")
        results[row] = {"seconds": {"read": result.seconds["read"] + load,
                                    **{k: v for k, v in result.seconds.items() if k != "read"}},
                        "precision": result.precision}
    reference = nib.load(outputs["before"]).get_fdata()
    for row, result in results.items():
        if row not in ROWS:
            continue
        mask = nib.load(outputs[row]).get_fdata()
        result["same"], result["dice"] = float((mask == reference).mean()), _dice(mask, label)
    return results


def _site_datalist(folder: Path, scan: Path, label: np.ndarray) -> Path:
    """A datalist of this CT (training: calibration) and another one of its size (validation: the Dice change)."""
    import json

    import nibabel as nib

    affine = nib.load(scan).affine
    hu, other_label = ct_volume(tuple(label.shape), seed=1)
    for name, array in (("label.nii.gz", label), ("val.nii.gz", hu), ("val-label.nii.gz", other_label)):
        nib.save(nib.Nifti1Image(array, affine), folder / name)
    path = folder / "datalist.json"
    path.write_text(json.dumps({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "organ"},
                                "training": [{"image": scan.name, "label": "label.nii.gz"}],
                                "validation": [{"image": "val.nii.gz", "label": "val-label.nii.gz"}]}))
    return path


def _dice(mask: np.ndarray, label: np.ndarray) -> float:
    inter = float(((mask == 1) & (label == 1)).sum())
    return 2 * inter / max(1.0, float((mask == 1).sum() + (label == 1).sum()))


def table(name: str, plan: Plan, results: dict[str, dict]) -> str:
    head = (f"**{name}**: {plan.model} {'-'.join(map(str, plan.channels))}, patch {'x'.join(map(str, plan.patch_size))}"
            f" at {'x'.join(f'{s:g}' for s in plan.target_spacing)} mm; 'after' computes in "
            f"{results.get('after', {}).get('precision', '?')} (`--precision auto` on this machine)\n\n"
            f"| run | {' | '.join(STAGES)} | total s | vs before | mask = before's | Dice vs label |\n"
            f"|---|{'---|' * len(STAGES)}---|---|---|---|\n")
    total_before = sum(results["before"]["seconds"].values())
    lines = []
    for row in (r for r in results if r in ROWS):
        seconds = results[row]["seconds"]
        total = sum(seconds.values())
        lines.append(f"| {row} | {' | '.join(f'{seconds.get(s, 0.0):.1f}' for s in STAGES)} | {total:.1f} | "
                     f"{total_before / total:.2f}x | {100 * results[row]['same']:.3f}% | {results[row]['dice']:.3f} |")
    report = results.get("int8 report")
    note = f"\n{report.describe()} (validation: a second synthetic CT, seed 1)\n" if report else ""
    return head + "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    import nibabel as nib
    import torch

    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__)
    parser.add_argument("--shape", default="512x512x200")
    parser.add_argument("--spacing", default="1,1,1", help="mm per axis of the synthetic CT")
    parser.add_argument("--networks", nargs="+", default=["small-unet", "planned"], choices=["small-unet", "planned"])
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--rows", nargs="+", type=int, default=list(range(len(ROWS))),
                        help="which runs besides 'before': " + ", ".join(f"{i} = {r}" for i, r in enumerate(ROWS)))
    parser.add_argument("--write", action="store_true", help="write the tables to BENCHMARKS.md")
    args = parser.parse_args(argv)
    shape = tuple(int(n) for n in args.shape.split("x"))
    spacing = tuple(float(s) for s in args.spacing.split(","))
    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    sections = []
    with tempfile.TemporaryDirectory(prefix="fedseg-inference-") as tmp:
        folder = Path(tmp)
        hu, label = ct_volume(shape)
        scan = folder / "ct.nii.gz"
        nib.save(nib.Nifti1Image(hu, np.diag([*spacing, 1.0])), scan)
        for name in args.networks:
            plan = planned_plan(shape, spacing) if name == "planned" else small_unet_plan()
            sections.append(table(name, plan, measure(name, plan, scan, label, folder, steps=args.train_steps,
                                                        rows=tuple(ROWS[i] for i in args.rows))))
            print(sections[-1], flush=True)
    command = "`.venv/bin/python -m benchmarks.inference " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"
    body = (f"Command: {command.replace(' `', '`')} (load average before: {load_average()}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU)\n\n"
            f"Synthetic CT {args.shape} voxels at {args.spacing} mm (int16 NIfTI, gzip), models trained "
            f"{args.train_steps} steps on it; seconds per stage ('read' includes loading the model):\n\n"
            + "\n".join(sections))
    if args.write:
        write_section(f"inference-{args.shape}", f"Inference at the hospital: `client predict` on a {args.shape} CT (issue 24)",
                      body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
