"""Write a predicted mask as a DICOM SEG and its uncertainty map as a DICOM parametric map (highdicom), each
referencing its source series."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

    datasets = _source_datasets(source, slices=mask.shape[2])
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=f"class {number}",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("85756007", "SCT", "Tissue"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="fedseg segmentation network", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Artificial Intelligence")),
    ) for number in range(1, num_classes)]
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=_frames(mask).astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=hd.UID(), series_number=9001, **_instance(hd),
    )
    return atomic_write(path, lambda handle: seg.save_as(handle, enforce_file_format=True))


def write_dicom_uncertainty(source: Path, entropy: np.ndarray, path: Path) -> Path:
    """Write the normalised entropy ``entropy`` (0 to 1, ``[cols, rows, slices]`` as :func:`write_dicom_seg`'s
    mask) as a DICOM Parametric Map (float pixels, no unit) referencing the source series."""
    import highdicom as hd

    datasets = _source_datasets(source, slices=entropy.shape[2])
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="entropy", lut_explanation="normalised entropy over test-time flips",
        unit=hd.sr.CodedConcept("1", "UCUM", "no units"), value_range=(0.0, 1.0), slope=1, intercept=0)
    parametric_map = hd.pm.ParametricMap(
        source_images=datasets, pixel_array=_frames(entropy).astype(np.float32), series_instance_uid=hd.UID(),
        series_number=9002, contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label="UNCERTAINTY", **_instance(hd),
    )
    return atomic_write(path, lambda handle: parametric_map.save_as(handle, enforce_file_format=True))


def _source_datasets(source: Path, *, slices: int) -> list[Any]:
    """The source series' datasets in instance order; a :class:`DataError` unless DICOM of ``slices`` slices."""
    import pydicom

    files = sorted(p for p in Path(source).iterdir() if p.is_file()) if Path(source).is_dir() else [Path(source)]
    datasets = [pydicom.dcmread(f) for f in files if pydicom.misc.is_dicom(str(f))]
    if not datasets:
        raise DataError(f"{source}: '--dicom-seg' needs a DICOM input")
    datasets.sort(key=lambda ds: int(getattr(ds, "InstanceNumber", 0)))
    if slices != len(datasets):
        raise DataError(f"{source}: the result has {slices} slices, the series {len(datasets)}")
    return datasets


def _frames(array: np.ndarray) -> np.ndarray:
    """``[cols, rows, slices]`` as DICOM frames ``[slices, rows, cols]``."""
    return np.stack([array[:, :, k].T for k in range(array.shape[2])])


def _instance(hd: Any) -> dict[str, Any]:
    return {"sop_instance_uid": hd.UID(), "instance_number": 1, "manufacturer": MANUFACTURER,
            "manufacturer_model_name": "fedseg", "software_versions": "fedseg", "device_serial_number": "0"}
