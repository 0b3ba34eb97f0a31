"""DICOM series checks run before MONAI's PydicomReader stacks a folder.

MONAI stacks whatever it finds in a folder (sorted by InstanceNumber) and only
warns about mixed shapes; a folder with two series or a missing slice would
silently become a wrong volume. These checks turn such folders into a
:class:`DataError` naming the folder and the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.errors import DataError

GAP_TOLERANCE = 0.1  # fraction of the slice spacing a position may deviate by


def is_dicom_seg(path: Path | str) -> bool:
    """True if ``path`` is a single DICOM file holding a segmentation (Modality SEG)."""
    import pydicom

    path = Path(path)
    if path.is_dir() or not pydicom.misc.is_dicom(str(path)):
        return False
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    return getattr(header, "Modality", "") == "SEG"


def dicom_modality(path: Path | str) -> str | None:
    """The Modality tag of a DICOM file or of the first DICOM file in a folder; None for other files."""
    import pydicom

    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if pydicom.misc.is_dicom(str(file)):
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=["Modality"])
            return str(getattr(header, "Modality", "")) or None
    return None


def check_dicom_series(folder: Path | str) -> None:
    """Raise :class:`DataError` unless ``folder`` holds exactly one complete DICOM series."""
    import pydicom

    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    headers = [(path, read_slice(path)) for path in files if pydicom.misc.is_dicom(str(path))]
    if not headers:
        raise DataError(f"{folder}: folder holds no DICOM files (point the datalist at the series folder itself)")
    series = {str(getattr(h, "SeriesInstanceUID", "")) for _, h in headers}
    if len(series) > 1:
        raise DataError(f"{folder}: folder mixes {len(series)} DICOM series; keep one series per folder")
    try:
        _check_slice_geometry(folder, headers)
    except DataError:
        # MONAI skips files without a DICOM header, as the lines above do; when the series is then incomplete,
        # such a file is the likely lost slice, so it is named rather than the gap it leaves
        others = [path for path in files if not pydicom.misc.is_dicom(str(path))]
        if others:
            raise DataError(f"{others[0]}: not a readable DICOM file (no DICOM header: damaged, or not DICOM) in "
                            f"the series folder {folder}, whose slices are incomplete without it"
                            + (f" ({len(others) - 1} more such file(s))" if len(others) > 1 else "")) from None
        raise


def read_slice(path: Path) -> object:
    """Read one DICOM file; raise :class:`DataError` naming it if it is damaged or truncated."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises several types for damaged files
        raise DataError(f"{path}: unreadable DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise DataError(f"{path}: unreadable DICOM file (no pixel data; truncated?)")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected = (int(ds.Rows) * int(ds.Columns) * int(getattr(ds, "SamplesPerPixel", 1))
                    * int(getattr(ds, "NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
        if len(ds.PixelData) < expected:
            raise DataError(f"{path}: unreadable DICOM file (truncated pixel data: "
                            f"{len(ds.PixelData)} of {expected} bytes)")
    return ds


def _check_slice_geometry(folder: Path, headers: list) -> None:
    shapes = {(int(getattr(h, "Rows", 0)), int(getattr(h, "Columns", 0))) for _, h in headers}
    if len(shapes) > 1:
        raise DataError(f"{folder}: slices have different sizes {sorted(shapes)}")
    missing = [p.name for p, h in headers if not hasattr(h, "ImagePositionPatient")
               or not hasattr(h, "ImageOrientationPatient") or not hasattr(h, "InstanceNumber")]
    if missing:
        raise DataError(f"{folder}: slice {missing[0]} lacks ImagePositionPatient, "
                        "ImageOrientationPatient or InstanceNumber")
    if len(headers) < 2:
        return
    orientation = np.asarray(headers[0][1].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    ordered = sorted(headers, key=lambda item: int(item[1].InstanceNumber))
    positions = np.array([float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float)))
                          for _, h in ordered])
    steps = np.diff(positions)
    if np.any(np.abs(steps) < 1e-6):
        raise DataError(f"{folder}: two slices share one position (duplicate slices or several series)")
    if not (np.all(steps > 0) or np.all(steps < 0)):
        raise DataError(f"{folder}: InstanceNumber order does not follow slice position")
    spacing = float(np.median(np.abs(steps)))
    irregular = np.abs(np.abs(steps) - spacing) > GAP_TOLERANCE * spacing
    if irregular.any():
        index = int(np.argmax(irregular))
        raise DataError(
            f"{folder}: missing slice(s) between {ordered[index][0].name} and {ordered[index + 1][0].name} "
            f"(gap {abs(steps[index]):.2f} mm, slice spacing {spacing:.2f} mm)"
        )
