"""``python -m client COMMAND``: tools for hospital IT, run at the site."""

from __future__ import annotations

import sys

from shared.cli import quiet_optional_codec_notice, run_commands

# name -> (module with add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "audit": ("client.commands.audit", "summarise the egress audit log: what left this site, per run and round"),
    "check-data": ("client.commands.check_data", "read every case of a datalist as training would and report problems"),
    "fingerprint": ("client.commands.fingerprint", "show the data fingerprint this site sends for the federated plan"),
    "predict": ("client.commands.predict", "segment a NIfTI file or DICOM series with a federated model"),
    "finetune": ("client.commands.finetune", "fine-tune a federated model on this site's data (DP charged to its ledger)"),
    "export": ("client.commands.export", "write the model as TorchScript with its preprocessing as JSON, checked against predict"),
    "keygen": ("client.commands.keygen", "make this node's authentication key pair (the public key goes to the operator)"),
}


def main(argv: list[str] | None = None) -> int:
    quiet_optional_codec_notice()
    return run_commands("python -m client", "fedseg tools for a hospital node.", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
