"""Write a predicted mask as a DICOM SEG (highdicom) referencing its source series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.atomic import atomic_write
from shared.errors import DataError

MANUFACTURER = "fedseg"


def write_dicom_seg(source: Path, mask: np.ndarray, path: Path, *, num_classes: int) -> Path:
    """Write ``mask`` (class indices on the source's grid as MONAI reads it: ``[cols, rows, slices]``).

    ``source`` is the DICOM series folder (or single file) the mask was predicted from.
    One segment per foreground class; empty frames are omitted (highdicom's default).
    """
    import highdicom as hd
    import pydicom

    files = sorted(p for p in Path(source).iterdir() if p.is_file()) if Path(source).is_dir() else [Path(source)]
    datasets = [pydicom.dcmread(f) for f in files if pydicom.misc.is_dicom(str(f))]
    if not datasets:
        raise DataError(f"{source}: '--dicom-seg' needs a DICOM input")
    datasets.sort(key=lambda ds: int(getattr(ds, "InstanceNumber", 0)))
    if mask.shape[2] != len(datasets):
        raise DataError(f"{source}: mask has {mask.shape[2]} slices, the series {len(datasets)}")
    frames = np.stack([mask[:, :, k].T for k in range(mask.shape[2])]).astype(np.uint8)
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"class {number}",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="fedseg segmentation network", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence")),
    ) for number in range(1, num_classes)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=9001,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="fedseg", software_versions="fedseg", device_serial_number="0",
    )
    return atomic_write(path, lambda handle: seg.save_as(handle, enforce_file_format=True))
