"""Write DICOM series with pydicom from a volume and a NIfTI-style (RAS) affine, for tests.

Real geometry: ImagePositionPatient per slice, ImageOrientationPatient,
PixelSpacing, SliceThickness, and stored integers with RescaleSlope/Intercept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def write_series(volume: np.ndarray, affine_ras: np.ndarray, folder: Path, *, modality: str = "CT",
                 slope: float = 1.0, intercept: float = 0.0, series_uid: str | None = None,
                 first_instance: int = 1) -> list[Path]:
    """Write ``volume[i, j, k]`` as one file per ``k`` slice; return the files.

    Stored values are ``round((volume - intercept) / slope)`` as int16.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    affine = LPS_FROM_RAS @ np.asarray(affine_ras, dtype=float)
    spacing_i, spacing_j, spacing_k = (float(np.linalg.norm(affine[:3, a])) for a in range(3))
    row_dir, col_dir = affine[:3, 0] / spacing_i, affine[:3, 1] / spacing_j
    study_uid, series_uid = generate_uid(), series_uid or generate_uid()
    frame_uid = generate_uid()
    stored = np.round((volume - intercept) / slope).astype(np.int16)
    paths = []
    for k in range(volume.shape[2]):
        ds = _slice_dataset(modality)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.InstanceNumber = first_instance + k
        ds.ImagePositionPatient = [float(v) for v in (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [spacing_j, spacing_i]
        ds.SliceThickness = spacing_k
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        pixels = np.ascontiguousarray(stored[:, :, k].T)  # rows run along j, columns along i
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        path = folder / f"slice_{first_instance + k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(modality: str) -> Dataset:
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID, ds.PatientName = "fedseg-test", "Test^Patient"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "1"
    ds.ReferringPhysicianName, ds.SeriesNumber = "", 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    return ds
