"""Operator certificates (python -m server certs) and hospital node keys (python -m client keygen)."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from client.__main__ import main as client_main
from client.commands.keygen import KeyExistsError, fingerprint, make_node_keys
from server.__main__ import main as server_main
from server.certs import CertificateError, make_certificates


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_certs_sign_a_server_certificate_for_every_host(tmp_path):
    paths = make_certificates(out=tmp_path / "certs", hosts=["superlink.example.org", "10.0.0.7"])
    ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.7")]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server_key = serialization.load_pem_private_key(paths.server_key.read_bytes(), password=None)
    assert server_key.public_key().public_numbers() == server.public_key().public_numbers()
    assert _mode(paths.ca_key) == 0o600 and _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_cert) == 0o644


def test_certs_refuse_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "certs"
    assert server_main(["certs", "--out", str(out), "--host", "localhost"]) == 0
    first = (out / "ca.crt").read_bytes()
    assert server_main(["certs", "--out", str(out), "--host", "localhost"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err and (out / "ca.crt").read_bytes() == first
    assert server_main(["certs", "--out", str(out), "--host", "localhost", "--force"]) == 0
    assert (out / "ca.crt").read_bytes() != first


def test_renew_reissues_the_server_certificate_under_the_same_ca(tmp_path):
    paths = make_certificates(out=tmp_path, hosts=["old.example.org"])
    ca_before, server_before = paths.ca_cert.read_bytes(), paths.server_cert.read_bytes()
    make_certificates(out=tmp_path, hosts=["new.example.org"], renew=True)
    assert paths.ca_cert.read_bytes() == ca_before and paths.server_cert.read_bytes() != server_before
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    server.verify_directly_issued_by(x509.load_pem_x509_certificate(ca_before))
    with pytest.raises(CertificateError, match="needs the existing CA"):
        make_certificates(out=tmp_path / "empty", hosts=["x"], renew=True)


def test_certs_need_a_host(tmp_path):
    with pytest.raises(ValueError, match="--host"):
        make_certificates(out=tmp_path, hosts=[])


def test_node_keys_are_what_flower_node_auth_loads(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    keys = make_node_keys(out=tmp_path / "keys", comment="hospital-a")
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    line = keys.public_key.read_text()
    assert line.startswith("ecdsa-sha2-nistp384 ") and line.strip().endswith(" hospital-a")
    assert try_load_public_key(keys.public_key)  # Flower's own loader for `flwr supernode register`
    public = serialization.load_ssh_public_key(line.encode())
    assert public.public_numbers() == private.public_key().public_numbers()
    assert _mode(keys.private_key) == 0o600 and _mode(keys.public_key) == 0o644
    assert keys.fingerprint == fingerprint(line) and keys.fingerprint.startswith("SHA256:")


def test_keygen_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "keys"
    assert client_main(["keygen", "--out", str(out)]) == 0
    first = (out / "supernode_key").read_bytes()
    assert client_main(["keygen", "--out", str(out)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (out / "supernode_key").read_bytes() == first
    with pytest.raises(KeyExistsError):
        make_node_keys(out=out)
    make_node_keys(out=out, force=True)
    assert (out / "supernode_key").read_bytes() != first


def test_two_keygens_give_different_keys(tmp_path):
    a, b = make_node_keys(out=tmp_path / "a"), make_node_keys(out=tmp_path / "b")
    assert a.fingerprint != b.fingerprint
