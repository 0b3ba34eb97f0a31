"""``predict --input-list``: many scans, one model load, finished scans skipped on a restart.

Every file is written atomically (:func:`shared.atomic.atomic_write`) and the
mask last, so a mask on disk means its scan is complete: a run killed midway
leaves no mask that a restart would then skip. A scan that fails is reported
and the others go on; the exit code is 1 if any failed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.inference.predictor import Predictor, describe, uncertainty_path
from shared.errors import ConfigError, DataError, FedSegError

MASK_SUFFIX = "_seg.nii.gz"


@dataclass(frozen=True)
class Scan:
    """One line of an input list: the scan's files (one per channel) and its mask's path."""

    inputs: tuple[Path, ...]
    output: Path


def read_input_list(input_list: Path, *, output_dir: Path) -> list[Scan]:
    """Parse ``input_list``: one scan a line, channels comma-separated, ``#`` comments, paths relative to the file.

    A scan's mask is ``output_dir/NAME_seg.nii.gz``, NAME being its first file's name without extension
    (a DICOM folder's name); two scans with the same NAME are refused.
    """
    try:
        lines = Path(input_list).read_text().splitlines()
    except OSError as exc:
        raise DataError(f"{input_list}: cannot read the input list ({exc.strerror})") from None
    scans, seen = [], {}
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        inputs = tuple(Path(input_list).parent / part.strip() for part in text.split(","))
        name = _scan_name(inputs[0])
        if name in seen:
            raise ConfigError(f"'--input-list': {input_list} lines {seen[name]} and {number} both give a mask "
                              f"named {name}{MASK_SUFFIX}")
        seen[name] = number
        scans.append(Scan(inputs=inputs, output=Path(output_dir) / f"{name}{MASK_SUFFIX}"))
    if not scans:
        raise DataError(f"{input_list}: the input list names no scans")
    return scans


def is_done(scan: Scan, *, uncertainty: bool) -> bool:
    """True if ``scan``'s outputs are all on disk (each written atomically, so complete)."""
    return scan.output.exists() and (not uncertainty or uncertainty_path(scan.output).exists())


def predict_list(*, model_path: Path, input_list: Path, output_dir: Path, modality: str | None = None,
                 uncertainty: bool = False, options: dict[str, Any] | None = None) -> int:
    """Segment every scan of ``input_list`` not done yet; print a line per scan; return the exit code.

    ``options`` go to :class:`client.inference.predictor.Predictor` (device, overlap, ...).
    """

    scans = read_input_list(input_list, output_dir=output_dir)
    todo = [scan for scan in scans if not is_done(scan, uncertainty=uncertainty)]
    print(f"{len(scans)} scans in {input_list}: {len(scans) - len(todo)} done already, {len(todo)} to segment")
    if not todo:
        return 0
    predictor = Predictor.load(model_path=model_path, **(options or {}))
    failed = 0
    for index, scan in enumerate(todo, start=1):
        try:
            result = predictor.predict(inputs=scan.inputs, output=scan.output, modality=modality,
                                       uncertainty=uncertainty)
        except FedSegError as exc:
            failed += 1
            print(f"[{index}/{len(todo)}] error: {exc}", file=sys.stderr)
            continue
        print(f"[{index}/{len(todo)}] {describe(result)}")
    if failed:
        print(f"{failed} of {len(todo)} scans failed; run again to retry them", file=sys.stderr)
    return 1 if failed else 0


def _scan_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".dcm"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
