"""``python -m client COMMAND``: tools for hospital IT, run at the site."""

from __future__ import annotations

import logging
import sys
import warnings

from shared.cli import run_commands

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("client.audit", "summarise the egress audit log: what left this site, per run and round"),
    "check-data": ("client.check_data", "read every case of a datalist as training would and report problems"),
    "predict": ("client.predict", "segment a NIfTI file or DICOM series with a federated model"),
    "keygen": ("client.keygen", "make this node's authentication key pair (the public key goes to the operator)"),
}


def main(argv: list[str] | None = None) -> int:
    # MONAI's optional GPU DICOM decoder announces its absence; noise for site tools
    warnings.filterwarnings("ignore", message="nvImageCodec")
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    return run_commands("python -m client", "fedseg tools for a hospital node.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
