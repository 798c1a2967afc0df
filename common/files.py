"""Crash-safe file writes: readers see the old file or the new one, never a torn one; and
secrets (tokens, private keys) created 0600, never through a planted symbolic link."""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from pathlib import Path
from typing import Any


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: Any = None   # libc's, once looked up; False where there is none


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes of the file to disk now, without waiting for
    it (Linux's sync_file_range, SYNC_FILE_RANGE_WRITE). Not a durability promise: the fsync
    that makes the file durable is still needed, but has little left to wait for. Called after
    each chunk of a file written over tens of milliseconds (uploads, the new adapter), it took
    the closing fsync of a 19.6 MB file from 8-10 ms to 0.1 ms for 1 ms more of writing
    (benchmarks/README.md). A no-op where the call does not exist; its errors are ignored."""
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = False
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).sync_file_range
                fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _sync_file_range = fn
            except (OSError, AttributeError):
                pass
    if _sync_file_range and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write `data` to a temp file beside `path`, then rename it over `path`.

    A process polling for `path` (a test waiting for a port file, a school reading its
    data) never sees it empty or half-written, and a crash mid-write leaves no debris."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def write_secret(path: Path, data: bytes | str, *, mode: int = 0o600, overwrite: bool = False, hint: str = "") -> None:
    """Create `path` holding a secret (an enrolment token, a private key) with `mode`, whatever
    the umask. Never through a symbolic link (O_NOFOLLOW: a link planted at `path`, dangling or
    not, is refused, not followed), never into a device, a pipe or a file with other hard links.
    An existing file is refused (O_EXCL) unless `overwrite`, which replaces a regular file's
    content in place (its mode reset to `mode`). Raises ConfigError naming the path and what to
    do; `hint` is appended (e.g. "choose another --out")."""
    import errno
    import stat

    from common.errors import ConfigError

    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    tail = f". {hint}" if hint else ""
    link = f"{path} is a symbolic link; refusing to write a secret through it (remove the link){tail}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | (0 if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        if path.is_symlink():   # O_EXCL does not follow a link either
            raise ConfigError(link) from None
        raise ConfigError(f"{path} already exists; not overwriting it{tail}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:   # O_NOFOLLOW met a link (with overwrite)
            raise ConfigError(link) from None
        raise ConfigError(f"cannot create {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
            raise ConfigError(f"{path} is not a plain file of its own (a device, a pipe or a hard link); "
                              "refusing to write a secret into it")
        os.fchmod(fd, mode)   # whatever the umask, and an existing file (overwrite) keeps no looser mode
        if overwrite:
            os.ftruncate(fd, 0)
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
