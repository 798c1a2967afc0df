"""What coordinator.toml points at, checked on this machine before anything heavy starts:
`fedserver check-config` and `fedserver serve` run the same checks, so a config that passes
the one does not crash the other (a problem is a ConfigError: exit 78, not restarted)."""

from __future__ import annotations

from pathlib import Path

from common.data import read_jsonl, read_pool
from common.preflight import (
    dir_problem, jsonl_problem, model_problem, placeholder_hash, port_in_use, raise_problems, read_secret,
)
from common.errors import ConfigError
from fedserver.config import CoordinatorConfig

# Every Path in coordinator.toml and how it is checked (tests/test_newcomer.py keeps this
# list complete: a new Path field must be added here).
PATH_KEYS = {
    "server.state_dir": "writable directory",
    "model.cache_dir": "writable directory",
    "teacher.cache_dir": "writable directory",
    "evaluation.eval_file": "questions file",
    "distill.pool_file": "pool file",
    "monitor.dashboard_token_file": "secret file",
    "server.tls.cert": "certificate (unset: the systemd credential server.crt)",
    "server.tls.key": "private key (unset: the systemd credential server.key)",
    "server.tls.client_ca": "CA certificate(s) (unset: the systemd credential ca.crt)",
    "server.tls.revocation_list": "certificate revocation list (optional)",
}


def check(cfg: CoordinatorConfig, checkpoint_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of `cfg` on this machine."""
    problems: list[str | None] = []
    warnings: list[str] = []
    s = cfg.server
    problems.append(dir_problem("server.state_dir", s.state_dir,
                                "under systemd, StateDirectory= creates /var/lib/fedserver at the first start"))
    if checkpoint_dir is not None:
        problems.append(dir_problem("--checkpoint-dir", checkpoint_dir))
    cache = cfg.model.cache_dir
    if cache is not None:
        problems.append(dir_problem("model.cache_dir", cache))
    else:
        warnings.append("model.cache_dir is not set: converted models go to ~/.cache/school-federation, which the "
                        "systemd unit (ProtectHome=yes) cannot write; set it under state_dir, e.g. /var/lib/fedserver/models")
    problems.append(model_problem("model.base", cfg.model.base, cache))
    t = cfg.teacher
    if t.cache_dir is not None:
        problems.append(dir_problem("teacher.cache_dir", t.cache_dir))
    if t.model and t.backend == "local":
        problems.append(model_problem("teacher.model", t.model, t.cache_dir or cache))
    if cfg.evaluation.eval_file is not None:
        problems.append(jsonl_problem(
            "evaluation.eval_file", cfg.evaluation.eval_file, read_jsonl,
            "`fedserver prepare-data --out DIR` writes DIR/eval/eval.jsonl; copy it there (readable by this user) "
            "or remove the key to skip server-side evaluation"))
    if cfg.distill.pool_file is not None:
        problems.append(jsonl_problem(
            "distill.pool_file", cfg.distill.pool_file, read_pool,
            "`fedserver prepare-data --out DIR --pool 300` writes DIR/public/pool.jsonl; copy it there "
            "(readable by this user)" + ("" if {"distill", "teach"} & set(cfg.schedule.rounds) else
                                         ", or remove the key: this schedule has no distill or teach rounds")))
    if cfg.monitor.dashboard_token_file is not None:
        problems.append(read_secret("monitor.dashboard_token_file", cfg.monitor.dashboard_token_file)[1])
    problems += tls_problems(cfg, warnings)
    for i, school in enumerate(cfg.schools):
        why = placeholder_hash(school.token_sha256) if school.token_sha256 else None
        if why:
            problems.append(f"schools[{i}] ({school.id}): token_sha256 is {why}, not a school's token: the example's "
                            f"entries must be replaced. Enrol the school with `fedserver token --school {school.id} "
                            "--out FILE` and paste the [[schools]] entry it prints, or remove this entry")
    for key, listen in (("server.listen", s.listen), ("monitor.metrics_listen", cfg.monitor.metrics_listen),
                        ("monitor.dashboard_listen", cfg.monitor.dashboard_listen)):
        busy = port_in_use(listen) if listen else None
        if busy:   # a warning: check-config next to a running coordinator finds its ports taken
            warnings.append(f"{key}: cannot bind {busy} now (is a coordinator already running?); serve would stop "
                            "with exit 78 unless it is free by then")
    return [p for p in problems if p], warnings


def tls_problems(cfg: CoordinatorConfig, warnings: list[str]) -> list[str | None]:
    """[server.tls]: the certificate, key and client CA readable and consistent, the revocation
    list readable and signed by the client CA; or plaintext, said out loud."""
    from fedserver.tls import RevocationList, load_server_identity

    tls = cfg.server.tls
    if tls.insecure:
        warnings.append("server.tls.insecure = true: plaintext gRPC, schools identified by their enrolment tokens "
                        "alone; set [server.tls] cert, key and client_ca for mutual TLS (docs/SECURITY.md)")
        return [cfg.server.plaintext_problem()]
    identity, _, problems, tls_warnings = load_server_identity(tls)
    warnings += tls_warnings
    if identity is None:
        return list(problems)
    host = cfg.server.listen.rsplit(":", 1)[0].strip("[]")
    if host not in ("", "0.0.0.0", "::") and host not in identity.cert.dns_names + identity.cert.ip_addresses:
        warnings.append(f"server.tls.cert: names {', '.join(identity.cert.dns_names + identity.cert.ip_addresses)}, not "
                        f"{host} (the listen address); the schools must dial a name the certificate carries")
    if tls.revocation_list is None:
        warnings.append("server.tls.revocation_list is not set: a school's certificate cannot be revoked, only its "
                        "[[schools]] entry removed (and the coordinator restarted); set it to the CA's revoked.crl")
        return []
    try:
        RevocationList(tls.revocation_list, lambda: identity.cas)
    except ConfigError as exc:
        return [str(exc)]
    return []


def require(cfg: CoordinatorConfig, source: str, checkpoint_dir: Path | None = None) -> list[str]:
    """Raise ConfigError listing every problem; return the warnings."""
    problems, warnings = check(cfg, checkpoint_dir)
    raise_problems(source, problems)
    return warnings
