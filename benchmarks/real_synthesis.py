"""Synthetic MR from real label maps, one scanner per site (the SynthSeg approach, Billot et al.).

A case starts from a site's real tissue map (:mod:`benchmarks.real_anatomy`), deformed by a
small random rigid + elastic transform, and becomes an image: per-tissue intensities from the
site's Gaussian mixture (its contrast), partial-volume blur for the site's voxel size, a bias
field, resampling to the site's acquisition grid (thick slices where the site has them),
gamma, Rician noise, and the site's intensity scale; it is stored in the site's own array
orientation with the affine that says so. Every step is a MONAI transform seeded per case,
so a case is a pure function of (seed, site, case index).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Mean intensity per tissue (index = tissue of benchmarks.real_anatomy: background, cortex,
# white matter, thalamus, caudate-accumbens, putamen, pallidum, hippocampus, amygdala, CSF),
# on a 0..1 scale, roughly as the tissues rank on T1- and T2-weighted MR; each site jitters them.
CONTRASTS: dict[str, tuple[float, ...]] = {
    "T1w": (0.0, 0.45, 0.75, 0.62, 0.50, 0.55, 0.66, 0.45, 0.47, 0.15),
    "T2w": (0.0, 0.55, 0.35, 0.45, 0.55, 0.48, 0.33, 0.60, 0.58, 0.95),
}


@dataclass(frozen=True)
class Acquisition:
    """How one site scans: voxel size (RAS, mm; the thick axis is the slice axis), storage, contrast."""

    site_id: str
    donor: str
    spacing: tuple[float, float, float]
    storage: str
    contrast: str
    description: str

    @property
    def slice_axis(self) -> int | None:
        """RAS axis the site's slices are stacked along, or None for a (near) isotropic 3D scan."""
        thick = max(self.spacing)
        return self.spacing.index(thick) if thick >= 1.5 * min(self.spacing) else None


@dataclass(frozen=True)
class SiteScanner:
    """A site's random scanner draw: its tissue means and spreads, bias, gamma, noise, scale."""

    means: tuple[float, ...]
    stds: tuple[float, ...]
    bias: float
    gamma: float
    noise: float
    scale: float


def draw_scanner(acquisition: Acquisition, *, seed: int) -> SiteScanner:
    """The site's scanner, drawn once from ``seed`` and the site id (so sites differ)."""
    rng = np.random.default_rng([seed, zlib.crc32(acquisition.site_id.encode())])
    prior = np.asarray(CONTRASTS.get(acquisition.contrast, ()))  # no prior: the task brings real intensities
    means = np.clip(prior + rng.normal(0.0, 0.04, prior.size), 0.0, 1.0)
    means[:1] = 0.0  # outside the brain stays dark: these are skull-stripped scans
    return SiteScanner(means=tuple(means.tolist()), stds=tuple(rng.uniform(0.01, 0.04, prior.size).tolist()),
                       bias=float(rng.uniform(0.2, 0.5)), gamma=float(rng.uniform(0.8, 1.25)),
                       noise=float(rng.uniform(0.01, 0.04)), scale=float(rng.uniform(500.0, 3000.0)))


def case_seed(*, seed: int, site_id: str, index: int) -> int:
    """Seed of one case: a different draw for every (seed, site, index)."""
    return int(np.random.SeedSequence([seed, zlib.crc32(site_id.encode()), index]).generate_state(1)[0])


