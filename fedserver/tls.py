"""The coordinator's side of mutual TLS (docs/SECURITY.md).

- ServerIdentity: its certificate, key and the client CA, served through
  grpc.dynamic_ssl_server_credentials; the fetcher gRPC calls at each new handshake stats the
  three files and reloads them when one changed, so a rotated certificate is used by new
  connections without a restart (existing connections keep theirs).
- RevocationList: the CRL `fedserver certs revoke` writes, re-read when its file changes (a
  stat per check), its signature checked against the client CA. Python's gRPC has no CRL
  support, so the servicer checks every call's peer certificate against it.
- PeerGuard: the school id of a call, from the peer certificate gRPC verified (auth_context),
  refused when the certificate is revoked or has expired since the connection was made."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from common.errors import AuthenticationError, CertificateRefusedError, ConfigError
from common.logs import get_logger
from common.messages import ShutdownCommand
from common.tls import SERVER_CREDENTIALS, CertInfo, Identity, cert_info, load_certificates, load_identity, resolve

log = get_logger("tls")

SERVER_KEYS = {"cert": "server.tls.cert", "key": "server.tls.key", "ca": "server.tls.client_ca"}


def _signature(paths: list[Path]) -> tuple[Any, ...]:
    out: list[tuple[int, int, int] | None] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append(None)
        else:
            out.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def server_paths(tls: Any) -> tuple[dict[str, Path | None], list[str]]:
    """The coordinator's cert, key and client CA files (configured, or systemd credentials)."""
    paths: dict[str, Path | None] = {}
    problems = []
    configured = {"cert": tls.cert, "key": tls.key, "ca": tls.client_ca}
    for what, key in SERVER_KEYS.items():
        credential = SERVER_CREDENTIALS["client_ca" if what == "ca" else what]
        paths[what], problem = resolve(key, configured[what], credential)
        if problem:
            problems.append(problem)
    return paths, problems


def load_server_identity(tls: Any) -> tuple[Identity | None, dict[str, Path | None], list[str], list[str]]:
    paths, problems = server_paths(tls)
    if problems:
        return None, paths, problems, []
    credentials = {"cert": SERVER_CREDENTIALS["cert"], "key": SERVER_CREDENTIALS["key"], "ca": SERVER_CREDENTIALS["client_ca"]}
    identity, problems, warnings = load_identity(SERVER_KEYS, paths, credentials, role="server")
    return identity, paths, problems, warnings


