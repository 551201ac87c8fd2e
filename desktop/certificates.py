"""Fluidity's private PKI: one CA, one server and one client certificate for mutual TLS.

The tunnel trusts nothing but this CA, so the whole trust story lives in one folder:
ca.crt, ca.key, server.crt, server.key, client.crt, client.key. Only the machine that ran
``init`` holds ca.key; a tunnel server needs ca.crt + server.*, an agent ca.crt + client.*,
and ``bundle``/``import`` move exactly those sets between machines. Users reach all of this
through ``fluidity-certs`` (:func:`main`); anything wrong comes back as a one-line
:class:`CertificateError` message or a list of problems, never a traceback.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import math
import os
import re
import secrets
import stat
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    PrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from server.config_loader import default_cert_dir, program_parser
from server.errors import FluidityError
from server.tls import key_file_problem

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"
CLIENT_CERT = "client.crt"
CLIENT_KEY = "client.key"
ALL_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
#: What an agent machine needs; never includes ca.key.
CLIENT_BUNDLE = (CA_CERT, CLIENT_CERT, CLIENT_KEY)
#: What a tunnel server needs; the server never needs ca.key either.
SERVER_BUNDLE = (CA_CERT, SERVER_CERT, SERVER_KEY)

#: The name agents check the server certificate against. The server's IP changes on every
#: Fargate start, so agents verify this fixed name instead of the address they dial.
SERVER_TLS_NAME = "fluidity-server"
DEFAULT_SERVER_NAMES = (SERVER_TLS_NAME, "localhost")
DEFAULT_SERVER_IPS = ("127.0.0.1",)
DEFAULT_CLIENT_NAME = "fluidity-agent"
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 825
#: Certificates this close to expiry get a "renew soon" warning.
EXPIRY_WARNING_DAYS = 14
#: New certificates start a little in the past so a peer with a slow clock accepts them.
CLOCK_SKEW = timedelta(minutes=5)
#: Certificates and keys are a few hundred bytes; anything larger in a bundle is not one.
MAX_BUNDLE_MEMBER_BYTES = 64 * 1024

PROG = "fluidity-certs"
LeafRole = Literal["server", "client"]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_SIGNING_KEY_TYPES = (
    ec.EllipticCurvePrivateKey,
    rsa.RSAPrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)


class CertificateError(FluidityError):
    """A certificate task cannot be done; the message is one line a user can act on."""


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate together with the private key it certifies."""

    certificate: x509.Certificate
    private_key: CertificateIssuerPrivateKeyTypes


@dataclass(frozen=True)
class CertificateInfo:
    """What ``show`` tells a user about one certificate file."""

    file: str
    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: datetime
    not_after: datetime
    days_to_expiry: int
    key_file: str | None


@dataclass(frozen=True)
class _LeafFiles:
    role: LeafRole
    cert: str
    key: str
    usage: x509.ObjectIdentifier
    usage_name: str


