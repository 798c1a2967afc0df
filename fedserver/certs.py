"""The federation's certificate authority: `fedserver certs init-ca | issue-school | issue-server
| list | revoke` (docs/SECURITY.md).

A CA directory holds
  ca.crt        the federation CA's certificate (give it to every school and to the coordinator)
  ca.key        its private key (mode 0600; keep it offline, off the coordinator if you can)
  index.json    every certificate issued: serial, kind, school id or hosts, validity, revocation
  issued/       a copy of each issued certificate, by serial
  revoked.crl   the revocation list (a CRL signed by the CA), rewritten by `revoke`; copy it to the
                coordinator's [server.tls] revocation_list, which it re-reads when the file changes
Private keys are created with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600: an existing file or a
symbolic link at the path is refused, never overwritten or followed. Keys are ECDSA P-256."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError
from common.files import atomic_write_bytes, write_secret
from common.tls import cert_info, format_serial, now, parse_serial, school_uri, valid_school_id

CA_CERT, CA_KEY, INDEX, CRL, ISSUED = "ca.crt", "ca.key", "index.json", "revoked.crl", "issued"
CA_DAYS, LEAF_DAYS, CRL_DAYS = 3650, 365, 3650
BACKDATE = dt.timedelta(minutes=5)   # clock skew between machines
REASONS = {
    "unspecified": x509.ReasonFlags.unspecified, "key_compromise": x509.ReasonFlags.key_compromise,
    "superseded": x509.ReasonFlags.superseded, "cessation_of_operation": x509.ReasonFlags.cessation_of_operation,
    "affiliation_changed": x509.ReasonFlags.affiliation_changed,
}


# ---------------------------------------------------------------- files
def create_file(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode` and write `data`: never over an existing file, never through a
    symbolic link (O_EXCL|O_NOFOLLOW), never into a device or pipe (common.files.write_secret)."""
    write_secret(path, data, mode=mode, hint="move it away or choose another --out")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------- the CA
