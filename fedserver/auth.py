"""Who is calling. With mutual TLS the school id comes from the peer certificate gRPC verified
(fedserver/tls.py); an enrolment token, when presented or configured, must belong to the same
school (a second factor). Without TLS the enrolment token alone identifies the school at Join.
After Join, a session token, bound to the school (and, with TLS, to its certificate's id)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.errors import AuthenticationError, CertificateRefusedError

TOKEN_HEADER = "authorization"        # "Bearer <enrolment token>" on Join
SESSION_HEADER = "x-session-token"    # on every later RPC
MAX_TOKEN_CHARS = 1024                # an enrolment token longer than this is refused unread


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


@dataclass
class SessionInfo:
    school_id: str
    token: str


class Authenticator:
    """Maps credentials to a school id. Identity is settled once, at Join; a later message
    field never names the school."""

    def __init__(self, schools: Mapping[str, str]) -> None:
        self._schools = dict(schools)   # id -> token sha256 ("" = no token: certificate only)
        self._by_hash = {h.lower(): sid for sid, h in schools.items() if h}
        self._sessions: dict[str, SessionInfo] = {}
        self._token_of: dict[str, str] = {}   # school -> its live session token: a Join costs O(1), not O(schools)

    def _token_school(self, raw: str | bytes | None) -> str | None:
        """The school whose token `raw` ("Bearer <token>") is; None if none was sent."""
        if raw is None:
            return None
        if not isinstance(raw, str) or not raw.startswith("Bearer ") or len(raw) > MAX_TOKEN_CHARS:
            raise AuthenticationError("malformed enrolment token: send 'authorization: Bearer <token>' (the school's "
                                      f"token_file; at most {MAX_TOKEN_CHARS} characters)")
        digest = hash_token(raw[len("Bearer ") :].strip())
        # A lookup by the token's sha256, not a scan of every enrolled hash: the caller controls
        # the token, not its digest, so the lookup's timing tells it nothing about stored hashes.
        sid = self._by_hash.get(digest)
        if sid is not None and hmac.compare_digest(self._schools[sid].lower(), digest):
            return sid
        raise AuthenticationError("unknown school: this enrolment token is not in the coordinator's [[schools]] list")

    def identify(self, metadata: Iterable[tuple[str, str | bytes]], peer_school: str | None = None) -> str:
        """The school joining. `peer_school`: the id in the verified client certificate (TLS)."""
        md = {k.lower(): v for k, v in metadata}
        raw = md.get(TOKEN_HEADER)
        if peer_school is None:
            if raw is None:
                raise AuthenticationError("missing enrolment token: send 'authorization: Bearer <token>' (the school's token_file)")
            sid = self._token_school(raw)
            assert sid is not None
            return sid
        if peer_school not in self._schools:
            raise CertificateRefusedError(
                f"school {peer_school!r} (from its certificate) is not enrolled: the coordinator's [[schools]] list has "
                "no such id; ask the federation operator to add it")
        token_school = self._token_school(raw)
        if token_school is not None and token_school != peer_school:
            raise CertificateRefusedError(
                f"this connection's certificate is school {peer_school!r}'s but the enrolment token is another "
                "school's: a school's certificate cannot act for another school. Use this school's own token_file")
        if token_school is None and self._schools[peer_school]:
            raise AuthenticationError(
                f"school {peer_school!r} must also present its enrolment token (its [[schools]] entry has a "
                "token_sha256): set token_file in school.toml")
        return peer_school

    def open_session(self, school_id: str) -> SessionInfo:
        # One live session per school: a reconnect replaces the old token.
        old = self._token_of.pop(school_id, None)
        if old is not None:
            self._sessions.pop(old, None)
        info = SessionInfo(school_id, new_token())
        self._sessions[info.token] = info
        self._token_of[school_id] = info.token
        return info

    def school_for(self, metadata: Iterable[tuple[str, str | bytes]], peer_school: str | None = None) -> str:
        md = {k.lower(): v for k, v in metadata}
        tok = md.get(SESSION_HEADER)
        info = self._sessions.get(tok) if isinstance(tok, str) else None
        if info is None:
            raise AuthenticationError("no valid session: call Join again (the coordinator may have restarted)")
        if peer_school is not None and peer_school != info.school_id:
            raise CertificateRefusedError(
                f"this session belongs to school {info.school_id!r} but the connection's certificate is school "
                f"{peer_school!r}'s: a school's certificate cannot act for another school")
        return info.school_id
