"""The cluster's x509 credentials for NBD over TLS (`--nbd-tls on|require`).

Made at `up` in `<data-dir>/tls/`, in the layout GnuTLS-based clients read from a directory
(libnbd's `tls-certificates=DIR`, qemu's `tls-creds-x509,dir=DIR`):

    ca-cert.pem       the cluster's own CA: what a client trusts
    ca-key.pem        its key (0600), kept to issue the server certificate again
    server-cert.pem   the server's certificate, for every node's NBD address (and localhost)
    server-key.pem    (0600)
    client-cert.pem   a client certificate, for clients that want to present one
    client-key.pem    (0600)

Every guest serves with the same server certificate, so a takeover keeps TLS transparent: a
client that reconnects to the same address after its node failed meets the same certificate.
Made once and kept across `up`s (clients keep trusting the same CA) unless a file is missing,
expired, or no longer names every node's address.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

from vmemu.privfs import ensure_private_dir, write_atomic

CA, CA_KEY = "ca-cert.pem", "ca-key.pem"
SERVER, SERVER_KEY = "server-cert.pem", "server-key.pem"
CLIENT, CLIENT_KEY = "client-cert.pem", "client-key.pem"
VALID_DAYS = 3650


def tls_dir(data_dir: Path) -> Path:
    return data_dir / "tls"


def ensure(data_dir: Path, addresses: list[str], cluster: str) -> Path:
    """The credentials in `<data-dir>/tls/`, made (or made again) if they do not fit."""
    d = ensure_private_dir(tls_dir(data_dir), "TLS dir")
    if _fits(d, addresses):
        return d
    _make(d, addresses, cluster)
    return d


def _fits(d: Path, addresses: list[str]) -> bool:
    from cryptography import x509

    try:
        if not all((d / f).is_file() for f in (CA, CA_KEY, SERVER, SERVER_KEY, CLIENT, CLIENT_KEY)):
            return False
        cert = x509.load_pem_x509_certificate((d / SERVER).read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        left = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
        return set(addresses) <= ips and left > datetime.timedelta(days=30)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False


def _make(d: Path, addresses: list[str], cluster: str) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vmemu"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    def builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey
                ) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name(f"vmemu cluster CA ({cluster})")
    ca = (builder(ca_name, ca_name, ca_key)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
             ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (builder(name(cn), ca_name, key)
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    san = [x509.DNSName("localhost")] + [x509.IPAddress(ipaddress.ip_address(a))
                                         for a in sorted(set(addresses) | {"127.0.0.1"})]
    server, server_key = leaf(f"vmemu NBD server ({cluster})", ExtendedKeyUsageOID.SERVER_AUTH, san)
    client, client_key = leaf(f"vmemu NBD client ({cluster})", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    pem = serialization.Encoding.PEM
    for fname, data in ((CA_KEY, key_pem(ca_key)), (SERVER_KEY, key_pem(server_key)),
                        (CLIENT_KEY, key_pem(client_key)), (CA, ca.public_bytes(pem)),
                        (SERVER, server.public_bytes(pem)), (CLIENT, client.public_bytes(pem))):
        write_atomic(d / fname, data, sync=True)
        os.chmod(d / fname, 0o600 if fname.endswith("key.pem") else 0o644)
