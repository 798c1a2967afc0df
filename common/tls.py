"""Certificates shared by both daemons (docs/SECURITY.md): how a school's id is carried in its
certificate, where a PEM file comes from (a configured path or a systemd credential), and the
checks `check-config` makes of a certificate, its key and a CA file before anything starts.

A school certificate names its school in one URI subjectAltName, `schoolfed://school/<id>`;
the coordinator's certificate names its hosts as DNS and IP subjectAltNames. Both are issued by
the federation's CA (`fedserver certs`)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

SCHOOL_URI_PREFIX = "schoolfed://school/"
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"   # set by systemd for a unit with LoadCredential=
EXPIRY_WARNING_DAYS = 14

# The systemd credential names each daemon reads when a path is left unset (LoadCredential=NAME:SOURCE).
SERVER_CREDENTIALS = {"cert": "server.crt", "key": "server.key", "client_ca": "ca.crt"}
SCHOOL_CREDENTIALS = {"cert": "school.crt", "key": "school.key", "ca": "ca.crt"}


def school_uri(school_id: str) -> str:
    return SCHOOL_URI_PREFIX + school_id


def valid_school_id(school_id: str) -> bool:
    """The ids [[schools]] accepts: letters, digits, '-', '_' and '.'."""
    return bool(school_id) and all(c.isalnum() or c in "-_." for c in school_id)


def school_id_from_uri(uri: str) -> str | None:
    if not uri.startswith(SCHOOL_URI_PREFIX):
        return None
    sid = uri[len(SCHOOL_URI_PREFIX):]
    return sid if valid_school_id(sid) else None


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class CertInfo:
    """What the federation reads from a certificate."""

    serial: int
    subject: str
    issuer: str
    school_id: str | None          # from the schoolfed://school/<id> URI SAN; None if it has none (or several)
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    is_ca: bool
    client_auth: bool              # extendedKeyUsage allows TLS client authentication (or has no EKU)
    server_auth: bool
    sha256: str                    # fingerprint of the DER encoding

    @property
    def serial_hex(self) -> str:
        return format_serial(self.serial)

    def expired(self, at: dt.datetime | None = None) -> bool:
        return (at or now()) > self.not_after

    def not_yet_valid(self, at: dt.datetime | None = None) -> bool:
        return (at or now()) < self.not_before


def format_serial(serial: int) -> str:
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """A serial as `fedserver certs list` prints it (hex), with or without 0x and colons."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        return int(cleaned, 16)
    except ValueError:
        raise ValueError(f"{text!r} is not a certificate serial (hex, as `fedserver certs list` prints it)") from None


def cert_info(cert: x509.Certificate) -> CertInfo:
    uris: list[str] = []
    dns: list[str] = []
    ips: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    ids = {sid for sid in (school_id_from_uri(u) for u in uris) if sid}
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        client, server = ExtendedKeyUsageOID.CLIENT_AUTH in eku, ExtendedKeyUsageOID.SERVER_AUTH in eku
    except x509.ExtensionNotFound:
        client = server = True
    return CertInfo(
        serial=cert.serial_number, subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
        school_id=ids.pop() if len(ids) == 1 else None, dns_names=tuple(dns), ip_addresses=tuple(ips),
        not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, is_ca=is_ca,
        client_auth=client, server_auth=server,
        sha256=hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest())


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM file (ValueError when there is none or one is malformed)."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise ValueError(f"not a PEM certificate file ({exc})") from None
    if not certs:
        raise ValueError("holds no PEM certificate")
    return certs


def resolve(key: str, path: Path | None, credential: str) -> tuple[Path | None, str | None]:
    """(the file to read, None) or (None, problem): `path` when the config sets it, else the
    systemd credential `credential` in $CREDENTIALS_DIRECTORY."""
    if path is not None:
        return path, None
    folder = os.environ.get(CREDENTIALS_ENV)
    if not folder:
        return None, (f"{key}: not set, and ${CREDENTIALS_ENV} is not set (the unit's LoadCredential={credential}:FILE "
                      f"provides it under systemd); set {key} to the file's path (see docs/SECURITY.md)")
    return Path(folder) / credential, None


def read_pem(key: str, path: Path) -> tuple[bytes, str | None]:
    """(content, None) or (b"", problem naming the key and what to do)."""
    from common.preflight import user

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return b"", f"{key}: {path} does not exist; install the file there (docs/SECURITY.md says which)"
    except IsADirectoryError:
        return b"", f"{key}: {path} is a directory, not a PEM file"
    except PermissionError:
        return b"", (f"{key}: cannot read {path} as {user()}: permission denied; give that user read access "
                     f"(e.g. chgrp {user()} {path} && chmod 0640 {path}) or hand it over as a systemd credential")
    except OSError as exc:
        return b"", f"{key}: cannot read {path}: {exc.strerror}"
    if not data.strip():
        return b"", f"{key}: {path} is empty"
    return data, None


