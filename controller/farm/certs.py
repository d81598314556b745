"""``tuneqn certs``: a small private CA and the certificates for mutual TLS in a lab.

One key pair per agent host (``--host NAME``, :func:`write_host_certs`): the lab folder holds
the CA (``ca.pem``/``ca.key``, made once and kept) and the one controller client certificate
(``controller.pem``/``controller.key``); each host gets ``hosts/NAME/`` with its own server
certificate (``agent.pem``/``agent.key``, subjectAltName = its name and aliases) and a copy of
``ca.pem``. Adding a host later writes only that host's folder; no other file is touched.
Agents run with ``--tls-cert agent.pem --tls-key agent.key --tls-ca ca.pem`` from their folder;
the controller's ``[[agents]]`` get ``tls_ca = ca.pem``, ``tls_cert = controller.pem`` and
``tls_key = controller.key``. The older layout (:func:`write_lab_certs`, ``--agent-host``) writes
one ``agent.pem``/``agent.key`` shared by every host it names. Keys are ECDSA P-256 and are
written with mode 0600; nothing is overwritten unless asked (``--force``).
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

from tuneqn.controller.common.errors import UserError
from tuneqn.controller.common.files import atomic_write_bytes

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

log = logging.getLogger(__name__)

DEFAULT_AGENT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_DAYS = 365
#: Every file ``write_lab_certs`` writes, in order.
FILES = ("ca.pem", "ca.key", "agent.pem", "agent.key", "controller.pem", "controller.key")
#: The lab folder's own files in the per-host layout (:func:`write_host_certs`).
LAB_FILES = ("ca.pem", "ca.key", "controller.pem", "controller.key")
#: The files of one host, in ``hosts/NAME/`` (the folder to copy to that host).
HOST_FILES = ("agent.pem", "agent.key", "ca.pem")
HOSTS_DIR = "hosts"
DEFAULT_ORG = "tuneqn lab"
_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
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


def _key_usage(ca: bool) -> x509.KeyUsage:
    """Digital signatures, and for the CA signing certificates and CRLs: nothing else."""
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _san_entries(hosts: Sequence[str], flag: str = "--agent-host") -> list[x509.GeneralName]:
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
            raise UserError(f"{flag}: {host!r} is neither an IP address nor a DNS name")
        entries.append(x509.DNSName(h.rstrip(".").lower()))
    if not entries:
        raise UserError(f"{flag}: give at least one host name or IP address")
    return entries


def _key() -> EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _self_signed(
    key: EllipticCurvePrivateKey, name: x509.Name, start: dt.datetime, end: dt.datetime
) -> x509.Certificate:
    """A self-signed CA certificate that signs leaf certificates only (path length 0)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def load_ca(ca_dir: Path, flag: str = "--ca-from") -> tuple[x509.Certificate, EllipticCurvePrivateKey]:
    """The CA certificate and key of an earlier ``tuneqn certs`` folder (``--ca-from``); UserError
    (naming ``flag``) if unusable."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

    ca_dir = Path(ca_dir)
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise UserError(
            f"{flag}: {exc.filename}: file not found (the folder of an earlier 'tuneqn certs', with ca.pem and ca.key)"
        ) from None
    except (ValueError, TypeError) as exc:
        raise UserError(
            f"{flag}: {ca_dir}: ca.pem/ca.key are not a PEM certificate and unencrypted key ({exc})"
        ) from None
    if not isinstance(key, EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise UserError(f"{flag}: {ca_dir}: ca.key is not the key of ca.pem")
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise UserError(f"{flag}: {ca_dir}: ca.pem is not a CA certificate")
    if cert.not_valid_after_utc <= dt.datetime.now(dt.UTC):
        raise UserError(f"{flag}: {ca_dir}: the CA expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return cert, key


def _subject(org: str, cn: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: EllipticCurvePrivateKey,
    subject: x509.Name,
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None,
    start: dt.datetime,
    end: dt.datetime,
) -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
    """A fresh key and its leaf certificate (server or client ``usage``) signed by the CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    key = _key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def build_lab_certs(
    agent_hosts: Sequence[str] = DEFAULT_AGENT_HOSTS,
    days: int = DEFAULT_DAYS,
    name: str = DEFAULT_ORG,
    ca: tuple[x509.Certificate, EllipticCurvePrivateKey] | None = None,
) -> dict[str, bytes]:
    """The PEM contents of :data:`FILES`: a CA (``ca``, an existing one, when given: then no
    ``ca.key`` is returned), an agent server and a controller client certificate."""
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if days < 1:
        raise UserError(f"--days: must be at least 1, got {days}")
    sans = _san_entries(agent_hosts)
    now = dt.datetime.now(dt.UTC)
    start, end = now - _CLOCK_SKEW, now + dt.timedelta(days=days)

    if ca is not None:
        ca_cert, ca_key = ca
        end = min(end, ca_cert.not_valid_after_utc)  # a leaf never outlives its CA
    else:
        ca_key = _key()
        ca_cert = _self_signed(ca_key, _subject(name, f"{name} CA"), start, end)

    from cryptography.hazmat.primitives.serialization import Encoding

    agent_key, agent_cert = _leaf(
        ca_cert, ca_key, _subject(name, f"{name} agent"), ExtendedKeyUsageOID.SERVER_AUTH, sans, start, end
    )
    ctl_key, ctl_cert = _leaf(
        ca_cert, ca_key, _subject(name, f"{name} controller"), ExtendedKeyUsageOID.CLIENT_AUTH, None, start, end
    )
    return {
        "ca.pem": ca_cert.public_bytes(Encoding.PEM),
        **({} if ca is not None else {"ca.key": _key_pem(ca_key)}),
        "agent.pem": agent_cert.public_bytes(Encoding.PEM),
        "agent.key": _key_pem(agent_key),
        "controller.pem": ctl_cert.public_bytes(Encoding.PEM),
        "controller.key": _key_pem(ctl_key),
    }