_LEAVES: dict[LeafRole, _LeafFiles] = {
    "server": _LeafFiles("server", SERVER_CERT, SERVER_KEY, ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
    "client": _LeafFiles("client", CLIENT_CERT, CLIENT_KEY, ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
}
_RENEW_LEAF_HINT = "renew it with `fluidity-certs renew` on the machine that holds ca.key"
_RENEW_CA_HINT = "create a new CA with `fluidity-certs init --force`"


# --------------------------------------------------------------------------- issuing


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _signing_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    """EdDSA keys hash internally and must be given no digest."""
    return None if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()


def _validity(
    now: datetime, days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    if days < 1:
        raise CertificateError(f"validity must be at least 1 day, not {days}")
    start = not_before if not_before is not None else now - CLOCK_SKEW
    end = not_after if not_after is not None else now + timedelta(days=days)
    if end <= start:
        raise CertificateError("a certificate must end after it starts")
    return start, end


def generate_ca(
    common_name: str | None = None,
    *,
    days: int = CA_VALIDITY_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    now: datetime | None = None,
) -> IssuedCertificate:
    """A new self-signed CA that may sign leaves only (pathlen 0), with a fresh P-256 key."""
    now = now if now is not None else _utcnow()
    start, end = _validity(now, days, not_before, not_after)
    key = ec.generate_private_key(ec.SECP256R1())
    cn = common_name or f"Fluidity CA {secrets.token_hex(4)}"
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fluidity"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return IssuedCertificate(cert, key)


def issue_leaf(
    ca: IssuedCertificate,
    role: LeafRole,
    subject: str | x509.Name,
    *,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str | IPAddress] = (),
    days: int = LEAF_VALIDITY_DAYS,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    now: datetime | None = None,
) -> IssuedCertificate:
    """A server or client certificate signed by ``ca``, with a fresh P-256 key.

    Without an explicit ``not_after`` the certificate never outlives its CA, since a chain
    stops verifying the moment the CA expires anyway.
    """
    now = now if now is not None else _utcnow()
    start, end = _validity(now, days, not_before, not_after)
    if not_after is None:
        end = min(end, ca.certificate.not_valid_after_utc)
    if isinstance(subject, str):
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([_LEAVES[role].usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(_authority_key_id(ca), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca.private_key, _signing_hash(ca.private_key))
    return IssuedCertificate(cert, key)


def _authority_key_id(ca: IssuedCertificate) -> x509.AuthorityKeyIdentifier:
    """Copy the CA's own SKI: OpenSSL skips an issuer whose SKI differs from the leaf's AKI."""
    try:
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def server_dns_names(names: Iterable[str] | None = None) -> list[str]:
    """Validated DNS names for the server certificate, always including SERVER_TLS_NAME."""
    chosen = [n.strip().lower() for n in names] if names else list(DEFAULT_SERVER_NAMES)
    for name in chosen:
        if is_ip_address(name):
            raise CertificateError(f"server name {name!r} is an IP address; pass it with --server-ip")
        if not _HOSTNAME.match(name):
            raise CertificateError(f"server name {name!r} is not a valid DNS name")
    return list(dict.fromkeys([SERVER_TLS_NAME, *chosen]))


def server_ip_addresses(ips: Iterable[str] | None = None) -> list[IPAddress]:
    """Validated IP addresses for the server certificate (DEFAULT_SERVER_IPS when none given)."""
    chosen = list(ips) if ips else list(DEFAULT_SERVER_IPS)
    parsed: list[IPAddress] = []
    for ip in chosen:
        try:
            parsed.append(ipaddress.ip_address(ip.strip()))
        except ValueError:
            raise CertificateError(f"server IP {ip!r} is not an IP address") from None
    return list(dict.fromkeys(parsed))


def is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- files


def certificate_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key: PrivateKeyTypes) -> bytes:
    """Unencrypted PKCS8: the tunnel starts unattended, so file permissions protect the key."""
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _mode_for(name: str) -> int:
    return 0o600 if name.endswith(".key") else 0o644


def _write_file(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write through a temp file created with ``mode``, so a key is never briefly readable."""
    if not path.parent.is_dir():
        raise CertificateError(f"cannot write {path}: folder {path.parent} does not exist")
    if not overwrite and path.exists():
        raise CertificateError(f"{path} already exists; pass --force to replace it")
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _write_files(directory: Path, contents: Mapping[str, bytes], *, force: bool) -> list[Path]:
    """Write a set of files, refusing before touching anything if one exists and not ``force``."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not force:
        for name in contents:
            if (directory / name).exists():
                raise CertificateError(f"{directory / name} already exists; pass --force to replace it")
    for name, data in contents.items():
        _write_file(directory / name, data, _mode_for(name), overwrite=True)
    return [directory / name for name in contents]


def write_certificate(path: str | os.PathLike[str], cert: x509.Certificate, *, force: bool = False) -> None:
    _write_file(Path(path), certificate_pem(cert), 0o644, overwrite=force)


def write_private_key(path: str | os.PathLike[str], key: PrivateKeyTypes, *, force: bool = False) -> None:
    """Write a key readable by its owner only (mode 0600 from the moment it exists)."""
    _write_file(Path(path), private_key_pem(key), 0o600, overwrite=force)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{path} does not exist") from None
    except OSError as exc:
        raise CertificateError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse_certificate(data: bytes, label: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        raise CertificateError(f"{label} is not a valid PEM certificate") from None


def _parse_private_key(data: bytes, label: str) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(
            f"{label} is protected by a password; Fluidity needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(f"{label} is not a valid PEM private key") from None


def load_certificate(path: str | os.PathLike[str]) -> x509.Certificate:
    return _parse_certificate(_read(Path(path)), str(path))


def load_private_key(path: str | os.PathLike[str]) -> PrivateKeyTypes:
    return _parse_private_key(_read(Path(path)), str(path))


def _existing_dir(cert_dir: str | os.PathLike[str]) -> Path:
    directory = Path(cert_dir)
    if not directory.is_dir():
        raise CertificateError(
            f"certificate folder {directory} does not exist; run `{PROG} init` or `{PROG} import`"
        )
    return directory


# --------------------------------------------------------------------------- checks


def key_matches_certificate(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _days_left(cert: x509.Certificate, now: datetime) -> int:
    """Days left, started days counted (a new 825-day certificate says 825 all through its first day)."""
    return math.ceil((cert.not_valid_after_utc - now).total_seconds() / 86400)


def _when(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M} UTC"


def _names(cert: x509.Certificate) -> tuple[list[str], list[IPAddress]]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    ips = [ip for ip in sans.get_values_for_type(x509.IPAddress) if not isinstance(ip, IPNetwork)]
    return sans.get_values_for_type(x509.DNSName), ips


def _has_usage(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    try:
        return usage in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _validity_problems(cert: x509.Certificate, label: str, now: datetime, hint: str) -> list[str]:
    if now < cert.not_valid_before_utc:
        return [
            f"{label} is not valid until {_when(cert.not_valid_before_utc)} (check this computer's clock)"
        ]
    if now > cert.not_valid_after_utc:
        return [f"{label} expired on {_when(cert.not_valid_after_utc)}; {hint}"]
    return []


def _collect(problems: list[str], parse: Callable[[bytes, str], _T], data: bytes, label: str) -> _T | None:
    try:
        return parse(data, label)
    except CertificateError as exc:
        problems.append(str(exc))
        return None


def _ca_problems(pems: Mapping[str, bytes], now: datetime) -> tuple[x509.Certificate | None, list[str]]:
    problems: list[str] = []
    if CA_CERT not in pems:
        return None, [f"{CA_CERT} is missing"]
    ca = _collect(problems, _parse_certificate, pems[CA_CERT], CA_CERT)
    if ca is None:
        return None, problems
    problems += _validity_problems(ca, CA_CERT, now, _RENEW_CA_HINT)
    if not _is_ca(ca):
        problems.append(f"{CA_CERT} is not a CA certificate")
    elif not _issued_by(ca, ca):
        problems.append(f"{CA_CERT} is not self-signed; Fluidity needs the root CA certificate there")
    if CA_KEY in pems:
        key = _collect(problems, _parse_private_key, pems[CA_KEY], CA_KEY)
        if key is not None and not key_matches_certificate(key, ca):
            problems.append(f"{CA_KEY} does not match {CA_CERT}")
    return ca, problems


def _leaf_problems(
    leaf: _LeafFiles, pems: Mapping[str, bytes], ca: x509.Certificate | None, now: datetime
) -> list[str]:
    problems: list[str] = []
    cert = key = None
    if leaf.cert in pems:
        cert = _collect(problems, _parse_certificate, pems[leaf.cert], leaf.cert)
    else:
        problems.append(f"{leaf.cert} is missing but {leaf.key} is there")
    if leaf.key in pems:
        key = _collect(problems, _parse_private_key, pems[leaf.key], leaf.key)
    else:
        problems.append(f"{leaf.key} is missing but {leaf.cert} is there")
    if cert is None:
        return problems
    problems += _validity_problems(cert, leaf.cert, now, _RENEW_LEAF_HINT)
    if not _has_usage(cert, leaf.usage):
        problems.append(
            f"{leaf.cert} is not a {leaf.role} certificate (no {leaf.usage_name} extended key usage)"
        )
    if leaf.role == "server" and SERVER_TLS_NAME not in _names(cert)[0]:
        problems.append(f"{leaf.cert} does not name DNS:{SERVER_TLS_NAME}, which agents check")
    if ca is not None and not _issued_by(cert, ca):
        problems.append(f"{leaf.cert} was not issued by this {CA_CERT} (it comes from another CA)")
    if key is not None and not key_matches_certificate(key, cert):
        problems.append(f"{leaf.key} does not match {leaf.cert}")
    return problems


def check_certificate_set(pems: Mapping[str, bytes], now: datetime | None = None) -> list[str]:
    """Everything wrong with PEM files keyed by file name (ca.crt, client.key, ...); empty = usable."""
    now = now if now is not None else _utcnow()
    ca, problems = _ca_problems(pems, now)
    leaves = [leaf for leaf in _LEAVES.values() if leaf.cert in pems or leaf.key in pems]
    if not leaves:
        problems.append(f"no {SERVER_CERT} + {SERVER_KEY} or {CLIENT_CERT} + {CLIENT_KEY}")
    for leaf in leaves:
        problems += _leaf_problems(leaf, pems, ca, now)
    return problems


def _key_permission_problems(directory: Path) -> list[str]:
    """The keys the tunnel would refuse to load, by the same rule (server.tls.key_file_problem)."""
    paths = [directory / name for name in (CA_KEY, SERVER_KEY, CLIENT_KEY)]
    return [problem for path in paths if path.is_file() and (problem := key_file_problem(path))]


def verify(cert_dir: str | os.PathLike[str], now: datetime | None = None) -> list[str]:
    """Problems with the certificates in ``cert_dir``: chain, key pairs, dates, usages, key modes."""
    try:
        directory = _existing_dir(cert_dir)
    except CertificateError as exc:
        return [str(exc)]
    pems: dict[str, bytes] = {}
    problems: list[str] = []
    for name in ALL_FILES:
        if (directory / name).exists():
            try:
                pems[name] = _read(directory / name)
            except CertificateError as exc:
                problems.append(str(exc))
    return problems + check_certificate_set(pems, now) + _key_permission_problems(directory)


def days_until_expiry(cert_path: str | os.PathLike[str], now: datetime | None = None) -> int:
    """Whole days left (negative once expired)."""
    return _days_left(load_certificate(cert_path), now if now is not None else _utcnow())


def expires_within_warning_period(cert_path: str | os.PathLike[str], now: datetime | None = None) -> bool:
    """True when the certificate has EXPIRY_WARNING_DAYS or fewer left (or has expired)."""
    return days_until_expiry(cert_path, now) <= EXPIRY_WARNING_DAYS


def expiry_warnings(cert_dir: str | os.PathLike[str], now: datetime | None = None) -> list[str]:
    """Renew-soon notes for valid certificates in their warning period; expired ones are problems."""
    now = now if now is not None else _utcnow()
    warnings = []
    for name in (CA_CERT, SERVER_CERT, CLIENT_CERT):
        path = Path(cert_dir) / name
        try:
            cert = load_certificate(path)
        except CertificateError:
            continue
        if 0 <= (days := _days_left(cert, now)) <= EXPIRY_WARNING_DAYS:
            hint = _RENEW_CA_HINT if name == CA_CERT else _RENEW_LEAF_HINT
            warnings.append(f"{name} expires in {days} days ({_when(cert.not_valid_after_utc)}); {hint}")
    return warnings


# --------------------------------------------------------------------------- tasks


def describe_certificate(path: str | os.PathLike[str], now: datetime | None = None) -> CertificateInfo:
    path = Path(path)
    cert = load_certificate(path)
    dns, ips = _names(cert)
    key_name = path.with_suffix(".key").name
    return CertificateInfo(
        file=path.name,
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        names=tuple([f"DNS:{n}" for n in dns] + [f"IP:{ip}" for ip in ips]),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        days_to_expiry=_days_left(cert, now if now is not None else _utcnow()),
        key_file=key_name if (path.parent / key_name).exists() else None,
    )


def show(cert_dir: str | os.PathLike[str], now: datetime | None = None) -> list[CertificateInfo]:
    """Subject, issuer, names and expiry of each certificate file present."""
    directory = _existing_dir(cert_dir)
    infos = [
        describe_certificate(directory / name, now)
        for name in (CA_CERT, SERVER_CERT, CLIENT_CERT)
        if (directory / name).exists()
    ]
    if not infos:
        raise CertificateError(
            f"no certificates in {directory}; run `fluidity-certs init` or `fluidity-certs import`"
        )
    return infos


def _load_ca(directory: Path, purpose: str, now: datetime) -> IssuedCertificate:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if not cert_path.exists():
        raise CertificateError(f"cannot {purpose}: {cert_path} is missing")
    if not key_path.exists():
        raise CertificateError(
            f"cannot {purpose}: {key_path} is missing (only the machine that ran `{PROG} init` has it)"
        )
    cert = load_certificate(cert_path)
    key = load_private_key(key_path)
    if not isinstance(key, _SIGNING_KEY_TYPES):
        raise CertificateError(f"cannot {purpose}: {key_path} is a key type that cannot sign certificates")
    if not key_matches_certificate(key, cert):
        raise CertificateError(f"cannot {purpose}: {key_path} does not match {cert_path}")
    if now > cert.not_valid_after_utc:
        raise CertificateError(f"cannot {purpose}: {cert_path} expired on {_when(cert.not_valid_after_utc)}")
    return IssuedCertificate(cert, key)


def ensure_certificates(
    cert_dir: str | os.PathLike[str],
    server_names: Sequence[str] | None = None,
    server_ips: Sequence[str] | None = None,
    *,
    client_name: str = DEFAULT_CLIENT_NAME,
    force: bool = False,
    ca_days: int = CA_VALIDITY_DAYS,
    leaf_days: int = LEAF_VALIDITY_DAYS,
    now: datetime | None = None,
) -> bool:
    """Create whatever of the six files is missing (all of them with ``force``); True if anything was.

    Existing files are never replaced without ``force``. Missing leaves are issued from an
    existing CA when ca.key is present; a half-present pair is an error, not a guess.
    """
    directory = Path(cert_dir)
    names, ips = server_dns_names(server_names), server_ip_addresses(server_ips)
    present = set() if force else {name for name in ALL_FILES if (directory / name).exists()}
    missing = [leaf for leaf in _LEAVES.values() if _needs_issuing(leaf, present, directory)]
    now = now if now is not None else _utcnow()
    new: dict[str, bytes] = {}
    if CA_CERT in present:
        if not missing:
            return False
        ca = _load_ca(directory, f"issue {' and '.join(leaf.cert for leaf in missing)}", now)
    elif present:
        raise CertificateError(
            f"{directory} has {', '.join(sorted(present))} but no {CA_CERT}; pass --force to start over"
        )
    else:
        ca = generate_ca(days=ca_days, now=now)
        new = {CA_CERT: certificate_pem(ca.certificate), CA_KEY: private_key_pem(ca.private_key)}
    for leaf in missing:
        issued = (
            issue_leaf(
                ca, "server", SERVER_TLS_NAME, dns_names=names, ip_addresses=ips, days=leaf_days, now=now
            )
            if leaf.role == "server"
            else issue_leaf(ca, "client", client_name, days=leaf_days, now=now)
        )
        new[leaf.cert] = certificate_pem(issued.certificate)
        new[leaf.key] = private_key_pem(issued.private_key)
    _write_files(directory, new, force=force)
    return True


def _needs_issuing(leaf: _LeafFiles, present: set[str], directory: Path) -> bool:
    """A pair is complete or absent; half a pair is an error, not something to guess about."""
    found = [name for name in (leaf.cert, leaf.key) if name in present]
    if len(found) == 1:
        raise CertificateError(
            f"{directory / found[0]} exists without its partner; pass --force to recreate everything"
        )
    return not found


def renew_leaves(
    cert_dir: str | os.PathLike[str], *, days: int = LEAF_VALIDITY_DAYS, now: datetime | None = None
) -> list[Path]:
    """Reissue server.crt and client.crt (new keys, same subjects and names) from the local CA."""
    directory = _existing_dir(cert_dir)
    now = now if now is not None else _utcnow()
    ca = _load_ca(directory, "renew certificates", now)
    new: dict[str, bytes] = {}
    for leaf in _LEAVES.values():
        if not (directory / leaf.cert).exists():
            continue
        old = load_certificate(directory / leaf.cert)
        dns, ips = _names(old)
        issued = issue_leaf(ca, leaf.role, old.subject, dns_names=dns, ip_addresses=ips, days=days, now=now)
        new[leaf.cert] = certificate_pem(issued.certificate)
        new[leaf.key] = private_key_pem(issued.private_key)
    if not new:
        raise CertificateError(
            f"no {SERVER_CERT} or {CLIENT_CERT} in {directory} to renew; run `fluidity-certs init`"
        )
    _write_files(directory, new, force=True)
    return [directory / name for name in new if name.endswith(".crt")]


def _read_bundle(source: Path) -> dict[str, bytes]:
    if source.is_dir():
        return {name: _read(source / name) for name in ALL_FILES if (source / name).is_file()}
    if not source.exists():
        raise CertificateError(f"bundle {source} does not exist")
    if not zipfile.is_zipfile(source):
        raise CertificateError(f"bundle {source} is neither a folder nor a zip file")
    found: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(source) as archive:
            for info in archive.infolist():
                name = info.filename.replace("\\", "/").rsplit("/", 1)[-1]
                if info.is_dir() or name not in ALL_FILES:
                    continue
                if name in found:
                    raise CertificateError(f"bundle {source} contains {name} twice")
                if info.file_size > MAX_BUNDLE_MEMBER_BYTES:
                    raise CertificateError(
                        f"{name} in bundle {source} is too large to be a certificate or key"
                    )
                found[name] = archive.read(info)
    except (zipfile.BadZipFile, RuntimeError, OSError) as exc:
        raise CertificateError(f"cannot read bundle {source}: {exc}") from None
    return found


def _missing_from_bundle(pems: Mapping[str, bytes]) -> str | None:
    if CA_CERT not in pems:
        return CA_CERT
    for leaf in _LEAVES.values():
        if (leaf.cert in pems) != (leaf.key in pems):
            return leaf.key if leaf.cert in pems else leaf.cert
    if not any(leaf.cert in pems for leaf in _LEAVES.values()):
        return f"{CLIENT_CERT} and {CLIENT_KEY}"
    return None


def import_bundle(
    source: str | os.PathLike[str],
    dest_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    now: datetime | None = None,
) -> list[Path]:
    """Copy a bundle (zip or folder) into ``dest_dir`` after checking it; all files or none.

    The bundle needs ca.crt plus client.crt + client.key (an agent) and/or server.crt +
    server.key (a tunnel server). Existing files with other contents need ``force``.
    """
    source_path, directory = Path(source), Path(dest_dir)
    pems = _read_bundle(source_path)
    if (missing := _missing_from_bundle(pems)) is not None:
        raise CertificateError(f"bundle {source_path} is missing {missing}")
    if problems := check_certificate_set(pems, now):
        raise CertificateError(f"bundle {source_path} was not imported: {'; '.join(problems)}")
    if not force:
        for name, data in pems.items():
            target = directory / name
            if target.exists() and _read(target) != data:
                raise CertificateError(
                    f"{target} already exists with other contents; pass --force to replace it"
                )
    return _write_files(directory, pems, force=True)


def _zip_bytes(pems: Mapping[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in pems.items():
            info = zipfile.ZipInfo(name, date_time=time.localtime()[:6])
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (stat.S_IFREG | _mode_for(name)) << 16
            archive.writestr(info, data)
    return buffer.getvalue()


def create_bundle(
    cert_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    server: bool = False,
    force: bool = False,
    now: datetime | None = None,
) -> Path:
    """Zip the files another machine needs (agent, or tunnel server with ``server``); never ca.key."""
    directory = _existing_dir(cert_dir)
    kind = "server" if server else "client"
    pems: dict[str, bytes] = {}
    for name in SERVER_BUNDLE if server else CLIENT_BUNDLE:
        if not (directory / name).is_file():
            raise CertificateError(f"cannot make a {kind} bundle: {directory / name} is missing")
        pems[name] = _read(directory / name)
    if problems := check_certificate_set(pems, now):
        raise CertificateError(f"cannot make a {kind} bundle: {'; '.join(problems)}")
    out_path = Path(out)
    _write_file(out_path, _zip_bytes(pems), 0o600, overwrite=force)
    return out_path


# --------------------------------------------------------------------------- CLI


def format_certificate_info(info: CertificateInfo) -> str:
    if info.days_to_expiry < 0:
        expiry = f"EXPIRED {-info.days_to_expiry} days ago"
    elif info.days_to_expiry <= EXPIRY_WARNING_DAYS:
        expiry = f"in {info.days_to_expiry} days - renew soon"
    else:
        expiry = f"in {info.days_to_expiry} days"
    lines = [
        info.file,
        f"  subject:  {info.subject}",
        f"  issuer:   {info.issuer}",
        f"  names:    {', '.join(info.names) or '-'}",
        f"  valid:    {_when(info.not_before)} to {_when(info.not_after)}",
        f"  expires:  {expiry}",
        f"  key:      {info.key_file or 'not in this folder'}",
    ]
    return "\n".join(lines)


def _cert_dir(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir is not None else default_cert_dir()


def _cmd_init(args: argparse.Namespace) -> int:
    directory = _cert_dir(args)
    created = ensure_certificates(
        directory,
        args.server_names,
        args.server_ips,
        client_name=args.client_name,
        force=args.force,
        ca_days=args.ca_days,
        leaf_days=args.days,
    )
    if not created:
        print(f"Certificates already exist in {directory}; nothing changed (pass --force to replace them).")
        return 0
    print(f"Created certificates in {directory}")
    for info in show(directory):
        print(format_certificate_info(info))
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    directory = _cert_dir(args)
    print("\n".join(format_certificate_info(info) for info in show(directory)))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    directory = _cert_dir(args)
    problems = verify(directory)
    if problems:
        print(f"{PROG}: {len(problems)} problem(s) with the certificates in {directory}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    present = [name for name in ALL_FILES if (directory / name).exists()]
    print(f"OK: {', '.join(present)} in {directory} are valid")
    for warning in expiry_warnings(directory):
        print(f"warning: {warning}")
    return 0


def _cmd_renew(args: argparse.Namespace) -> int:
    directory = _cert_dir(args)
    renewed = renew_leaves(directory, days=args.days)
    print(f"Renewed {', '.join(path.name for path in renewed)} in {directory}")
    print(f"Copy them to the other machines again: `{PROG} bundle --out FILE.zip` (--server for the server)")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    directory = _cert_dir(args)
    written = import_bundle(args.source, directory, force=args.force)
    print(f"Imported {', '.join(path.name for path in written)} into {directory}")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    out = create_bundle(_cert_dir(args), args.out, server=args.server, force=args.force)
    names = SERVER_BUNDLE if args.server else CLIENT_BUNDLE
    print(f"Wrote {out} ({', '.join(names)}).")
    print(
        f"It holds a private key: copy it over a trusted channel, run `{PROG} import {out.name}`, delete it."
    )
    return 0


def _positive_days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if days < 1:
        raise argparse.ArgumentTypeError("must be at least 1 day")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = program_parser(
        PROG,
        "Create, check and move Fluidity's mTLS certificates. `fluidity-certs COMMAND --help` "
        "lists the options of each command.",
        (
            f"{PROG} init --dir ./certs                             CA, server and client certificates",
            f"{PROG} import client-bundle.zip --dir {default_cert_dir()}",
        ),
        usage=f"{PROG} COMMAND [--dir DIR] [OPTIONS]",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--dir", type=Path, help=f"certificate folder (default: {default_cert_dir()})")
        sub.set_defaults(handler=handler)
        return sub

    init = command("init", _cmd_init, "create a CA and server/client certificates (keeps existing files)")
    init.add_argument(
        "--server-name",
        dest="server_names",
        action="extend",
        nargs="+",
        metavar="NAME",
        help=f"DNS name for the server certificate (default: {', '.join(DEFAULT_SERVER_NAMES)};"
        f" {SERVER_TLS_NAME} is always included)",
    )
    init.add_argument(
        "--server-ip",
        dest="server_ips",
        action="extend",
        nargs="+",
        metavar="IP",
        help=f"IP address for the server certificate (default: {', '.join(DEFAULT_SERVER_IPS)})",
    )
    init.add_argument("--client-name", default=DEFAULT_CLIENT_NAME, help="client certificate common name")
    init.add_argument("--ca-days", type=_positive_days, default=CA_VALIDITY_DAYS, help="CA validity in days")
    init.add_argument("--days", type=_positive_days, default=LEAF_VALIDITY_DAYS, help="leaf validity in days")
    init.add_argument("--force", action="store_true", help="replace all existing files with a new CA")
    command("show", _cmd_show, "print subject, names and expiry of each certificate")
    command("verify", _cmd_verify, "check chain, key pairs, dates and usages; exit 1 on problems")
    renew = command("renew", _cmd_renew, "reissue server and client certificates from the CA (needs ca.key)")
    renew.add_argument(
        "--days", type=_positive_days, default=LEAF_VALIDITY_DAYS, help="leaf validity in days"
    )
    imp = command(
        "import", _cmd_import, "copy a bundle (.zip or folder) from another machine after checking it"
    )
    imp.add_argument("source", type=Path, help="bundle .zip or folder")
    imp.add_argument("--force", action="store_true", help="replace existing files with other contents")
    bundle = command(
        "bundle", _cmd_bundle, "zip ca.crt + client.crt + client.key (or the server set) to copy"
    )
    bundle.add_argument("--out", type=Path, required=True, metavar="FILE.zip", help="zip file to write")
    bundle.add_argument(
        "--server", action="store_true", help="bundle ca.crt + server.crt + server.key instead"
    )
    bundle.add_argument("--force", action="store_true", help="replace FILE.zip if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``fluidity-certs``: 0 on success, 1 with a one-line error or a problem list, 2 on bad usage."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.handler(args))
    except CertificateError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{PROG}: error: {exc.strerror or exc}{where}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
