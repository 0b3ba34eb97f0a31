"""``python -m client keygen``: the hospital node's authentication key pair.

Flower's SuperNode authentication (``flower-supernode
--auth-supernode-private-key``) expects an EC key on a NIST curve in OpenSSH
format. This writes, into ``--out``:

- ``supernode_key``: the private key (0600 from creation on). It never leaves
  the site.
- ``supernode_key.pub``: the public key, one OpenSSH line. This is the only
  file the hospital sends to the operator, who registers it with
  ``flwr supernode register supernode_key.pub <connection>``.

The SHA256 fingerprint printed (same format as ``ssh-keygen -l``) lets both
sides confirm out of band that the key registered is the key generated.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.atomic import atomic_write
from shared.errors import ConfigError, FedSegError

PRIVATE_KEY, PUBLIC_KEY = "supernode_key", "supernode_key.pub"


class KeyExistsError(FedSegError):
    """A node key already exists where a new one was asked for."""


@dataclass(frozen=True)
class NodeKeyPair:
    """Where :func:`make_node_keys` wrote the key pair, and its fingerprint."""

    private_key: Path
    public_key: Path
    fingerprint: str


def make_node_keys(*, out: Path, comment: str = "fedseg-supernode", force: bool = False) -> NodeKeyPair:
    """Write a new EC P-384 key pair in OpenSSH format into ``out``.

    Parameters
    ----------
    out : Path
        Output folder (created 0700 if missing).
    comment : str
        Comment at the end of the public key line (e.g. the site id).
    force : bool
        Replace an existing key pair (the old public key must then be
        unregistered and the new one registered by the operator).
    """
    if not comment or any(ch.isspace() for ch in comment):
        raise ConfigError(f"'--comment' must be one word without spaces, got {comment!r}")
    out = Path(out)
    private_path, public_path = out / PRIVATE_KEY, out / PUBLIC_KEY
    existing = [str(p) for p in (private_path, public_path) if p.exists()]
    if existing and not force:
        raise KeyExistsError(f"refusing to overwrite {', '.join(existing)} (use --force to replace the node key)")
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private_bytes = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                      serialization.NoEncryption())
    public_line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write(private_path, lambda handle: handle.write(private_bytes), mode=0o600)
    atomic_write(public_path, lambda handle: handle.write(public_line + b" " + comment.encode() + b"\n"), mode=0o644)
    return NodeKeyPair(private_path, public_path, fingerprint(public_line.decode()))


def fingerprint(public_key_line: str) -> str:
    """The OpenSSH SHA256 fingerprint (``SHA256:...``) of a public key line."""
    try:
        blob = base64.b64decode(public_key_line.split()[1], validate=True)
    except (IndexError, ValueError):
        raise ConfigError("not an OpenSSH public key line (expected '<type> <base64> [comment]')") from None
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m client keygen``."""
    parser.add_argument("--out", type=Path, required=True, help="folder for supernode_key and supernode_key.pub")
    parser.add_argument("--comment", default="fedseg-supernode",
                        help="comment in the public key, e.g. your site id (default fedseg-supernode)")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")


def run(args: argparse.Namespace) -> int:
    """Write the key pair; say which file goes to the operator."""
    keys = make_node_keys(out=args.out, comment=args.comment, force=args.force)
    print(f"private key (stays here, 0600): {keys.private_key}")
    print(f"public key (send to the consortium operator): {keys.public_key}")
    print(f"fingerprint (confirm it with the operator by phone/e-mail): {keys.fingerprint}")
    return 0