def write_lab_certs(
    out_dir: Path,
    agent_hosts: Sequence[str] = DEFAULT_AGENT_HOSTS,
    days: int = DEFAULT_DAYS,
    force: bool = False,
    ca_from: Path | None = None,
) -> LabCerts:
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
            raise UserError(
                f"{out_dir / existing[0]} exists ({len(existing)} of the files); "
                "give another folder or --force to replace them"
            )
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


@dataclass(frozen=True)
class HostCerts:
    """One agent host's files in ``hosts/NAME/`` (:func:`write_host_certs`)."""

    name: str
    names: tuple[str, ...]  # the certificate's subjectAltNames: the name, then its aliases
    folder: Path
    cert: Path
    key: Path
    ca_cert: Path


@dataclass(frozen=True)
class LabHosts:
    """What :func:`write_host_certs` wrote (``created``) and the lab's files."""

    ca_cert: Path
    ca_key: Path
    controller_cert: Path
    controller_key: Path
    hosts: tuple[HostCerts, ...]
    created: tuple[Path, ...]  # every file written now, in order


def parse_host(text: str) -> tuple[str, tuple[str, ...]]:
    """``--host NAME[,ALIAS...]``: the host's name (its folder) and every name its certificate
    carries (the name first); UserError when a name is neither an IP address nor a DNS name."""
    names = tuple(part.strip() for part in text.split(","))
    if not names[0]:
        raise UserError(f"--host: {text!r} has no host name before its aliases")
    _san_entries(names, "--host")  # validates every name
    name = names[0].strip("[]").rstrip(".").lower()
    return name, tuple(dict.fromkeys(n.strip("[]").rstrip(".").lower() for n in names if n))


