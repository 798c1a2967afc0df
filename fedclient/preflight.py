"""What school.toml points at, checked on this machine: `fedclient check-config` and
`fedclient run` make the same checks and give the same messages (a problem: exit 78)."""

from __future__ import annotations

from pathlib import Path

from common.data import SCHOOL_HELDOUT, read_jsonl, without_heldout
from common.preflight import dir_problem, jsonl_problem, model_problem, raise_problems, read_secret
from fedclient.config import SchoolConfig, SchoolSection, load_school_identity

# Every Path in school.toml and how it is checked (tests/test_newcomer.py keeps this complete).
PATH_KEYS = {
    "school.token_file": "secret file (optional with TLS)",
    "school.tls.ca": "CA certificate (unset: the systemd credential ca.crt)",
    "school.tls.cert": "certificate (unset: the systemd credential school.crt)",
    "school.tls.key": "private key (unset: the systemd credential school.key)",
    "school.state_dir": "writable directory",
    "school.data_dir": "questions file or folder",
    "school.heldout_file": "questions file (optional: a warning)",
    "model.cache_dir": "writable directory",
}

# Reserved example domains (RFC 2606) never name a real coordinator: an unedited example.
PLACEHOLDER_HOSTS = ("example.org", "example.com", "example.net")


def heldout_path(s: SchoolSection) -> Path | None:
    """The held-out file: `heldout_file`, else the first that exists of DATA/heldout/heldout.jsonl
    (the documented layout, what prepare-data writes), DATA/heldout.jsonl and, for a data_dir
    that is a file, the file's sibling heldout.jsonl (DATA: data_dir, or its folder if a file)."""
    if s.heldout_file is not None:
        return s.heldout_file
    folder = s.data_dir if s.data_dir.is_dir() else s.data_dir.parent
    for candidate in (folder / SCHOOL_HELDOUT, folder / "heldout.jsonl", s.data_dir.parent / "heldout.jsonl"):
        if candidate.is_file():
            return candidate
    return None


def data_counts(data_dir: Path, heldout: Path | None) -> tuple[int, int]:
    """(questions the daemon will train on, questions under data_dir it leaves out as held out)."""
    train = read_jsonl(data_dir)
    try:
        held = read_jsonl(heldout) if heldout is not None and heldout.is_file() else []
    except (ValueError, OSError):
        held = []   # reported as a warning of its own
    kept = without_heldout(train, held)
    return len(kept), len(train) - len(kept)


def summary(cfg: SchoolConfig) -> str:
    """What check-config found, in one line (after the checks passed)."""
    s = cfg.school
    heldout = heldout_path(s)
    train, excluded = data_counts(s.data_dir, heldout)
    held = f"held-out {heldout}" if heldout is not None else "no held-out questions"
    if s.tls.insecure:
        who = "plaintext, token only"
    else:
        identity = load_school_identity(s.tls)[0]
        who = (f"mutual TLS as school {identity.cert.school_id} (certificate valid until {identity.cert.not_after:%Y-%m-%d})"
               if identity is not None else "mutual TLS")
    return (f"ok: trains on {train} questions from {s.data_dir}" + (f" ({excluded} held-out ones left out)" if excluded else "")
            + f"; {held}; coordinator {s.coordinator} ({who}); model {cfg.model.base}")


def check(cfg: SchoolConfig) -> tuple[str, list[str], list[str]]:
    """(token, problems, warnings) of `cfg` on this machine."""
    s = cfg.school
    problems: list[str | None] = []
    warnings: list[str] = []
    host = s.coordinator.rsplit(":", 1)[0].strip("[]").lower()
    if host.endswith(PLACEHOLDER_HOSTS):
        problems.append(f"school.coordinator: {s.coordinator} is the example's placeholder; set the coordinator's "
                        "host:port (its [server] listen port), as its operator gave it to you")
    token = ""
    if s.token_file is not None:
        token, problem = read_secret("school.token_file", s.token_file)
        problems.append(problem)
    if s.tls.insecure:
        warnings.append("school.tls.insecure = true: plaintext gRPC, this school identified by its token alone; set "
                        "[school.tls] ca, cert and key for mutual TLS (docs/SECURITY.md)")
    else:
        _, tls_problems, tls_warnings = load_school_identity(s.tls)
        problems += tls_problems
        warnings += tls_warnings
    data_problem = jsonl_problem("school.data_dir", s.data_dir, read_jsonl,
                                 "put the school's questions there: a JSONL file, or a folder whose top-level "
                                 "*.jsonl files are read (see deploy/README.md)")
    problems.append(data_problem)
    heldout = heldout_path(s)
    if data_problem is None and heldout is not None and heldout.is_file():
        train, held = data_counts(s.data_dir, heldout)
        if train == 0:
            problems.append(f"school.data_dir: every question under {s.data_dir} is also in the held-out file "
                            f"{heldout}; point data_dir at the training questions (the held-out ones go in a "
                            "heldout/ sub-folder, which is not read as training data)")
        elif held:
            warnings.append(f"{held} of the questions under {s.data_dir} are also in the held-out file {heldout}; "
                            "they will not be trained on")
    if s.heldout_file is not None:
        problem = jsonl_problem("school.heldout_file", s.heldout_file, read_jsonl,
                                "local evaluation is skipped without it; remove the key if there is none")
        if problem:
            warnings.append(problem)
    elif heldout is None:
        warnings.append(f"no held-out questions (school.heldout_file unset and no {SCHOOL_HELDOUT} beside the "
                        "training data): this school will not score the global adapter locally")
    problems.append(dir_problem("school.state_dir", s.state_dir,
                                "under systemd, StateDirectory= creates /var/lib/fedclient at the first start"))
    if cfg.model.cache_dir is not None:
        problems.append(dir_problem("model.cache_dir", cfg.model.cache_dir))
    else:
        warnings.append("model.cache_dir is not set: converted models go to ~/.cache/school-federation, which the "
                        "systemd unit (ProtectHome=yes) cannot write; set it under state_dir, e.g. /var/lib/fedclient/models")
    problems.append(model_problem("model.base", cfg.model.base, cfg.model.cache_dir))
    return token, [p for p in problems if p], warnings


def require(cfg: SchoolConfig, source: str) -> tuple[str, list[str]]:
    """(token, warnings); raise ConfigError listing every problem."""
    token, problems, warnings = check(cfg)
    raise_problems(source, problems)
    return token, warnings
