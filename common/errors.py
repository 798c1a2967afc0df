"""One exception tree for the federation; gRPC status codes are attached here, raised at the edge."""

from __future__ import annotations


class FederationError(Exception):
    """Base class. `status` names the grpc.StatusCode the servicer answers with."""

    status = "INTERNAL"


class ConfigError(FederationError):
    """A configuration file is wrong; the message lists every problem found."""

    status = "INVALID_ARGUMENT"


class AuthenticationError(FederationError):
    """Unknown school, bad token, or a missing/expired session."""

    status = "UNAUTHENTICATED"


class ProtocolError(FederationError):
    """A message that is malformed or out of order (e.g. chunks before the header)."""

    status = "INVALID_ARGUMENT"


class ValidationError(FederationError):
    """An update whose tensors are not what the round expects (names, shapes, dtypes, NaN...)."""

    status = "INVALID_ARGUMENT"


class ChecksumError(FederationError):
    """Bytes received do not hash to the sha256 the sender announced."""

    status = "DATA_LOSS"


class CorruptFileError(FederationError):
    """A file the coordinator wrote does not hash to the sha256 recorded for it (changed on
    disk: bit rot, a truncated copy, an edit); it is quarantined, never used."""

    status = "DATA_LOSS"


class TooLargeError(FederationError):
    """An upload or chunk larger than the configured limit."""

    status = "RESOURCE_EXHAUSTED"


class WrongRoundError(FederationError):
    """The update is for a round that is not open, or the school is not a participant."""

    status = "FAILED_PRECONDITION"


class IncompatibleSchoolError(FederationError):
    """The school's set-up cannot join this federation (another base model, an old daemon)."""

    status = "FAILED_PRECONDITION"


class UnavailableError(FederationError):
    """The coordinator cannot do it now (its database is locked or full): nothing was changed,
    and the same call may succeed later; the school retries with backoff."""

    status = "UNAVAILABLE"


class DuplicateUploadError(FederationError):
    """The (round, school) pair already has an accepted update; replays are refused."""

    status = "ALREADY_EXISTS"


class NotFoundError(FederationError):
    """An artefact or upload id the coordinator does not hold."""

    status = "NOT_FOUND"


class ModelUnavailableError(FederationError):
    """A model spec that cannot be resolved on this machine (package missing, no network...)."""

    status = "FAILED_PRECONDITION"


class CertificateRefusedError(AuthenticationError):
    """A verified client certificate that may not act here: revoked, naming no school, or
    naming another school than the token or session presented with it."""

    status = "PERMISSION_DENIED"


# Trailing metadata on a RESOURCE_EXHAUSTED refusal that may be retried as is: milliseconds to
# wait first. Without it, RESOURCE_EXHAUSTED is final (an upload over the size limit).
RETRY_AFTER_KEY = "retry-after-ms"


class BusyError(FederationError):
    """The caller holds as many calls of this kind as it may, or the coordinator's budget for
    bytes in flight is spent: nothing was changed, retry after `retry_after_s`."""

    status = "RESOURCE_EXHAUSTED"
    retry_after_s = 1.0
