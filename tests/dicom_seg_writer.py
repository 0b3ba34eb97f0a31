"""Write a DICOM SEG for a label volume over a test-written series (highdicom), for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.inference.dicom_output import write_dicom_seg


def write_seg(series: str | Path, label: np.ndarray, path: Path) -> Path:
    """``label[i, j, k]`` on the series written by :func:`tests.dicom_writer.write_series`."""
    return write_dicom_seg(Path(series), label.astype(np.uint8), path, num_classes=int(label.max()) + 1)
