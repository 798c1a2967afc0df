"""The school daemon's configuration (school.toml), typed and documented per field."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SchoolTLSSection:
    """Mutual TLS to the coordinator (docs/SECURITY.md). ca, cert and key unset (or ""): read
    from systemd credentials, $CREDENTIALS_DIRECTORY/ca.crt, school.crt and school.key
    (LoadCredential= in fedclient.service). Read again at every (re)connection."""

    ca: Path | None = None       # the federation CA certificate; the coordinator's certificate must chain to it
    cert: Path | None = None     # this school's certificate (`fedserver certs issue-school`): its id is the identity
    key: Path | None = None      # its private key, PEM, unencrypted
    server_name: str = ""        # the name to expect in the coordinator's certificate; "" = the host of `coordinator`
    insecure: bool = False       # plaintext gRPC, the enrolment token only: development, loopback
    insecure_beyond_loopback: bool = False  # with insecure: also to a coordinator that is not on this machine

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            if str(getattr(self, name)) in ("", "."):
                object.__setattr__(self, name, None)


@dataclass(frozen=True)
class SchoolSection:
    coordinator: str = "127.0.0.1:50051"   # host:port of the coordinator
    token_file: Path | None = None      # enrolment token (keep it 0600); required without TLS, a second factor with it
    state_dir: Path = Path("/var/lib/fedclient")     # downloads, pending uploads, daemon state
    data_dir: Path = Path("/srv/school-data")        # a JSONL file or a folder of *.jsonl questions; never sent anywhere
    heldout_file: Path | None = None    # local held-out questions for evaluation; default DATA/heldout/heldout.jsonl if present
                                        # (DATA: data_dir, or its folder; see fedclient/preflight.py heldout_path); never trained on
    torch_threads: int = 0              # 0 = torch's default (all cores)
    max_batch_tokens: int = 1024        # padded tokens per training micro-batch (bounds memory, not results); 0 = whole batch
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower steps
    max_backoff_s: float = 30.0         # reconnect backoff cap, seconds
    log_level: str = "info"
    hardware: str = ""                  # free text reported at Join
    tls: SchoolTLSSection = field(default_factory=SchoolTLSSection)   # [school.tls]

    def problems(self) -> list[str]:
        from common.tls import is_loopback_host

        out = []
        if ":" not in self.coordinator:
            out.append(f"coordinator: expected host:port, got {self.coordinator!r}")
        if self.tls.insecure and self.token_file is None:
            out.append("token_file: required with [school.tls] insecure = true (without TLS the token is the "
                       "school's only identity)")
        if self.tls.insecure_beyond_loopback and not self.tls.insecure:
            out.append("tls.insecure_beyond_loopback: only means something with insecure = true; remove it")
        elif (self.tls.insecure and not self.tls.insecure_beyond_loopback and ":" in self.coordinator
              and not is_loopback_host(self.coordinator.rsplit(":", 1)[0].strip("[]"))):
            out.append(f"tls.insecure: the coordinator {self.coordinator} is not on this machine, and insecure = true "
                       "would send the updates and the token in plaintext. Set [school.tls] ca, cert and key (from the "
                       "federation operator) and remove insecure; or, on a network you trust (a VPN), also set "
                       "[school.tls] insecure_beyond_loopback = true")
        if self.torch_threads < 0:
            out.append("torch_threads: must be >= 0")
        if self.max_batch_tokens < 0:
            out.append("max_batch_tokens: must be >= 0 (0 = the whole batch at once)")
        if self.max_backoff_s <= 0:
            out.append("max_backoff_s: must be > 0")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            out.append("log_level: one of debug, info, warning, error")
        if len(self.hardware) > 200 or not self.hardware.isprintable():   # the coordinator refuses it at Join
            out.append("hardware: at most 200 printable characters (no line breaks)")
        return out


@dataclass(frozen=True)
class ClientModelSection:
    base: str = "packaged:smollm2-135m-instruct"  # must be the coordinator's base model
    cache_dir: Path | None = None


@dataclass(frozen=True)
class SimulationSection:
    """For research only: make this school a Byzantine attacker, to measure how far an
    aggregation strategy limits the damage. Never set on a real school."""

    attack: str = ""        # "" | "sign_flip" (send −scale·Δ) | "scale" (send scale·Δ)
    scale: float = 1.0

    def problems(self) -> list[str]:
        if self.attack not in ("", "sign_flip", "scale"):
            return [f"attack: {self.attack!r} is not '', 'sign_flip' or 'scale'"]
        return [] if self.scale > 0 else ["scale: must be > 0"]

    def apply(self, delta: dict[str, Any]) -> dict[str, Any]:
        if not self.attack:
            return delta
        factor = -self.scale if self.attack == "sign_flip" else self.scale
        return {k: v * factor for k, v in delta.items()}


@dataclass(frozen=True)
class ClientMonitorSection:
    """Prometheus metrics of this daemon ('' = off, the default). Bind loopback unless the
    school's monitoring scrapes from elsewhere; the page carries no school data, only counts."""

    metrics_listen: str = ""    # e.g. "127.0.0.1:9465"

    def problems(self) -> list[str]:
        from common.monitoring import parse_listen

        if not self.metrics_listen:
            return []
        try:
            parse_listen(self.metrics_listen)
        except ValueError as exc:
            return [f"metrics_listen: {exc}"]
        return []


@dataclass(frozen=True)
class SchoolConfig:
    school: SchoolSection = field(default_factory=SchoolSection)
    model: ClientModelSection = field(default_factory=ClientModelSection)
    simulation: SimulationSection = field(default_factory=SimulationSection)
    monitor: ClientMonitorSection = field(default_factory=ClientMonitorSection)


SCHOOL_TLS_KEYS = {"cert": "school.tls.cert", "key": "school.tls.key", "ca": "school.tls.ca"}


def load_school_identity(tls: SchoolTLSSection) -> tuple[Any, list[str], list[str]]:
    """(identity, problems, warnings): this school's certificate, key and the CA file, from the
    configured paths or systemd credentials (common/tls.py checks them)."""
    from common.tls import SCHOOL_CREDENTIALS, load_identity

    return load_identity(SCHOOL_TLS_KEYS, {"cert": tls.cert, "key": tls.key, "ca": tls.ca}, SCHOOL_CREDENTIALS,
                         role="school")
