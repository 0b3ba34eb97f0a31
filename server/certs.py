"""``python -m server certs``: the consortium's CA and the SuperLink's TLS certificate.

Writes, into ``--out``:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority. ``ca.crt`` goes
  to every hospital (``flower-supernode --root-certificates``); ``ca.key``
  never leaves the operator's machine.
- ``server.pem`` / ``server.key``: the SuperLink's certificate, signed by the
  CA, with every ``--host`` as a subject alternative name (DNS name or IP).
- ``client-NAME.pem`` / ``client-NAME.key`` / ``client-NAME.p12`` (``--client
  NAME``): a TLS client certificate signed by the CA, for a browser of the
  operator's dashboard when it requires client certificates.

Private keys are EC (NIST P-384), written 0600 from creation on. Existing
files are never overwritten unless ``force`` (or, with ``renew``, only the
server certificate is re-issued from the existing CA: hospitals keep their
``ca.crt``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic import atomic_write
from shared.errors import ConfigError, FedSegError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
CURVE = ec.SECP384R1


CLIENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class CertificateError(FedSegError):
    """Certificates could not be written or an existing CA could not be read."""


@dataclass(frozen=True)
class CertificatePaths:
    """Where :func:`make_certificates` wrote its files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class ClientCertificate:
    """Where :func:`issue_client_certificate` wrote its files."""

    cert: Path
    key: Path
    bundle: Path


def make_certificates(*, out: Path, hosts: list[str], force: bool = False, renew: bool = False,
                      ca_days: int = 3650, server_days: int = 365) -> CertificatePaths:
    """Write a CA (unless ``renew``) and a SuperLink certificate for ``hosts`` into ``out``.

    Parameters
    ----------
    out : Path
        Output folder (created 0700 if missing).
    hosts : list of str
        DNS names and/or IP addresses the SuperLink is reached at (at least one).
    force : bool
        Overwrite existing files (a new CA: every hospital needs the new ``ca.crt``).
    renew : bool
        Keep the existing CA in ``out`` and re-issue only the server certificate.
    ca_days, server_days : int
        Validity periods.
    """
    if not hosts:
        raise ConfigError("'--host' is required at least once (the SuperLink's DNS name or IP)")
    if ca_days < 1 or server_days < 1:
        raise ConfigError("'ca_days' and 'server_days' must be >= 1")
    out = Path(out)
    paths = CertificatePaths(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY)
    if renew:
        ca_key, ca_cert = _load_ca(paths)
        _refuse_overwrite([paths.server_cert, paths.server_key], force=True)
    else:
        _refuse_overwrite([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key], force=force)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca_key = ec.generate_private_key(CURVE())
        ca_cert = _ca_certificate(ca_key, days=ca_days)
        _write_key(paths.ca_key, ca_key)
        _write_cert(paths.ca_cert, ca_cert)
    server_key = ec.generate_private_key(CURVE())
    _write_key(paths.server_key, server_key)
    _write_cert(paths.server_cert, _server_certificate(server_key, ca_key, ca_cert, hosts, days=server_days))
    return paths


def issue_client_certificate(*, out: Path, name: str, force: bool = False, days: int = 365) -> ClientCertificate:
    """Sign a TLS client certificate for ``name`` with the CA in ``out`` (e.g. for ``server dashboard
    --tls-client-ca``).

    Writes ``client-NAME.pem`` and ``client-NAME.key`` (0600), and both in
    ``client-NAME.p12`` (PKCS#12 without a password, 0600) to import into a browser.
    """
    if not CLIENT_NAME.fullmatch(name):
        raise ConfigError(f"'--client' must be 1-64 letters, digits, '.', '_' or '-', got {name!r}")
    out = Path(out)
    ca_key, ca_cert = _load_ca(CertificatePaths(out / CA_CERT, out / CA_KEY, out / SERVER_CERT, out / SERVER_KEY),
                               purpose="--client")
    paths = ClientCertificate(out / f"client-{name}.pem", out / f"client-{name}.key", out / f"client-{name}.p12")
    _refuse_overwrite([paths.cert, paths.key, paths.bundle], force=force)
    key = ec.generate_private_key(CURVE())
    cert = _leaf_certificate(key, ca_key, ca_cert, common_name=name, usage=ExtendedKeyUsageOID.CLIENT_AUTH,
                             days=days)
    _write_key(paths.key, key)
    _write_cert(paths.cert, cert)
    bundle = pkcs12.serialize_key_and_certificates(name.encode(), key, cert, [ca_cert],
                                                   serialization.NoEncryption())
    atomic_write(paths.bundle, lambda handle: handle.write(bundle), mode=0o600)
    return paths