def write_host_certs(out_dir: Path, hosts: Sequence[str], days: int = DEFAULT_DAYS, force: bool = False) -> LabHosts:
    """One key pair per agent host: ``out_dir/hosts/NAME/{agent.pem,agent.key,ca.pem}``.

    The CA and the controller's client certificate in ``out_dir`` are made when missing and
    kept (never rewritten) when there: adding a host later writes only that host's folder.
    ``hosts`` are ``NAME[,ALIAS...]`` (subjectAltName = the name and its aliases). A host whose
    files exist is refused unless ``force`` (which replaces that host's files only). Raises
    :class:`UserError`, before writing anything, for bad names or days, a duplicate host, an
    unusable CA, or a controller certificate without its key (or the reverse).
    """
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: is a file; give a folder for the certificates")
    if days < 1:
        raise UserError(f"--days: must be at least 1, got {days}")
    parsed = [parse_host(h) for h in hosts]
    if not parsed:
        raise UserError("--host: give at least one host name or IP address")
    seen: set[str] = set()
    for name, _ in parsed:
        if name in seen:
            raise UserError(f"--host: {name!r} is given twice")
        seen.add(name)

    def present(path: Path) -> bool:
        return path.exists() or path.is_symlink()

    now = dt.datetime.now(dt.UTC)
    start, end = now - _CLOCK_SKEW, now + dt.timedelta(days=days)
    writes: dict[Path, bytes] = {}
    if present(out_dir / "ca.pem") or present(out_dir / "ca.key"):
        ca_cert, ca_key = load_ca(out_dir, "OUT_DIR")
        end = min(end, ca_cert.not_valid_after_utc)  # a leaf never outlives its CA
    else:
        stale = [f for f in ("controller.pem", "controller.key") if present(out_dir / f)]
        if stale:
            raise UserError(
                f"{out_dir / stale[0]} exists but the CA that signed it (ca.pem, ca.key) does not; give another folder"
            )
        ca_key = _key()
        ca_cert = _self_signed(ca_key, _subject(DEFAULT_ORG, f"{DEFAULT_ORG} CA"), start, end)
        writes[out_dir / "ca.pem"] = ca_cert.public_bytes(Encoding.PEM)
        writes[out_dir / "ca.key"] = _key_pem(ca_key)
    ca_pem = ca_cert.public_bytes(Encoding.PEM)
    ctl = [present(out_dir / f) for f in ("controller.pem", "controller.key")]
    if ctl == [True, False] or ctl == [False, True]:
        have, missing = ("controller.pem", "controller.key") if ctl[0] else ("controller.key", "controller.pem")
        raise UserError(f"{out_dir / have} exists without {missing}; restore it or give another folder")
    if not any(ctl):
        ctl_key, ctl_cert = _leaf(
            ca_cert,
            ca_key,
            _subject(DEFAULT_ORG, f"{DEFAULT_ORG} controller"),
            ExtendedKeyUsageOID.CLIENT_AUTH,
            None,
            start,
            end,
        )
        writes[out_dir / "controller.pem"] = ctl_cert.public_bytes(Encoding.PEM)
        writes[out_dir / "controller.key"] = _key_pem(ctl_key)

    results: list[HostCerts] = []
    for name, names in parsed:
        folder = out_dir / HOSTS_DIR / name
        existing = [f for f in HOST_FILES if present(folder / f)]
        if existing and not force:
            raise UserError(
                f"{folder / existing[0]} exists (host {name!r} has its certificate); "
                "give a new host, or --force to replace that host's files only"
            )
        key, cert = _leaf(
            ca_cert,
            ca_key,
            _subject(DEFAULT_ORG, f"{DEFAULT_ORG} agent {name}"),
            ExtendedKeyUsageOID.SERVER_AUTH,
            _san_entries(names, "--host"),
            start,
            end,
        )
        writes[folder / "agent.pem"] = cert.public_bytes(Encoding.PEM)
        writes[folder / "agent.key"] = _key_pem(key)
        writes[folder / "ca.pem"] = ca_pem
        results.append(HostCerts(name, names, folder, folder / "agent.pem", folder / "agent.key", folder / "ca.pem"))
    for path, data in writes.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, data, 0o600 if path.name.endswith(".key") else 0o644)
    log.info("wrote %s", ", ".join(str(p) for p in writes))
    return LabHosts(
        out_dir / "ca.pem",
        out_dir / "ca.key",
        out_dir / "controller.pem",
        out_dir / "controller.key",
        tuple(results),
        tuple(writes),
    )