@dataclass
class CA:
    dir: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def open(cls, ca_dir: Path) -> CA:
        ca_dir = Path(ca_dir)
        if not (ca_dir / CA_CERT).is_file():
            raise ConfigError(f"{ca_dir} is not a CA directory (no {CA_CERT}); create one with "
                              f"`fedserver certs init-ca --dir {ca_dir}`")
        try:
            cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
        except FileNotFoundError:
            raise ConfigError(f"{ca_dir / CA_KEY} is missing: issuing and revoking need the CA's private key") from None
        except PermissionError as exc:
            raise ConfigError(f"cannot read {exc.filename}: permission denied (run as the CA's owner)") from None
        except ValueError as exc:
            raise ConfigError(f"{ca_dir}: unreadable CA certificate or key ({exc})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
            raise ConfigError(f"{ca_dir / CA_KEY} is not the key of {ca_dir / CA_CERT}")
        return cls(ca_dir, cert, key)

    # -- index
    def index(self) -> list[dict[str, Any]]:
        path = self.dir / INDEX
        if not path.exists():
            return []
        try:
            return list(json.loads(path.read_text())["certificates"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: not a certificate index ({exc})") from None

    def _save_index(self, entries: list[dict[str, Any]]) -> None:
        atomic_write_bytes(self.dir / INDEX, (json.dumps({"certificates": entries}, indent=2) + "\n").encode())

    # -- issuing
    def issue(self, kind: str, name: str, sans: list[x509.GeneralName], out_dir: Path, stem: str,
              days: int = LEAF_DAYS, start: dt.datetime | None = None) -> tuple[Path, Path, x509.Certificate]:
        """A key and a certificate for `kind` 'school' or 'server', written to out_dir/stem.crt
        and out_dir/stem.key (0600), with ca.crt beside them; recorded in the index."""
        if days < 1:
            raise ConfigError("--days: must be >= 1")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = out_dir / f"{stem}.crt", out_dir / f"{stem}.key"
        for p in (cert_path, key_path):   # before anything is written: all or nothing
            if p.exists() or p.is_symlink():
                raise ConfigError(f"{p} already exists; not overwriting it. Move it away or choose another --out")
        start = (start or now()) - BACKDATE
        end = min(start + BACKDATE + dt.timedelta(days=days), self.cert.not_valid_after_utc)
        if self.cert.not_valid_after_utc <= now():
            raise ConfigError(f"the CA expired on {self.cert.not_valid_after_utc:%Y-%m-%d}; create a new CA")
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if kind == "school" else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(self.cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
                .sign(self.key, hashes.SHA256()))
        create_file(key_path, _key_pem(key), 0o600)
        create_file(cert_path, _cert_pem(cert), 0o644)
        ca_copy = out_dir / CA_CERT
        if not ca_copy.exists() and out_dir.resolve() != self.dir.resolve():
            create_file(ca_copy, _cert_pem(self.cert), 0o644)
        (self.dir / ISSUED).mkdir(exist_ok=True)
        atomic_write_bytes(self.dir / ISSUED / f"{format_serial(cert.serial_number)}.crt", _cert_pem(cert))
        info = cert_info(cert)
        entries = self.index()
        entries.append({"serial": info.serial_hex, "kind": kind, "name": name,
                        "school": info.school_id, "hosts": list(info.dns_names) + list(info.ip_addresses),
                        "not_before": info.not_before.isoformat(), "not_after": info.not_after.isoformat(),
                        "sha256": info.sha256, "file": str(cert_path.resolve()), "revoked_at": None, "reason": None})
        self._save_index(entries)
        return cert_path, key_path, cert

    def issue_school(self, school: str, out_dir: Path, days: int = LEAF_DAYS,
                     start: dt.datetime | None = None) -> tuple[Path, Path, x509.Certificate]:
        if not valid_school_id(school):
            raise ConfigError(f"--school {school!r}: use letters, digits, '-', '_' or '.' (the [[schools]] id)")
        return self.issue("school", school, [x509.UniformResourceIdentifier(school_uri(school))], out_dir, school,
                          days, start)

    def issue_server(self, hosts: list[str], out_dir: Path, days: int = LEAF_DAYS, stem: str = "server",
                     start: dt.datetime | None = None) -> tuple[Path, Path, x509.Certificate]:
        if not hosts:
            raise ConfigError("--host: name at least one host name or IP address the schools dial")
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h.strip("[]"))))
            except ValueError:
                if not h or any(c.isspace() or c in "/:@" for c in h):
                    raise ConfigError(f"--host {h!r}: not a host name or an IP address") from None
                sans.append(x509.DNSName(h.lower()))
        return self.issue("server", hosts[0], sans, out_dir, stem, days, start)

    # -- revoking
    def revoke(self, serial: str | None = None, school: str | None = None, reason: str = "unspecified") -> list[dict[str, Any]]:
        """Mark the certificate `serial`, or every valid one of `school`, revoked; rewrite revoked.crl."""
        if reason not in REASONS:
            raise ConfigError(f"--reason: one of {', '.join(REASONS)}")
        entries = self.index()
        if serial is not None:
            try:
                wanted = format_serial(parse_serial(serial))
            except ValueError as exc:
                raise ConfigError(f"--serial: {exc}") from None
            chosen = [e for e in entries if e["serial"] == wanted]
            if not chosen:
                raise ConfigError(f"no certificate with serial {wanted} in {self.dir / INDEX} "
                                  "(`fedserver certs list` shows them)")
        else:
            chosen = [e for e in entries if e["kind"] == "school" and e["school"] == school]
            if not chosen:
                raise ConfigError(f"no certificate was issued to school {school!r} by this CA "
                                  "(`fedserver certs list` shows them)")
        newly = [e for e in chosen if not e["revoked_at"]]
        stamp = now().replace(microsecond=0).isoformat()
        for e in newly:
            e["revoked_at"], e["reason"] = stamp, reason
        self._save_index(entries)
        self.write_crl(entries)
        return newly

    def write_crl(self, entries: list[dict[str, Any]] | None = None) -> Path:
        """revoked.crl: every revoked serial, signed by the CA (written atomically)."""
        entries = self.index() if entries is None else entries
        t = now()
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
                   .last_update(t - BACKDATE).next_update(t + dt.timedelta(days=CRL_DAYS)))
        for e in entries:
            if e["revoked_at"]:
                revoked = (x509.RevokedCertificateBuilder().serial_number(parse_serial(e["serial"]))
                           .revocation_date(dt.datetime.fromisoformat(e["revoked_at"]))
                           .add_extension(x509.CRLReason(REASONS.get(e["reason"] or "unspecified",
                                                                     x509.ReasonFlags.unspecified)), critical=False)
                           .build())
                builder = builder.add_revoked_certificate(revoked)
        crl = builder.sign(self.key, hashes.SHA256())
        path = self.dir / CRL
        atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM))
        os.chmod(path, 0o644)
        return path


