"""Who is calling: enrolment tokens at Join, session tokens after. The seam for mutual TLS."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.errors import AuthenticationError

TOKEN_HEADER = "authorization"        # "Bearer <enrolment token>" on Join
SESSION_HEADER = "x-session-token"    # on every later RPC


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
    field never names the school. With mTLS, `identify` will read the peer certificate."""

    def __init__(self, schools: Mapping[str, str]) -> None:
        self._by_hash = {h.lower(): sid for sid, h in schools.items()}
        self._sessions: dict[str, SessionInfo] = {}

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        md = {k.lower(): v for k, v in metadata}
        raw = md.get(TOKEN_HEADER)
        if not isinstance(raw, str) or not raw.startswith("Bearer "):
            raise AuthenticationError("missing enrolment token: send 'authorization: Bearer <token>' (the school's token_file)")
        digest = hash_token(raw[len("Bearer ") :].strip())
        for known, sid in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                return sid
        raise AuthenticationError("unknown school: this enrolment token is not in the coordinator's [[schools]] list")

    def open_session(self, school_id: str) -> SessionInfo:
        # One live session per school: a reconnect replaces the old token.
        for tok, info in list(self._sessions.items()):
            if info.school_id == school_id:
                del self._sessions[tok]
        info = SessionInfo(school_id, new_token())
        self._sessions[info.token] = info
        return info

    def school_for(self, metadata: Iterable[tuple[str, str | bytes]]) -> str:
        md = {k.lower(): v for k, v in metadata}
        tok = md.get(SESSION_HEADER)
        info = self._sessions.get(tok) if isinstance(tok, str) else None
        if info is None:
            raise AuthenticationError("no valid session: call Join again (the coordinator may have restarted)")
        return info.school_id
