"""``python -m client predict``: segment a site's scans with a federated model.

Input: a NIfTI file or a folder holding one DICOM series (one per channel for a
multi-modal model), or with ``--input-list`` many scans with one model load
(:mod:`client.commands.predict_batch`). The work is :class:`client.inference.predictor.Predictor`:
training's preprocessing, sliding-window inference, the mask written as NIfTI
with the input's shape and affine; optionally DICOM SEG and, with
``--uncertainty``, a voxel-wise uncertainty map beside the mask.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.inference.predictor import Prediction, Predictor, describe
from client.inference.whole_volume import OVERLAP, PRECISIONS, SW_BATCH_SIZE
from shared.errors import ConfigError

if TYPE_CHECKING:
    pass

__all__ = ["Prediction", "predict_scan"]


def predict_scan(*, model_path: Path, input_path: Path | Sequence[Path], output_path: Path, device: str = "auto",
                 modality: str | None = None, dicom_seg_path: Path | None = None, uncertainty: bool = False,
                 overlap: float = OVERLAP, sw_batch_size: int = SW_BATCH_SIZE,
                 local_weights: Path | None = None, precision: str = "auto") -> Prediction:
    """Segment ``input_path`` with the model in ``model_path`` (a model file or an export folder);
    write the mask to ``output_path``.

    ``input_path`` is one scan, or one scan per input channel (same grid);
    ``modality`` is one name or one per channel, comma-separated (``"T1,FLAIR"``).
    With ``uncertainty`` the mask is the mean over test-time flips and their
    normalised entropy is written beside it (:func:`client.inference.predictor.uncertainty_path`).
    ``local_weights`` is this site's own norm weights of a ``local-norm`` run
    (``<state-dir>/local-weights/run-N.pt``), laid over the global model: the site's personal model.
    ``precision`` is ``auto``, ``float32`` or ``bfloat16`` (:data:`client.inference.whole_volume.PRECISIONS`).
    """
    inputs = [Path(p) for p in ([input_path] if isinstance(input_path, (str, Path)) else input_path)]
    predictor = Predictor.load(model_path=model_path, device=device, overlap=overlap, sw_batch_size=sw_batch_size,
                               local_weights=local_weights, precision=precision)
    return predictor.predict(inputs=inputs, output=Path(output_path), modality=modality, uncertainty=uncertainty,
                             dicom_seg_path=dicom_seg_path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True,
                        help="global_model.pt written by a run, or a folder written by 'export'")
    scans = parser.add_mutually_exclusive_group(required=True)
    scans.add_argument("--input", type=Path, nargs="+", metavar="PATH",
                       help="a NIfTI file or a folder with one DICOM series (one per channel for "
                            "multi-modal models, same grid)")
    scans.add_argument("--input-list", type=Path, metavar="FILE",
                       help="a text file of scans, one a line (channels comma-separated; paths relative to "
                            "the file): all segmented with one model load into --output-dir, finished ones skipped")
    parser.add_argument("--output", type=Path, help="mask to write (.nii.gz); with --input")
    parser.add_argument("--output-dir", type=Path, help="folder for NAME_seg.nii.gz masks; with --input-list")
    parser.add_argument("--dicom-seg", type=Path, help="also write the mask as DICOM SEG here (DICOM input only)")
    parser.add_argument("--uncertainty", action="store_true",
                        help="average over test-time flips and write their normalised entropy (0 certain, 1 all "
                             "classes equally likely) beside the mask as NAME_uncertainty.nii.gz")
    parser.add_argument("--modality", help="CT (HU window) or another name (z-score), one or one per channel, "
                                           "comma-separated (default: the DICOM Modality tag, else MR)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--local-weights", type=Path,
                        help="this site's own norm weights of a local-norm run (<state-dir>/local-weights/run-N.pt)")
    parser.add_argument("--overlap", type=float, default=OVERLAP,
                        help=f"overlap of neighbouring sliding windows (default: {OVERLAP})")
    parser.add_argument("--sw-batch-size", type=int, default=SW_BATCH_SIZE,
                        help=f"windows per forward pass (default: {SW_BATCH_SIZE})")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="auto (default: float16 mixed precision on CUDA, bfloat16 autocast on a CPU with AMX "
                             "units, else float32), float32, or bfloat16 (a few voxels may differ from float32: "
                             "BENCHMARKS.md); autocast reaches the torch engine only")
    parser.add_argument("--engine", default="torch", choices=("torch", "onnx"),
                        help="torch (default), or onnx: the network converted at load and run by onnxruntime on "
                             "CPU (which is faster depends on the network: BENCHMARKS.md)")
    parser.add_argument("--quiet", action="store_true", help="no progress line")


def run(args: argparse.Namespace) -> int:
    use_all_cores()
    options: dict[str, Any] = {"device": args.device, "overlap": args.overlap, "sw_batch_size": args.sw_batch_size,
                               "precision": args.precision,
                               "engine": args.engine, "local_weights": args.local_weights,
                               "progress": None if args.quiet else ProgressLine()}
    if args.input_list is not None:
        if args.output_dir is None or args.output is not None or args.dicom_seg is not None:
            raise ConfigError("'--input-list': give '--output-dir' (not '--output' or '--dicom-seg')")
        from client.commands.predict_batch import predict_list

        return predict_list(model_path=args.model, input_list=args.input_list, output_dir=args.output_dir,
                            modality=args.modality, uncertainty=args.uncertainty, options=options)
    if args.output is None or args.output_dir is not None:
        raise ConfigError("'--input': give '--output' (a .nii.gz file; '--output-dir' goes with '--input-list')")
    predictor = Predictor.load(model_path=args.model, **options)
    result = predictor.predict(inputs=args.input, output=args.output, modality=args.modality,
                               uncertainty=args.uncertainty, dicom_seg_path=args.dicom_seg)
    print(describe(result))
    return 0


def use_all_cores() -> None:
    """One torch thread per core this process may run on (torch counts the machine's, which a container's
    CPU set can make too many)."""
    import torch

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))


class ProgressLine:
    """``network: 40% (120/300 windows)`` on standard error: redrawn in place on a terminal, else each quarter."""

    def __init__(self) -> None:
        self.quarter = -1

    def __call__(self, done: int, total: int) -> None:
        terminal, quarter = sys.stderr.isatty(), 4 * done // max(total, 1)
        if terminal or quarter != self.quarter:
            self.quarter = quarter
            prefix, end = ("\r", "\n" if done >= total else "") if terminal else ("", "\n")
            print(f"{prefix}network: {100 * done // max(total, 1)}% ({done}/{total} windows)", end=end,
                  file=sys.stderr, flush=True)
