"""Throwaway certificates for the TLS tests, made at test time (nothing secret is committed): a CA,
a server certificate for localhost and 127.0.0.1, and a client certificate, all PEM files."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvgate.tls import TlsBundle

# Both names a local client may dial: grpc checks the target's host (127.0.0.1, an IP SAN), Envoy
# sends SNI and checks the DNS SAN (localhost).
SERVER_SANS: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]


@dataclass(frozen=True)
class Issuer:
    name: x509.Name
    key: ec.EllipticCurvePrivateKey
    cert_path: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _sign(builder: x509.CertificateBuilder, issuer_key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    now = datetime.datetime.now(datetime.timezone.utc)
    # Backdated a little: clocks of the processes checking it need not agree to the second.
    cert = (builder.serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .sign(issuer_key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_ca(directory: Path, name: str = "kvgate test CA") -> Issuer:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(_name(name))
               .public_key(key.public_key())
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True))
    slug = name.replace(" ", "-")
    return Issuer(_name(name), key, _sign(builder, key, directory / f"{slug}.pem"))


def make_leaf(ca: Issuer, directory: Path, common_name: str, *, server: bool,
              sans: list[x509.GeneralName] | None = None) -> tuple[Path, Path]:
    """A certificate (and its key) signed by `ca`, for a server (with `sans`) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca.name)
               .public_key(key.public_key())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _sign(builder, ca.key, directory / f"{common_name}.pem")
    return cert, _write_key(key, directory / f"{common_name}.key")


def make_bundle(directory: Path, *, mutual: bool = True) -> TlsBundle:
    """A CA, a server certificate for localhost/127.0.0.1 and (for mutual TLS) a client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = make_ca(directory)
    server_cert, server_key = make_leaf(ca, directory, "kvgate-server", server=True, sans=SERVER_SANS)
    client_cert, client_key = make_leaf(ca, directory, "kvgate-client", server=False) if mutual else (None, None)
    return TlsBundle(ca=ca.cert_path, server_cert=server_cert, server_key=server_key,
                     client_cert=client_cert, client_key=client_key)