def subject_alternative_names(hosts: list[str]) -> list[x509.GeneralName]:
    """``hosts`` as SAN entries: IP addresses as IPAddress, everything else as DNSName."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        host = host.strip()
        if not host:
            raise ConfigError("'--host' must not be empty")
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _ca_certificate(key: ec.EllipticCurvePrivateKey, *, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseg consortium CA")])
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
                        ca_cert: x509.Certificate, hosts: list[str], *, days: int) -> x509.Certificate:
    return _leaf_certificate(key, ca_key, ca_cert, common_name=hosts[0], usage=ExtendedKeyUsageOID.SERVER_AUTH,
                             days=days, names=subject_alternative_names(hosts))


def _leaf_certificate(key: ec.EllipticCurvePrivateKey, ca_key: ec.EllipticCurvePrivateKey,
                      ca_cert: x509.Certificate, *, common_name: str, usage: x509.ObjectIdentifier, days: int,
                      names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    """A certificate for ``key`` signed by the CA, valid at most as long as the CA, for one ``usage``."""
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA384())


def _load_ca(paths: CertificatePaths, *, purpose: str = "--renew",
             ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    except FileNotFoundError as exc:
        raise CertificateError(f"{purpose} needs the existing CA: {exc.filename} does not exist") from None
    except ValueError as exc:
        raise CertificateError(f"{purpose}: cannot read the CA in {paths.ca_cert.parent} ({exc})") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError(f"{paths.ca_key} is not an EC private key")
    return ca_key, ca_cert


def _refuse_overwrite(paths: list[Path], *, force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertificateError(f"refusing to overwrite {', '.join(existing)} (use --force to replace them)")


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write(path, lambda handle: handle.write(pem), mode=0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    pem = cert.public_bytes(serialization.Encoding.PEM)
    atomic_write(path, lambda handle: handle.write(pem), mode=0o644)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``python -m server certs``."""
    parser.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    parser.add_argument("--host", action="append", default=[], metavar="NAME",
                        help="DNS name or IP address of the SuperLink (repeat for several; required unless only "
                             "--client certificates are issued from the CA already in --out)")
    parser.add_argument("--client", action="append", default=[], metavar="NAME",
                        help="also sign a TLS client certificate NAME with the CA in --out (client-NAME.pem/.key/"
                             ".p12), e.g. for a browser of 'server dashboard --tls-client-ca' (repeatable)")
    parser.add_argument("--force", action="store_true", help="overwrite existing files (makes a NEW CA)")
    parser.add_argument("--renew", action="store_true",
                        help="keep the CA in --out, re-issue only server.pem/server.key (certificate rotation)")
    parser.add_argument("--server-days", type=int, default=365, help="server certificate validity (default 365)")


def run(args: argparse.Namespace) -> int:
    """Write the certificates; print what goes where."""
    if args.host or not args.client:
        paths = make_certificates(out=args.out, hosts=args.host, force=args.force, renew=args.renew,
                                  server_days=args.server_days)
        print(f"server certificate for {', '.join(args.host)}: {paths.server_cert} (key {paths.server_key}, 0600)")
        print(f"CA certificate (give to every hospital): {paths.ca_cert}")
        print(f"CA private key (never leaves this machine): {paths.ca_key}")
    for name in args.client:
        client = issue_client_certificate(out=args.out, name=name, force=args.force, days=args.server_days)
        print(f"client certificate for {name}: {client.cert} (key {client.key}, 0600; "
              f"both in {client.bundle} to import into a browser)")
    return 0