def synthesize_case(tissue: Any, acquisition: Acquisition, scanner: SiteScanner, *, seed: int,
                    num_classes: int, deform: bool = True, intensities: Any = None) -> tuple[Any, Any]:
    """One case: (image, label) MetaTensors on the site's grid, in its storage orientation.

    Parameters
    ----------
    tissue
        ``[1, X, Y, Z]`` MetaTensor of tissue indices in RAS (a donor at base spacing).
    acquisition, scanner
        The site's geometry and its scanner draw.
    seed
        This case's seed (:func:`case_seed`).
    num_classes
        Segmentation classes; tissues at or above it (CSF) are background in the label.
    deform
        Apply the random rigid + elastic deformation (off in tests that compare geometry).
    intensities
        A real image (``[1, X, Y, Z]``, 0..1, on the tissue map's grid) to acquire instead of
        the scanner's Gaussian mixture; it is deformed together with the tissue map.
    """
    import torch
    from monai.transforms import (
        GaussianSmooth,
        Orientation,
        Rand3DElasticd,
        RandAdjustContrast,
        RandBiasField,
        RandRicianNoise,
        Spacing,
    )

    rng = np.random.default_rng(seed)
    volumes = {"tissue": tissue, **({"image": intensities} if intensities is not None else {})}
    if deform:
        # ~2 mm mean, ~6 mm largest displacement, +-6 degrees, +-5% scale: the same donor, not a new one
        elastic = Rand3DElasticd(keys=list(volumes), sigma_range=(8, 10), magnitude_range=(150, 300), prob=1.0,
                                 rotate_range=(0.1, 0.1, 0.1), scale_range=(0.05, 0.05, 0.05),
                                 mode=["nearest", "bilinear"][:len(volumes)], padding_mode="zeros")
        elastic.set_random_state(seed=int(rng.integers(2**31)))
        volumes = elastic(volumes)
    tissue = volumes["tissue"]
    tissues = tissue[0].round().long()
    if intensities is None:
        tissues = tissues.clamp(0, len(scanner.means) - 1)
        # within-site drift: each case's tissue means move a little around the site's own
        means = torch.tensor(np.clip(np.asarray(scanner.means) + rng.normal(0.0, 0.015, len(scanner.means)), 0, 1),
                             dtype=torch.float32)
        stds = torch.tensor(scanner.stds, dtype=torch.float32)
        noise = torch.from_numpy(rng.standard_normal(tissues.shape).astype(np.float32))
        image = tissue.clone()
        image[0] = means[tissues] + stds[tissues] * noise
    else:
        image = volumes["image"]
    label = tissue.clone()
    label[0] = torch.where(tissues >= num_classes, 0, tissues).float()

    base = np.asarray(tissue.pixdim[:3], dtype=float)
    # slice profile: FWHM = the site's voxel size along each axis (partial volume at the base grid)
    image = GaussianSmooth(sigma=tuple(np.maximum(np.asarray(acquisition.spacing) / base, 1.0) / 2.355))(image)
    bias = RandBiasField(degree=3, coeff_range=(0.0, scanner.bias), prob=1.0)
    bias.set_random_state(seed=int(rng.integers(2**31)))
    image = bias(image)
    image = Spacing(pixdim=acquisition.spacing, mode="bilinear")(image)
    label = Spacing(pixdim=acquisition.spacing, mode="nearest")(label)
    image = RandAdjustContrast(prob=1.0, gamma=(scanner.gamma, scanner.gamma))(image.clamp(min=0.0))
    rician = RandRicianNoise(prob=1.0, std=scanner.noise, sample_std=False)
    rician.set_random_state(seed=int(rng.integers(2**31)))
    image = rician(image) * scanner.scale
    orient = Orientation(axcodes=acquisition.storage)
    return orient(image), orient(label)


def write_case(image: Any, label: Any, *, out_dir: Path, name: str) -> dict[str, str]:
    """Save a case as NIfTI (image int16, label uint8) with its affine; return its datalist entry."""
    import nibabel as nib

    for sub in ("images", "labels"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    affine = np.asarray(image.affine, dtype=np.float64)
    # int16 like most scanners' output: a quarter of float32's disk and still > 10 bits of signal
    pixels = np.clip(np.rint(image[0].numpy()), -32768, 32767).astype(np.int16)
    for sub, data in (("images", pixels), ("labels", label[0].numpy().round().astype(np.uint8))):
        nifti = nib.Nifti1Image(data, affine)
        nifti.header.set_xyzt_units("mm")
        nib.save(nifti, out_dir / sub / name)
    return {"image": f"images/{name}", "label": f"labels/{name}"}


def write_site(tissue: Any, acquisition: Acquisition, out_dir: Path, *, seed: int, class_names: tuple[str, ...],
               training: int, validation: int, intensities: Any = None) -> Path:
    """Write one site's cases and its datalist (``<site-id>.json``: the harness names a site by its file).

    Training and validation cases are separate draws (different deformations and contrast
    jitter) of the same anatomy; ``intensities`` as in :func:`synthesize_case`.
    """
    from simulations.synthetic import write_datalist

    scanner = draw_scanner(acquisition, seed=seed)
    entries = []
    for index in range(training + validation):
        draw = case_seed(seed=seed, site_id=acquisition.site_id, index=index)
        image, label = synthesize_case(tissue, acquisition, scanner, seed=draw, num_classes=len(class_names),
                                       intensities=intensities)
        entries.append(write_case(image, label, out_dir=out_dir, name=f"case_{index:03d}.nii.gz"))
    extra = {"description": f"fedseg real-image benchmark: {acquisition.donor}, {acquisition.description}",
             "labels": {str(k): name for k, name in enumerate(class_names)},
             "acquisition": {"donor": acquisition.donor, "spacing_mm": list(acquisition.spacing),
                             "storage_axcodes": acquisition.storage, "contrast": acquisition.contrast},
             "scanner": {"means": scanner.means, "bias": scanner.bias, "gamma": scanner.gamma,
                         "noise": scanner.noise, "scale": scanner.scale}}
    return write_datalist(out_dir / f"{acquisition.site_id}.json", name=acquisition.site_id, spatial_dims=3,
                          training=entries[:training], validation=entries[training:], extra=extra)
