"""``tuneqn certs``: a small private CA and the certificates for mutual TLS in a lab.

One CA (``ca.pem``/``ca.key``) signs one agent server certificate (``agent.pem``/``agent.key``,
with a subjectAltName for every host the agents are reached by) and one controller client
certificate (``controller.pem``/``controller.key``). Agents run with ``--tls-cert agent.pem
--tls-key agent.key --tls-ca ca.pem``; the controller's ``[[agents]]`` get ``tls_ca = ca.pem``,
``tls_cert = controller.pem`` and ``tls_key = controller.key``. Keys are ECDSA P-256 and are
written with mode 0600; nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tuneqn.controller.errors import UserError
from tuneqn.controller.files import atomic_write_bytes

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

log = logging.getLogger(__name__)

DEFAULT_AGENT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
#: Every file ``write_lab_certs`` writes, in order.
FILES = ("ca.pem", "ca.key", "agent.pem", "agent.key", "controller.pem", "controller.key")
_DNS_NAME = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates are valid from a little before now


@dataclass(frozen=True)
class LabCerts:
    """Paths of the files written by :func:`write_lab_certs`."""

    ca_cert: Path
    ca_key: Path
    agent_cert: Path
    agent_key: Path
    controller_cert: Path
    controller_key: Path


def _san_entries(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """subjectAltName entries: IP addresses as IPAddress, other names as DNSName (UserError if invalid)."""
    from cryptography import x509

    entries: list[x509.GeneralName] = []
    for host in hosts:
        h = host.strip()
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
            continue
        except ValueError:
            pass
        if not h or len(h) > 253 or not _DNS_NAME.match(h) or h.rstrip(".").rsplit(".", 1)[-1].isdigit():
            # (an all-digit last label is a mistyped IP address, not a host name)
            raise UserError(f"--agent-host: {host!r} is neither an IP address nor a DNS name")
        entries.append(x509.DNSName(h.rstrip(".").lower()))
    if not entries:
        raise UserError("--agent-host: give at least one host name or IP address")
    return entries


def _key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _self_signed(key: EllipticCurvePrivateKey, name: x509.Name, start: dt.datetime,
                 end: dt.datetime) -> x509.Certificate:
    """A self-signed CA certificate that signs leaf certificates only (path length 0)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, EllipticCurvePrivateKey]:
    """The CA certificate and key of an earlier ``tuneqn certs`` folder (``--ca-from``); UserError if unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

    ca_dir = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise UserError(f"--ca-from: {exc.filename}: file not found (the folder of an earlier "
                        "'tuneqn certs', with ca.pem and ca.key)") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"--ca-from: {ca_dir}: ca.pem/ca.key are not a PEM certificate and unencrypted key "
                        f"({exc})") from None
    if not isinstance(key, EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise UserError(f"--ca-from: {ca_dir}: ca.key is not the key of ca.pem")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise UserError(f"--ca-from: {ca_dir}: ca.pem is not a CA certificate")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
        raise UserError(f"--ca-from: {ca_dir}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def build_lab_certs(agent_hosts: Sequence[str] = DEFAULT_AGENT_HOSTS, days: int = DEFAULT_DAYS,
                    name: str = "tuneqn lab",
                    ca: tuple[x509.Certificate, EllipticCurvePrivateKey] | None = None) -> dict[str, bytes]:
    """The PEM contents of :data:`FILES`: a CA (``ca``, an existing one, when given: then no
    ``ca.key`` is returned), an agent server and a controller client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise UserError(f"--days: must be at least 1, got {days}")
    sans = _san_entries(agent_hosts)
    now = dt.datetime.now(dt.timezone.utc)
    start, end = now - _CLOCK_SKEW, now + dt.timedelta(days=days)

    def subject(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, name),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    if ca is not None:
        ca_cert, ca_key = ca
        ca_name = ca_cert.subject
        end = min(end, ca_cert.not_valid_after_utc)  # a leaf never outlives its CA
    else:
        ca_key = _key()
        ca_name = subject(f"{name} CA")
        ca_cert = _self_signed(ca_key, ca_name, start, end)

    def leaf(cn: str, usage: x509.ObjectIdentifier,
             san: list[x509.GeneralName] | None) -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
        key = _key()
        builder = (
            x509.CertificateBuilder().subject_name(subject(cn)).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    from cryptography.hazmat.primitives.serialization import Encoding

    agent_key, agent_cert = leaf(f"{name} agent", ExtendedKeyUsageOID.SERVER_AUTH, sans)
    ctl_key, ctl_cert = leaf(f"{name} controller", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    return {
        "ca.pem": ca_cert.public_bytes(Encoding.PEM),
        **({} if ca is not None else {"ca.key": _key_pem(ca_key)}),
        "agent.pem": agent_cert.public_bytes(Encoding.PEM),
        "agent.key": _key_pem(agent_key),
        "controller.pem": ctl_cert.public_bytes(Encoding.PEM),
        "controller.key": _key_pem(ctl_key),
    }


def write_lab_certs(out_dir: Path, agent_hosts: Sequence[str] = DEFAULT_AGENT_HOSTS, days: int = DEFAULT_DAYS,
                    force: bool = False, ca_from: Path | None = None) -> LabCerts:
    """Create the CA, agent and controller certificates in ``out_dir`` (keys mode 0600).

    With ``ca_from`` (the folder of an earlier run) its CA signs the new certificates, so a host
    added to the lab joins without touching the others; ``out_dir`` then gets a copy of ``ca.pem``
    but no ``ca.key`` (``LabCerts.ca_key`` points into ``ca_from``).
    Raises :class:`UserError` (before writing anything) when ``out_dir`` is a file, a host is
    invalid, ``days`` < 1, the CA of ``ca_from`` is unusable, or a file to write exists and
    ``force`` is false.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; give a folder for the certificates")
    if ca_from is not None and Path(ca_from).resolve() == out_dir.resolve():
        raise UserError(f"--ca-from: {ca_from} is OUT_DIR itself; give a new folder for the added host's files")
    ca = load_ca(Path(ca_from)) if ca_from is not None else None
    names = [f for f in FILES if not (ca is not None and f == "ca.key")]
    if not force:
        existing = [f for f in names if (out_dir / f).exists() or (out_dir / f).is_symlink()]
        if existing:
            raise UserError(f"{out_dir / existing[0]} exists ({len(existing)} of the files); "
                            "give another folder or --force to replace them")
    contents = build_lab_certs(agent_hosts, days, ca=ca)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname in names:
        path = out_dir / fname  # os.replace swaps a symlink itself, never writes through it
        atomic_write_bytes(path, contents[fname], 0o600 if fname.endswith(".key") else 0o644)
    log.info("wrote %s in %s", ", ".join(names), out_dir)
    paths = [out_dir / f for f in FILES]
    if ca_from is not None:
        paths[1] = Path(ca_from) / "ca.key"
    return LabCerts(*paths)