class ServerIdentity:
    """The coordinator's certificate, key and client CA, reloaded when their files change."""

    def __init__(self, tls: Any) -> None:
        identity, paths, problems, _ = load_server_identity(tls)
        if identity is None:
            raise ConfigError("[server.tls]: " + "; ".join(problems))
        self.tls = tls
        self.paths = [p for p in (paths["cert"], paths["key"], paths["ca"]) if p is not None]
        self.identity = identity
        self._sig = _signature(self.paths)
        self._lock = threading.Lock()
        self.reloads = 0

    @property
    def client_cas(self) -> tuple[x509.Certificate, ...]:
        return self.identity.cas

    def _config(self) -> grpc.ServerCertificateConfiguration:
        i = self.identity
        return grpc.ssl_server_certificate_configuration([(i.key_pem, i.cert_pem)], root_certificates=i.ca_pem)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher, called at each new handshake: None (keep the current configuration)
        unless a file changed and the new set is complete and consistent. Never raises."""
        try:
            sig = _signature(self.paths)
            if sig == self._sig:
                return None
            with self._lock:
                if sig == self._sig:
                    return None
                identity, _, problems, warnings = load_server_identity(self.tls)
                if identity is None:
                    # e.g. the certificate is replaced but not yet its key: keep serving the old
                    # pair and look again at the next handshake
                    log.warning("server certificate files changed but are not usable yet; keeping the current ones",
                                problems=problems)
                    return None
                self.identity, self._sig = identity, sig
                self.reloads += 1
            for w in warnings:
                log.warning(w)
            log.info("server certificate reloaded", subject=identity.cert.subject, serial=identity.cert.serial_hex,
                     not_after=identity.cert.not_after.isoformat())
            return self._config()
        except Exception as exc:   # a fetcher that raises fails the handshake; keep serving instead
            log.error("reloading the server certificate failed; keeping the current one", error=repr(exc))
            return None

    def credentials(self) -> grpc.ServerCredentials:
        # grpc's docs: the fetcher returns None for "no change"; types-grpcio's Callable does not say so
        return grpc.dynamic_ssl_server_credentials(self._config(), self.fetch,  # type: ignore[arg-type]
                                                   require_client_authentication=True)


class RevocationList:
    """Revoked serials from a CRL (PEM or DER) signed by a client CA; re-read when the file changes."""

    def __init__(self, path: Path, cas: Callable[[], tuple[x509.Certificate, ...]]) -> None:
        self.path = path
        self._cas = cas
        self.serials: frozenset[int] = frozenset()
        self._sig: tuple[Any, ...] | None = None
        self.loads = 0
        error = self.refresh()
        if error:
            raise ConfigError(f"server.tls.revocation_list: {error}")

    def _read(self) -> frozenset[int]:
        data = self.path.read_bytes()
        try:
            crl = (x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data))
        except ValueError as exc:
            raise ValueError(f"{self.path} is not a certificate revocation list ({exc})") from None
        if not any(ca.subject == crl.issuer and _crl_signed_by(crl, ca) for ca in self._cas()):
            raise ValueError(f"{self.path} is not signed by the client CA (issuer {crl.issuer.rfc4514_string()}); "
                             "use the revoked.crl of the CA that issues the schools' certificates")
        return frozenset(r.serial_number for r in crl)

    def refresh(self) -> str | None:
        """Re-read the file if it changed; the error (the last good list is kept), or None."""
        sig = _signature([self.path])
        if sig == self._sig:
            return None
        if sig[0] is None:
            self._sig = sig
            return (f"{self.path} does not exist; copy the CA's revoked.crl there "
                    "(`fedserver certs init-ca` writes an empty one)")
        try:
            serials = self._read()
        except (OSError, ValueError) as exc:
            self._sig = sig   # not again until the file changes
            return str(exc) if isinstance(exc, ValueError) else f"cannot read {self.path}: {exc.strerror}"
        added = serials - self.serials
        self.serials, self._sig = serials, sig
        self.loads += 1
        if self.loads > 1:
            log.info("revocation list reloaded", path=str(self.path), revoked=len(serials), new=len(added))
        return None

    def is_revoked(self, serial: int) -> bool:
        error = self.refresh()
        if error:
            log.error("revocation list not reloaded; the previous one stays in force", error=error)
        return serial in self.serials


def _crl_signed_by(crl: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return crl.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except Exception:   # another key type
        return False


@dataclass(frozen=True)
class Peer:
    school_id: str
    cert: CertInfo


class PeerGuard:
    """The school a call comes from, by the certificate gRPC verified at the handshake."""

    MAX_CACHE = 4096

    def __init__(self, identity: ServerIdentity, revocations: RevocationList | None) -> None:
        self.identity = identity
        self.revocations = revocations
        self._parsed: dict[bytes, CertInfo] = {}

    def _info(self, pem: bytes) -> CertInfo:
        info = self._parsed.get(pem)
        if info is None:
            info = cert_info(load_certificates(pem)[0])
            if len(self._parsed) >= self.MAX_CACHE:
                self._parsed.clear()
            self._parsed[pem] = info
        return info

    def peer(self, context: grpc.aio.ServicerContext) -> Peer:
        auth = context.auth_context() or {}
        pems = list(auth.get("x509_pem_cert") or [])
        if not pems:
            raise AuthenticationError("no client certificate on this connection: connect with the school's "
                                      "certificate ([school.tls] cert and key in school.toml)")
        info = self._info(pems[0])
        return Peer(self.check(info), info)

    def check(self, info: CertInfo) -> str:
        """The school id of a verified certificate, or the reason it is refused now."""
        if info.school_id is None:
            raise CertificateRefusedError(
                f"the client certificate ({info.subject}, serial {info.serial_hex}) names no school (a subjectAltName "
                "URI schoolfed://school/<id>); ask the federation operator for one from `fedserver certs issue-school`")
        if self.revocations is not None and self.revocations.is_revoked(info.serial):
            raise CertificateRefusedError(
                f"the certificate of school {info.school_id} (serial {info.serial_hex}) has been revoked by the "
                f"federation operator; ask them for a new one (`fedserver certs issue-school --school {info.school_id}`) "
                "and install it as [school.tls] cert and key")
        if info.expired():
            raise AuthenticationError(
                f"the certificate of school {info.school_id} (serial {info.serial_hex}) expired on "
                f"{info.not_after:%Y-%m-%d %H:%M} UTC; ask the federation operator for a new one")
        return info.school_id

    def refused(self, info: CertInfo) -> str | None:
        try:
            self.check(info)
        except AuthenticationError as exc:
            return str(exc)
        return None


async def end_refused_sessions(guard: PeerGuard, engine: Any, peers: dict[str, CertInfo], every_s: float = 1.0) -> None:
    """Until cancelled: when a connected school's certificate is revoked (or expires), end its
    Session stream with the reason; its daemon reconnects and its Join is refused."""
    ended: set[tuple[str, int]] = set()
    while True:
        await asyncio.sleep(every_s)
        try:
            for sid, info in list(peers.items()):
                sess = engine.sessions.get(sid)
                if sess is None or (sid, info.serial) in ended:
                    continue
                why = guard.refused(info)
                if why is not None:
                    ended.add((sid, info.serial))
                    log.warning("ending a session: its certificate is refused now", school=sid, reason=why)
                    sess.queue.put_nowait(ShutdownCommand(why))
        except Exception as exc:   # never let the watcher die silently
            log.error("revocation watcher failed", error=repr(exc))
