"""The coordinator's configuration (coordinator.toml), typed and documented per field."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from common.errors import ConfigError
from common.lora import ALL_PROJECTIONS, LoraSettings
from common.training import TrainParams

LOG_LEVELS = ("debug", "info", "warning", "error")


def _unset_if_empty(obj: Any, *names: str) -> None:
    """An empty path in TOML ("" -> Path(".")) means unset: the systemd credential is used."""
    for name in names:
        if str(getattr(obj, name)) in ("", "."):
            object.__setattr__(obj, name, None)


@dataclass(frozen=True)
class ServerTLSSection:
    """Mutual TLS on the gRPC port (docs/SECURITY.md). cert, key and client_ca unset (or ""):
    read from systemd credentials, $CREDENTIALS_DIRECTORY/server.crt, server.key and ca.crt
    (LoadCredential= in fedserver.service). Paths set here are re-read when the files change
    (certificate rotation without a restart)."""

    cert: Path | None = None              # the coordinator's certificate, PEM (`fedserver certs issue-server`)
    key: Path | None = None               # its private key, PEM, unencrypted (mode 0600 or a credential)
    client_ca: Path | None = None         # the CA certificate(s) school certificates must chain to
    revocation_list: Path | None = None   # CRL from `fedserver certs revoke`; re-read when it changes; unset: none
    insecure: bool = False                # plaintext gRPC, enrolment tokens only: development, loopback
    insecure_beyond_loopback: bool = False  # with insecure: also on a non-loopback listen address (a trusted VPN)

    def __post_init__(self) -> None:
        _unset_if_empty(self, "cert", "key", "client_ca", "revocation_list")

    def problems(self) -> list[str]:
        if self.insecure_beyond_loopback and not self.insecure:
            return ["insecure_beyond_loopback: only means something with insecure = true; remove it"]
        return []


@dataclass(frozen=True)
class ServerLimitsSection:
    """What one caller may hold of the coordinator (fedserver/admission.py, docs/RELIABILITY.md).
    Anonymous callers are refused before any request byte is read; these bound enrolled ones."""

    calls_per_school: int = 4             # calls one school may hold open at once, per method (Join, Upload, ...)
    request_timeout_s: float = 60.0       # a request message, or an upload's next chunk, must arrive whole within this
    upload_memory_mb: int = 160           # bytes uploads in progress hold at once (2 chunks each while streaming,
                                          # the whole payload when checked whole); more wait their turn
    streams_per_connection: int = 32      # HTTP/2 streams open at once on one connection (a school uses 2-4)
    max_connections: int = 0              # connections at once; 0: 4 per enrolled school + 1,024
    # What gRPC may buffer per incoming stream before our code reads it, in KiB (the HTTP/2
    # receive window). One upload then streams at most window / round-trip time (2 MiB: ~335
    # Mbit/s at 50 ms). 0: gRPC sizes windows to the link (BDP probing), and buffers grow with them.
    receive_window_kb: int = 2048

    def problems(self) -> list[str]:
        out = []
        if self.calls_per_school < 1:
            out.append("calls_per_school: must be >= 1")
        if self.request_timeout_s <= 0:
            out.append("request_timeout_s: must be > 0")
        if self.upload_memory_mb < 1:
            out.append("upload_memory_mb: must be >= 1")
        if self.streams_per_connection < 4:
            out.append("streams_per_connection: must be >= 4 (a school holds its session, a download, an upload "
                       "and a status call at once)")
        if self.max_connections < 0:
            out.append("max_connections: must be >= 0 (0: 4 per enrolled school + 1,024)")
        if self.receive_window_kb != 0 and not 64 <= self.receive_window_kb <= 1 << 20:
            out.append("receive_window_kb: must be 0 (gRPC's BDP probing) or 64 to 1,048,576")
        return out


@dataclass(frozen=True)
class ServerSection:
    listen: str = "127.0.0.1:50051"       # host:port; port 0 picks a free port (tests)
    state_dir: Path = Path("/var/lib/fedserver")  # SQLite state, artefacts, uploads, checkpoints
    max_upload_bytes: int = 64 * 1024 * 1024     # bytes; larger uploads are refused up front
    heartbeat_interval_s: float = 5.0     # seconds between school heartbeats (the shortest the coordinator asks for)
    session_timeout_s: float = 30.0       # seconds without a heartbeat before a school is dropped
    # The most heartbeats a second the coordinator asks of all its schools together: past
    # heartbeats_per_s x heartbeat_interval_s schools (625 by default) each school's interval,
    # and its timeout with it, is lengthened to schools / heartbeats_per_s (80 s and 480 s at
    # 10,000; a dead connection is noticed sooner, by HTTP/2 keepalive). 0: every school beats
    # at heartbeat_interval_s however many there are.
    heartbeats_per_s: float = 125.0
    log_level: str = "info"
    tls: ServerTLSSection = field(default_factory=ServerTLSSection)   # [server.tls]
    limits: ServerLimitsSection = field(default_factory=ServerLimitsSection)   # [server.limits]

    def problems(self) -> list[str]:
        out = []
        if ":" not in self.listen:
            out.append(f"listen: expected host:port, got {self.listen!r}")
        plaintext = self.plaintext_problem()
        if plaintext:
            out.append(plaintext)
        if self.max_upload_bytes <= 0:
            out.append("max_upload_bytes: must be > 0")
        if self.max_upload_bytes > self.limits.upload_memory_mb * 1024 * 1024:
            out.append(f"limits.upload_memory_mb: {self.limits.upload_memory_mb} MiB is less than max_upload_bytes "
                       f"({self.max_upload_bytes} bytes): the largest upload would never fit; raise it")
        if self.heartbeat_interval_s <= 0 or self.session_timeout_s <= self.heartbeat_interval_s:
            out.append("session_timeout_s must exceed heartbeat_interval_s > 0")
        if not self.heartbeats_per_s >= 0:
            out.append("heartbeats_per_s: must be >= 0 (0: no budget, every school beats at heartbeat_interval_s)")
        if self.log_level.lower() not in LOG_LEVELS:
            out.append(f"log_level: one of {', '.join(LOG_LEVELS)}")
        return out

    def plaintext_problem(self) -> str | None:
        """Plaintext gRPC reachable beyond this machine, not insisted on: refused."""
        from common.tls import is_loopback_host

        if not self.tls.insecure or self.tls.insecure_beyond_loopback or ":" not in self.listen:
            return None
        host = self.listen.rsplit(":", 1)[0].strip("[]")
        if is_loopback_host(host):
            return None
        return (f"tls.insecure: listen = {self.listen!r} is reachable beyond this machine, and insecure = true would "
                "serve it in plaintext (anyone on the path reads the updates and tokens). Set [server.tls] cert, key "
                "and client_ca (`fedserver certs`, docs/SECURITY.md) and remove insecure; or listen on 127.0.0.1; or, "
                "on a network you trust (a VPN), also set [server.tls] insecure_beyond_loopback = true")


@dataclass(frozen=True)
class ModelSection:
    base: str = "packaged:smollm2-135m-instruct"  # the schools' base model (spec: see common/models.py)
    cache_dir: Path | None = None                 # converted-model cache; default ~/.cache/school-federation


@dataclass(frozen=True)
class LoraSection:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    seed: int = 0            # seeds the round-0 adapter; every party can reproduce it

    def settings(self) -> LoraSettings:
        return LoraSettings(self.rank, self.alpha, self.dropout, self.target_modules)

    def problems(self) -> list[str]:
        out = []
        if self.rank < 1:
            out.append("rank: must be >= 1")
        if not self.target_modules:
            out.append("target_modules: must name at least one module")
        return out


@dataclass(frozen=True)
class RoundsSection:
    total: int = 3            # rounds to run, then shut the schools down and exit; 0 = forever
    min_schools: int = 2      # connected schools needed before a round starts
    fraction: float = 1.0     # share of connected schools asked to train each round
    quorum: int = 2           # accepted updates needed to commit a round
    deadline_s: float = 900.0 # seconds a round may stay open
    max_norm: float = 100.0   # L2 bound on an update (all tensors; honest ones measured 1.5-3.5); 0 disables
    start_timeout_s: float = 0.0  # give up if min_schools have not joined by then; 0 = wait forever
    max_failed_rounds: int = 3    # stop (exit 1) after this many failed rounds in a row; 0 = never

    def problems(self) -> list[str]:
        out = []
        if self.total < 0:
            out.append("total: must be >= 0")
        if self.min_schools < 1:
            out.append("min_schools: must be >= 1")
        if not 0 < self.fraction <= 1:
            out.append("fraction: must be in (0, 1]")
        if self.quorum < 1 or self.quorum > self.min_schools:
            out.append("quorum: must be in 1..min_schools")
        if self.deadline_s <= 0:
            out.append("deadline_s: must be > 0")
        return out


@dataclass(frozen=True)
class TrainSection:
    local_steps: int = 16
    batch_size: int = 8
    learning_rate: float = 3e-4
    max_seq_len: int = 256
    proximal_mu: float = 0.0

    def params(self, round_: int) -> TrainParams:
        return TrainParams(self.local_steps, self.batch_size, self.learning_rate, self.max_seq_len,
                           seed=round_, proximal_mu=self.proximal_mu)

    def problems(self) -> list[str]:
        out = []
        if self.local_steps < 1 or self.batch_size < 1 or self.max_seq_len < 8:
            out.append("local_steps, batch_size must be >= 1 and max_seq_len >= 8")
        if self.learning_rate <= 0:
            out.append("learning_rate: must be > 0")
        return out


@dataclass(frozen=True)
class StrategySection:
    """`name` picks a registered strategy (`fedserver strategies` lists them), `options` are
    its keys, and each `[[strategy.wrappers]]` table (name + its keys) composes around it,
    the first listed innermost."""

    name: str = "fedavg"
    options: dict[str, Any] = field(default_factory=dict)
    wrappers: tuple[dict[str, Any], ...] = ()
    # step_norm (how far the round moved the model in product space, ‖s·B'A' − s·B·A‖_F) for
    # FedAvg and its server optimisers: about 70 ms per round on the SmolLM2 adapter, more than
    # the aggregation itself, so off unless asked for. update_norm (factor space) is always there.
    product_metrics: bool = False


@dataclass(frozen=True)
class EvaluationSection:
    eval_file: Path | None = None   # public held-out questions (JSONL) the coordinator scores
    max_examples: int = 200
    school_max_examples: int = 32   # questions each school scores locally per round; 0 = skip
    school_timeout_s: float = 120.0  # after the last round, how long to wait for the schools' reports
    threads: int = 0                # torch threads for the coordinator's evaluation; 0 = default

    def problems(self) -> list[str]:
        out = []
        if self.max_examples < 0 or self.school_max_examples < 0:
            out.append("max_examples and school_max_examples must be >= 0")
        if self.school_timeout_s < 0:
            out.append("school_timeout_s must be >= 0 (0 = do not wait for the schools' last evaluation)")
        if self.threads < 0:
            out.append("threads must be >= 0 (0 = torch's default)")
        return out


ROUND_KINDS = ("train", "distill", "teach", "evaluate")
QUANTIZATIONS = ("nf4", "int8", "none")
TEACHER_BACKENDS = ("local", "openai")


@dataclass(frozen=True)
class TeacherSection:
    """The large model the coordinator holds (distill and teach rounds). `model` empty: none."""

    model: str = ""                 # model spec as [model] base: packaged:, hub id, dir:, gguf:
    quantization: str = "nf4"       # nf4 | int8 (bitsandbytes) | none (the checkpoint's dtype, float32 on CPU)
    backend: str = "local"          # local: loaded in this process; openai: an OpenAI-compatible server (vLLM, llama.cpp)
    url: str = ""                   # backend = openai: base URL, e.g. http://127.0.0.1:8000/v1
    served_model: str = ""          # backend = openai: the model name the server knows
    cache_dir: Path | None = None   # converted-model cache; default: [model] cache_dir
    threads: int = 0                # torch threads of the teacher's worker; 0 = torch's default
    batch_questions: int = 8        # questions per scoring batch
    max_batch_tokens: int = 2048    # padded tokens per training micro-batch
    eval_max_examples: int = 100    # held-out questions the teacher is scored on (before, and after each teach round)
    lora_rank: int = 8              # the teacher's own adapter (QLoRA on the quantized base), trained in teach rounds
    lora_alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learn_steps: int = 8            # optimiser steps per teach round on the schools' ensemble
    learn_batch: int = 8            # pool questions per step
    learn_rate: float = 2e-4
    learn_kd_weight: float = 0.5    # share of the KL to the ensemble; the rest: cross-entropy of its top option
    trainer: str = "shared"         # shared: one instance scores and trains; separate: a second instance of the
                                    # base trains and the adapter is copied across (twice the memory)
    seed: int = 0

    def problems(self) -> list[str]:
        out = []
        if not 0 <= self.learn_kd_weight <= 1:
            out.append("learn_kd_weight: must be in [0, 1]")
        if self.trainer not in ("separate", "shared"):
            out.append(f"trainer: 'separate' or 'shared', got {self.trainer!r}")
        if self.quantization not in QUANTIZATIONS:
            out.append(f"quantization: one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.backend not in TEACHER_BACKENDS:
            out.append(f"backend: one of {', '.join(TEACHER_BACKENDS)}, got {self.backend!r}")
        if self.backend == "openai" and not (self.url.startswith("http://") or self.url.startswith("https://")):
            out.append("url: backend = 'openai' needs the server's base URL, e.g. http://127.0.0.1:8000/v1")
        if self.threads < 0 or self.batch_questions < 1 or self.max_batch_tokens < 64:
            out.append("threads >= 0, batch_questions >= 1 and max_batch_tokens >= 64")
        if self.eval_max_examples < 0:
            out.append("eval_max_examples: must be >= 0")
        if self.lora_rank < 1 or self.learn_steps < 1 or self.learn_batch < 1 or self.learn_rate <= 0:
            out.append("lora_rank, learn_steps, learn_batch must be >= 1 and learn_rate > 0")
        return out


@dataclass(frozen=True)
class DistillSection:
    """The public prompt pool and how the exchange channel uses it."""

    pool_file: Path | None = None   # public questions (school-data JSONL), disjoint from schools and eval; prepare-data --pool
    slice_size: int = 64            # pool questions per distill / teach round
    open_slice_size: int = 16       # open prompts (if the pool has any) per distill round: the teacher answers them
    max_new_tokens: int = 24        # the teacher's answer to an open prompt: at most this many tokens, first line kept
    top_k: int = 0                  # > 0: packs also carry the teacher's per-token top-k (used by schools sharing its vocabulary)
    temperature: float = 1.0        # softens option distributions (teacher labels, school answers, KD loss)
    kd_weight: float = 1.0          # distill rounds: share of the school's loss from the teacher; the rest from its own data
    local_steps: int = 0            # distill rounds: the schools' steps (0 = [train] local_steps); a step costs ~2 train steps
    ensemble: str = "trimmed_mean"  # teach rounds: mean | weighted (by last held-out accuracy) | trimmed_mean | median
    trim: float = 0.2               # trimmed_mean: share cut from each end per question and option
    seed: int = 0                   # the pool's slice order

    def problems(self) -> list[str]:
        from fedserver.ensemble import RULES

        out = []
        if self.slice_size < 1:
            out.append("slice_size: must be >= 1")
        if self.local_steps < 0:
            out.append("local_steps: must be >= 0 (0 = the [train] local_steps)")
        if self.open_slice_size < 0:
            out.append("open_slice_size: must be >= 0 (0 = do not use the pool's open prompts)")
        if not 0 <= self.top_k <= 64:
            out.append("top_k: must be in [0, 64] (0 = text only)")
        if not 1 <= self.max_new_tokens <= 512:
            out.append("max_new_tokens: must be in [1, 512]")
        if self.temperature <= 0:
            out.append("temperature: must be > 0")
        if not 0 <= self.kd_weight <= 1:
            out.append("kd_weight: must be in [0, 1]")
        if self.ensemble not in RULES:
            out.append(f"ensemble: one of {', '.join(RULES)}, got {self.ensemble!r}")
        if not 0 <= self.trim < 0.5:
            out.append("trim: must be in [0, 0.5)")
        return out


@dataclass(frozen=True)
class ScheduleSection:
    """The sequence of round kinds, repeated: e.g. ["train", "distill", "train", "teach"]."""

    rounds: tuple[str, ...] = ("train",)

    def problems(self) -> list[str]:
        bad = [k for k in self.rounds if k not in ROUND_KINDS]
        out = [f"rounds: unknown kind(s) {bad}; choose from {', '.join(ROUND_KINDS)}"] if bad else []
        if not self.rounds:
            out.append("rounds: name at least one round kind")
        return out

    def kind_of(self, number: int) -> str:
        """The kind of round `number` (1-based)."""
        return self.rounds[(number - 1) % len(self.rounds)]


@dataclass(frozen=True)
class MonitorSection:
    """What the operator sees: Prometheus /metrics and the live dashboard, each on an HTTP port
    of its own ('' turns it off; port 0 picks a free one, written to STATE_DIR/monitor.json)."""

    metrics_listen: str = "127.0.0.1:9464"     # Prometheus text format at /metrics
    dashboard_listen: str = "127.0.0.1:8787"   # read-only web page at / (JSON at /api/state, live at /api/events)
    dashboard_token_file: Path | None = None   # required when the dashboard is bound beyond loopback; open it with ?token=...
    school_labels: bool = False                # per-school metric series (school ids as label values): opt in

    def problems(self) -> list[str]:
        from common.monitoring import is_loopback, parse_listen

        out = []
        for key in ("metrics_listen", "dashboard_listen"):
            value = getattr(self, key)
            if value:
                try:
                    parse_listen(value)
                except ValueError as exc:
                    out.append(f"{key}: {exc}")
        if self.dashboard_listen and self.dashboard_token_file is None:
            try:
                if not is_loopback(parse_listen(self.dashboard_listen)[0]):
                    out.append(f"dashboard_listen: {self.dashboard_listen} is reachable beyond this machine; set "
                               "dashboard_token_file (a file holding a long random secret, mode 0600) or bind 127.0.0.1")
            except ValueError:
                pass
        return out


@dataclass(frozen=True)
class SchoolEntry:
    id: str             # with TLS: the id in the school's certificate (schoolfed://school/<id>)
    token_sha256: str = ""  # sha256 hex of the school's enrolment token (`fedserver token` makes one); with TLS
                            # optional: set, the school must present that token as well (a second factor)

    def problems(self) -> list[str]:
        out = []
        if not self.id or not all(c.isalnum() or c in "-_." for c in self.id):
            out.append(f"id {self.id!r}: use letters, digits, '-', '_' or '.'")
        if self.token_sha256 and (len(self.token_sha256) != 64
                                  or any(c not in "0123456789abcdef" for c in self.token_sha256.lower())):
            out.append(f"token_sha256 for {self.id!r}: expected 64 hex characters")
        return out


@dataclass(frozen=True)
class CoordinatorConfig:
    server: ServerSection = field(default_factory=ServerSection)
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    rounds: RoundsSection = field(default_factory=RoundsSection)
    train: TrainSection = field(default_factory=TrainSection)
    strategy: StrategySection = field(default_factory=StrategySection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    distill: DistillSection = field(default_factory=DistillSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    schools: tuple[SchoolEntry, ...] = ()

    def problems(self) -> list[str]:
        ids = [s.id for s in self.schools]
        dup = sorted(i for i, n in Counter(ids).items() if n > 1)   # one pass: ids.count per id was O(schools²)
        out = [f"schools: duplicate ids {dup}"] if dup else []
        hashes = [s.token_sha256.lower() for s in self.schools if s.token_sha256]
        if len(set(hashes)) != len(hashes):
            out.append("schools: two schools share a token; give each school its own")
        if self.server.tls.insecure:
            tokenless = [s.id for s in self.schools if not s.token_sha256]
            if tokenless:
                out.append(f"schools: {tokenless} have no token_sha256, and without TLS ([server.tls] insecure = true) "
                           "a token is the only identity; enrol them with `fedserver token --school ID`")
        if not self.schools:
            out.append("schools: no school is enrolled; add [[schools]] entries (fedserver token --school ID)")
        exchange = sorted({k for k in self.schedule.rounds if k in ("distill", "teach")})
        if exchange and not self.teacher.model:
            out.append(f"schedule: {exchange} rounds need a teacher; set [teacher] model")
        if exchange and self.distill.pool_file is None:
            out.append(f"schedule: {exchange} rounds need a public prompt pool; set [distill] pool_file "
                       "(fedserver prepare-data --pool N writes one)")
        if "teach" in exchange and self.teacher.backend != "local":
            out.append("schedule: teach rounds train the teacher's own adapter, which needs [teacher] backend = 'local'")
        from fedserver.strategy import StrategyContext, build

        try:
            strategy = build(self.strategy)
            strategy.setup(StrategyContext(self.lora.settings(), {}, tuple(ids)))   # rank- and school-dependent checks
        except ConfigError as exc:
            out.append(str(exc))
        else:
            need = strategy.min_updates()
            if self.rounds.quorum < need:
                out.append(f"rounds.quorum: {self.strategy.name} needs at least {need} updates per round "
                           f"(options {self.strategy.options}); raise quorum and min_schools to {need} or change its options")
        return out
