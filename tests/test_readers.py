"""Reading a case's files: what a node's logs show while it reads."""

from __future__ import annotations

import importlib
import logging

import torch

from client.data import readers
from tests.data_cases import ct_volume, write_nifti_case

CODEC_LOGGER = "monai.data.nvimgcodec_pydicom_plugin"


def _codec_notices(caplog, path: str) -> list[logging.LogRecord]:
    caplog.clear()
    readers._image_loader.cache_clear()  # MONAI builds its readers (and logs) when a loader is made
    with caplog.at_level(logging.WARNING):
        image = readers.load_image(path)
    assert torch.is_tensor(image) and image.shape[0] == 1
    return [r for r in caplog.records if r.name == CODEC_LOGGER]


def test_the_client_app_keeps_monais_codec_notice_out_of_a_nodes_log(tmp_path, caplog):
    case = write_nifti_case(tmp_path, "case", *ct_volume(0))
    path = str(tmp_path / case["image"])
    logger = logging.getLogger(CODEC_LOGGER)
    saved = logger.level
    try:
        logger.setLevel(logging.NOTSET)
        assert _codec_notices(caplog, path), "MONAI no longer logs the notice: this test checks nothing"
        import client.client_app

        importlib.reload(client.client_app)  # what a Ray actor or SuperNode does when it loads the app
        assert _codec_notices(caplog, path) == []
    finally:
        logger.setLevel(saved)


def test_one_loader_per_reader_serves_every_file(tmp_path):
    first = write_nifti_case(tmp_path, "a", *ct_volume(1))
    second = write_nifti_case(tmp_path, "b", *ct_volume(2, shape=(12, 10, 6)))
    readers._image_loader.cache_clear()
    a = readers.load_image(str(tmp_path / first["image"]))
    b = readers.load_image(str(tmp_path / second["image"]))
    assert readers._image_loader.cache_info().currsize == 1
    assert a.shape[1:] == (20, 18, 8) and b.shape[1:] == (12, 10, 6)
    assert a.meta["filename_or_obj"].endswith("a.nii.gz") and b.meta["filename_or_obj"].endswith("b.nii.gz")