@dataclass(frozen=True)
class Identity:
    """A certificate (and its chain), its private key and the CA file the other side is checked
    against, read and checked together."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes
    cert: CertInfo
    cas: tuple[x509.Certificate, ...]


def load_identity(keys: dict[str, str], paths: dict[str, Path | None], credentials: dict[str, str], *,
                  role: str) -> tuple[Identity | None, list[str], list[str]]:
    """(identity, problems, warnings) for `role` 'server' or 'school'. `keys` maps 'cert', 'key',
    'ca' to the config keys named in messages; `paths` to the configured paths (None: credential)."""
    problems: list[str] = []
    warnings: list[str] = []
    data: dict[str, bytes] = {}
    for what in ("cert", "key", "ca"):
        path, problem = resolve(keys[what], paths[what], credentials[what])
        if problem is None and path is not None:
            data[what], problem = read_pem(keys[what], path)
        if problem:
            problems.append(problem)
    if problems:
        return None, problems, warnings
    try:
        chain = load_certificates(data["cert"])
    except ValueError as exc:
        return None, [f"{keys['cert']}: {exc}"], warnings
    try:
        cas = load_certificates(data["ca"])
    except ValueError as exc:
        return None, [f"{keys['ca']}: {exc}"], warnings
    try:
        key = serialization.load_pem_private_key(data["key"], password=None)
    except (ValueError, TypeError) as exc:
        return None, [f"{keys['key']}: not an unencrypted PEM private key ({exc})"], warnings
    info = cert_info(chain[0])
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            chain[0].public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        problems.append(f"{keys['key']}: this private key does not belong to the certificate {keys['cert']} "
                        f"({info.subject}); install the key issued with it")
    issue_hint = ("fedserver certs issue-server --host NAME" if role == "server"
                  else f"fedserver certs issue-school --school {info.school_id or 'ID'}")
    if info.expired():
        problems.append(f"{keys['cert']}: the certificate ({info.subject}, serial {info.serial_hex}) expired on "
                        f"{info.not_after:%Y-%m-%d %H:%M} UTC; issue a new one ({issue_hint}) and install it")
    elif info.not_yet_valid():
        problems.append(f"{keys['cert']}: the certificate is valid only from {info.not_before:%Y-%m-%d %H:%M} UTC "
                        "(is this machine's clock right?)")
    elif info.not_after - now() < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        warnings.append(f"{keys['cert']}: the certificate expires on {info.not_after:%Y-%m-%d %H:%M} UTC; "
                        f"issue a new one soon ({issue_hint})")
    if info.is_ca:
        problems.append(f"{keys['cert']}: {info.subject} is a CA certificate, not a "
                        f"{'coordinator' if role == 'server' else 'school'} certificate")
    if role == "school":
        if info.school_id is None:
            problems.append(f"{keys['cert']}: the certificate carries no school id (one subjectAltName URI "
                            f"{SCHOOL_URI_PREFIX}<id>); issue it with `fedserver certs issue-school --school ID`")
        if not info.client_auth:
            problems.append(f"{keys['cert']}: the certificate is not for TLS client authentication (extendedKeyUsage)")
    else:
        if not info.dns_names and not info.ip_addresses:
            problems.append(f"{keys['cert']}: the certificate names no host (DNS or IP subjectAltName); schools cannot "
                            "check it: issue it with `fedserver certs issue-server --host NAME`")
        if not info.server_auth:
            problems.append(f"{keys['cert']}: the certificate is not for TLS server authentication (extendedKeyUsage)")
    if not any(cert_info(c).is_ca for c in cas):
        problems.append(f"{keys['ca']}: holds no CA certificate (basicConstraints CA:TRUE); use the federation's "
                        "ca.crt (`fedserver certs init-ca` wrote it)")
    elif role == "school" and not issued_by(chain[0], cas):
        # the CA file checks the coordinator; schools and coordinator normally share one CA
        warnings.append(f"{keys['cert']}: not issued by a CA in {keys['ca']}; the coordinator will refuse it unless "
                        "its client_ca holds the CA that issued it")
    if problems:
        return None, problems, warnings
    return Identity(data["cert"], data["key"], data["ca"], info, tuple(cas)), problems, warnings


def issued_by(cert: x509.Certificate, cas: list[x509.Certificate] | tuple[x509.Certificate, ...]) -> bool:
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except Exception:   # InvalidSignature, or another key type: not this CA
            continue
        return True
    return False


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