def init_ca(ca_dir: Path, name: str = "School federation CA", days: int = CA_DAYS) -> CA:
    """A new CA in `ca_dir` (created 0700 if missing; an existing CA there is refused)."""
    ca_dir = Path(ca_dir)
    if days < 1:
        raise ConfigError("--days: must be >= 1")
    if ca_dir.is_symlink():
        raise ConfigError(f"{ca_dir} is a symbolic link; choose a real directory for the CA")
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (ca_dir / CA_CERT).exists() or (ca_dir / CA_KEY).exists():
        raise ConfigError(f"{ca_dir} already holds a CA ({CA_CERT} / {CA_KEY}); not overwriting it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    t = now()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(t - BACKDATE).not_valid_after(t + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    create_file(ca_dir / CA_KEY, _key_pem(key), 0o600)
    create_file(ca_dir / CA_CERT, _cert_pem(cert), 0o644)
    ca = CA(ca_dir, cert, key)
    ca._save_index([])
    ca.write_crl([])
    return ca


def status_of(entry: dict[str, Any], at: dt.datetime | None = None) -> str:
    if entry["revoked_at"]:
        return "revoked"
    return "expired" if dt.datetime.fromisoformat(entry["not_after"]) < (at or now()) else "valid"


# ---------------------------------------------------------------- the CLI
def add_parser(sub: Any) -> None:
    """`fedserver certs ...` subcommands."""
    c = sub.add_parser("certs", help="the federation's CA: issue, list and revoke TLS certificates (docs/SECURITY.md)")
    cs = c.add_subparsers(dest="certs_command", required=True)
    i = cs.add_parser("init-ca", help="create a federation CA (ca.crt, ca.key 0600, an empty revoked.crl)")
    i.add_argument("--dir", type=Path, required=True, help="the CA directory (created 0700)")
    i.add_argument("--name", default="School federation CA", help="the CA's common name")
    i.add_argument("--days", type=int, default=CA_DAYS)
    i.set_defaults(fn=_init)
    s = cs.add_parser("issue-school", help="a school's key and certificate (its id in a URI subjectAltName)")
    s.add_argument("--dir", type=Path, required=True, help="the CA directory")
    s.add_argument("--school", required=True, help="the school's id, as in [[schools]]")
    s.add_argument("--out", type=Path, default=None, help="where ID.crt, ID.key and ca.crt go (default: CA_DIR/schools/ID)")
    s.add_argument("--days", type=int, default=LEAF_DAYS)
    s.set_defaults(fn=_issue_school)
    v = cs.add_parser("issue-server", help="the coordinator's key and certificate for the names the schools dial")
    v.add_argument("--dir", type=Path, required=True, help="the CA directory")
    v.add_argument("--host", action="append", required=True,
                   help="a DNS name or IP address of the coordinator, as in the schools' `coordinator` (repeat it)")
    v.add_argument("--out", type=Path, default=None, help="where server.crt, server.key and ca.crt go (default: CA_DIR/server)")
    v.add_argument("--days", type=int, default=LEAF_DAYS)
    v.set_defaults(fn=_issue_server)
    ls = cs.add_parser("list", help="every certificate this CA issued, with its serial and status")
    ls.add_argument("--dir", type=Path, required=True)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(fn=_list)
    r = cs.add_parser("revoke", help="revoke a certificate (by serial) or all of a school's; rewrites revoked.crl")
    r.add_argument("--dir", type=Path, required=True)
    who = r.add_mutually_exclusive_group(required=True)
    who.add_argument("--serial", help="the certificate's serial (hex, from `fedserver certs list`)")
    who.add_argument("--school", help="revoke every certificate issued to this school")
    r.add_argument("--reason", default="unspecified", choices=sorted(REASONS))
    r.set_defaults(fn=_revoke)


def _init(args: Any) -> int:
    ca = init_ca(args.dir, args.name, args.days)
    print(f"CA created in {ca.dir}: {ca.dir / CA_CERT} (public: give it to the coordinator and every school), "
          f"{ca.dir / CA_KEY} (secret, mode 0600: keep it off the network), {ca.dir / CRL} (the revocation list)")
    return 0


def _issue_school(args: Any) -> int:
    ca = CA.open(args.dir)
    out = args.out if args.out is not None else args.dir / "schools" / args.school
    cert_path, key_path, cert = ca.issue_school(args.school, out, args.days)
    print(f"school {args.school}: {cert_path} and {key_path} (mode 0600), serial {format_serial(cert.serial_number)}, "
          f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"# at the school: install them with {out / CA_CERT} as /etc/fedclient/tls/school.crt, school.key and ca.crt "
          "(root-owned, 0600 for the key: systemd hands them to the daemon as credentials)")
    return 0


def _issue_server(args: Any) -> int:
    ca = CA.open(args.dir)
    out = args.out if args.out is not None else args.dir / "server"
    cert_path, key_path, cert = ca.issue_server(args.host, out, args.days)
    print(f"coordinator: {cert_path} and {key_path} (mode 0600) for {', '.join(args.host)}, serial "
          f"{format_serial(cert.serial_number)}, valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"# install them with {out / CA_CERT} as /etc/fedserver/tls/server.crt, server.key and ca.crt "
          "(see docs/SECURITY.md)")
    return 0


def _list(args: Any) -> int:
    ca = CA.open(args.dir)
    entries = [{**e, "status": status_of(e)} for e in ca.index()]
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    print(f"CA {ca.cert.subject.rfc4514_string()} ({args.dir}), valid until {ca.cert.not_valid_after_utc:%Y-%m-%d}")
    if not entries:
        print("no certificate issued yet")
        return 0
    print(f"{'serial':<41} {'kind':<6} {'school / hosts':<28} {'valid until':<11} status")
    for e in entries:
        who = e["school"] if e["kind"] == "school" else ",".join(e["hosts"])
        print(f"{e['serial']:<41} {e['kind']:<6} {who:<28} {e['not_after'][:10]:<11} {e['status']}"
              + (f" ({e['revoked_at'][:10]}, {e['reason']})" if e["revoked_at"] else ""))
    return 0


def _revoke(args: Any) -> int:
    ca = CA.open(args.dir)
    newly = ca.revoke(serial=args.serial, school=args.school, reason=args.reason)
    for e in newly:
        print(f"revoked {e['serial']} ({e['kind']} {e['school'] or e['name']})")
    if not newly:
        print("nothing new to revoke: already revoked")
    print(f"{ca.dir / CRL} rewritten; copy it to the coordinator's [server.tls] revocation_list "
          "(e.g. install -m 0644 ... /etc/fedserver/tls/revoked.crl): it is re-read when the file changes, no restart; "
          "the school's next call is refused and its session ends")
    return 0
