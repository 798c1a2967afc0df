"""Checks of what a configuration points at on this machine (files, directories, models),
shared by `check-config` and the daemons' start-up: each returns a problem message naming the
config key and what to do, or None. Loading a config (common/config.py) checks its form;
these check the host, so the same file can be valid here and wrong there."""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from common.errors import ConfigError

# sha256("") : the hash of an empty token file
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:   # pragma: no cover - a uid without a passwd entry (containers)
        return str(os.geteuid())


def raise_problems(source: str, problems: Iterable[str]) -> None:
    found = [p for p in problems if p]
    if found:
        raise ConfigError(f"{source}: {len(found)} problem(s) on this machine (running as {user()}):\n  - "
                          + "\n  - ".join(found))


def port_in_use(listen: str) -> str | None:
    """'host:port' that cannot be bound now (another process has it), or None; port 0 is free."""
    import socket

    from common.monitoring import parse_listen

    try:
        host, port = parse_listen(listen)
    except ValueError:
        return None   # the config's form check reports it
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the servers bind: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as exc:
            return f"{listen}: {exc.strerror or exc}"
    return None


def dir_problem(key: str, path: Path, hint: str = "") -> str | None:
    """A directory the process writes: it exists and is writable, or it can be created."""
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if path.exists():
        if not path.is_dir():
            return f"{key}: {path} exists but is not a directory{tail}"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{key}: {path} is not writable by {user()}; chown it to that user or point {key} elsewhere{tail}"
        return None
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{key}: cannot create {path}: {parent} is not a directory{tail}"
    if not os.access(parent, os.W_OK | os.X_OK):
        return (f"{key}: {path} does not exist and {user()} cannot create it ({parent} is not writable); "
                f"create it: sudo install -d -o {user()} -m 0750 {path}{tail}")
    return None


def jsonl_problem(key: str, path: Path, read: Callable[[Path], Any], hint: str) -> str | None:
    """A JSONL question file (or folder of them) the process reads: present, readable, parseable, not empty."""
    path = Path(path)
    if not path.exists():
        return f"{key}: {path} does not exist; {hint}"
    if not os.access(path, os.R_OK):
        return f"{key}: {path} is not readable by {user()}; give that user read access (e.g. chgrp + chmod 0640)"
    if path.is_dir() and not any(path.glob("*.jsonl")):
        return f"{key}: no *.jsonl files at the top of the folder {path} (sub-folders are not read); {hint}"
    try:
        items = read(path)
    except (ValueError, OSError) as exc:
        return f"{key}: {exc}"
    count = sum(len(part) for part in items) if isinstance(items, tuple) else len(items)   # read_pool: (questions, prompts)
    if count == 0:
        return f"{key}: {path} holds no questions; {hint}"
    return None


def read_secret(key: str, path: Path) -> tuple[str, str | None]:
    """(content stripped, None) or ("", problem): a token file that must exist, be readable and not be empty."""
    path = Path(path)
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return "", f"{key}: {path} does not exist; install the token file there (mode 0640, group of the service)"
    except IsADirectoryError:
        return "", f"{key}: {path} is a directory, not a token file"
    except PermissionError:
        return "", f"{key}: cannot read {path} as {user()}: permission denied; e.g. chgrp {user()} {path} && chmod 0640 {path}"
    except OSError as exc:
        return "", f"{key}: cannot read {path}: {exc.strerror}"
    except UnicodeDecodeError:
        return "", f"{key}: {path} is not a text file"
    if not text:
        return "", f"{key}: {path} is empty; it must hold the token"
    return text, None


def model_problem(key: str, spec: str, cache_dir: Path | None) -> str | None:
    from common.errors import ModelUnavailableError
    from common.models import check_available

    try:
        check_available(spec, cache_dir)
    except (ValueError, ModelUnavailableError) as exc:
        return f"{key}: {exc}"
    return None


def placeholder_hash(value: str) -> str | None:
    """Why a token_sha256 cannot be a real enrolment, or None: one repeated character (the
    example's 000…/111… placeholders) or the hash of an empty token."""
    v = value.lower()
    if len(set(v)) == 1:
        return f"a placeholder ({v[0]!r} x {len(v)})"
    if v == EMPTY_SHA256:
        return "the hash of an empty token"
    return None
