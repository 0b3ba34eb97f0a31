"""Site data cache: loading DICOM series through the pipeline vs loading cached cases.

Run: ``.venv/bin/python -m benchmarks.data_cache [--cases 4] [--size 128] [--slices 48]``.
Writes CT volumes as DICOM series (pydicom) to a temporary folder, then times,
side by side in one run, per case: the full pipeline without cache (decode DICOM,
check, orient, resample, normalise), a cache miss (the same plus the atomic
write) and a cache hit. Writes the figures to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.report import write_section  # noqa: E402
from client.data.case_cache import CaseCache  # noqa: E402
from client.data.loading import preprocess_cases  # noqa: E402
from client.data.transforms import evaluation_transforms, settings_for  # noqa: E402
from shared.config import RunConfig  # noqa: E402
from shared.plan import manual_plan  # noqa: E402
from tests.data_cases import write_dicom_case  # noqa: E402


def _write_cases(folder: Path, *, cases: int, size: int, slices: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    written = []
    for index in range(cases):
        image = (rng.integers(0, 2000, size=(size, size, slices)) * 0.5 - 1024).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[size // 4: size // 2, size // 4: size // 2, slices // 4: slices // 2] = 1
        entry = write_dicom_case(folder, f"case{index}", image, label, affine=affine)
        written.append({k: str(folder / v) for k, v in entry.items()})
    return written


def _timed(cases: list[dict[str, str]], transform, cache: CaseCache | None) -> float:
    started = time.perf_counter()
    preprocess_cases(cases, transform, cache=cache)
    return (time.perf_counter() - started) / len(cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.data_cache", description=__doc__)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--slices", type=int, default=48)
    args = parser.parse_args(argv)
    plan = manual_plan(RunConfig.from_mapping({"spatial-dims": 3, "target-spacing": 1.0, "patch-size": 64,
                                               "plan": "manual", "dp": False}))
    settings = settings_for(plan, modalities=("CT",))
    transform = evaluation_transforms(settings)
    with tempfile.TemporaryDirectory() as tmp:
        cases = _write_cases(Path(tmp), cases=args.cases, size=args.size, slices=args.slices)
        _timed(cases[:1], transform, None)  # warm-up: imports, first-call set-up, OS file cache
        uncached = _timed(cases, transform, None)
        miss = _timed(cases, transform, CaseCache(Path(tmp) / "cache", settings=settings))
        hit_cache = CaseCache(Path(tmp) / "cache", settings=settings)
        hit = _timed(cases, transform, hit_cache)
        assert hit_cache.hits == len(cases)
    command = "`.venv/bin/python -m benchmarks.data_cache " + " ".join(argv or sys.argv[1:]) + "`"
    body = (f"Command: {command.replace(' `', '`')}\n\n"
            f"{args.cases} CT volumes of {args.size}x{args.size}x{args.slices} voxels as DICOM series "
            f"(0.8x0.8x2.5 mm), preprocessed to 1 mm; seconds per case:\n\n"
            f"| pipeline | s/case | vs cache hit |\n|---|---|---|\n"
            f"| no cache (decode + preprocess) | {uncached:.3f} | {uncached / hit:.1f}x |\n"
            f"| cache miss (same + atomic write) | {miss:.3f} | {miss / hit:.1f}x |\n"
            f"| cache hit | {hit:.3f} | 1.0x |\n")
    write_section("data-cache", "Site data cache (DICOM decode vs cached case)", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
