"""Files the coordinator reads back from disk are checked against the sha256 recorded for them
before use; a bad one is moved aside here, never used and never deleted (docs/RELIABILITY.md,
"Verified state on restart")."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from common import digest
from common.errors import CorruptFileError, NotFoundError, ValidationError
from common.lora import MERGED_FILE, initial_state
from common.logs import get_logger
from common.wire import bytes_to_tensors, bytes_to_tensors_with_metadata, sha256_hex, tensors_to_bytes

if TYPE_CHECKING:
    from fedserver.engine import RoundEngine
    from fedserver.store import Receipt

QUARANTINE = "quarantine"   # under the state directory
COPIES = "artifact-copies"  # under the state directory: a second copy of the newest global adapters
_BLOCK = 1 << 20


def file_sha256(path: Path) -> str:
    """sha256 hex of a file, read a block at a time (never the whole file at once)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def quarantine(state_dir: Path, path: Path, label: str = "") -> Path | None:
    """Move `path` (a file or a directory) to STATE_DIR/quarantine/<UTC time>-<label>-<name>,
    where the operator can look at it; returns where it went (None: it was already gone)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    folder = Path(state_dir) / QUARANTINE
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    dst = folder / "-".join(p for p in (stamp, label, path.name) if p)
    n = 1
    while dst.exists():
        dst = dst.with_name(f"{dst.name}.{n}")
        n += 1
    shutil.move(str(path), str(dst))
    return dst


def copy_verified(src: Path, dst: Path, sha256: str, blake3: str = "") -> bool:
    """Copy `src` to `dst` (temp file, fsync, rename) if its bytes hash to `sha256`, or to
    `blake3` when that is given (the BLAKE3 of the same bytes, known from when they were
    written: a quarter of sha256's CPU); False (and nothing written) otherwise."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    algorithm, expected = digest.check_by(sha256, blake3)
    h = digest.hasher(algorithm)
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(_BLOCK):
                h.update(block)
                fout.write(block)
            fout.flush()
            os.fsync(fout.fileno())
        if h.hexdigest() != expected:
            tmp.unlink(missing_ok=True)
            return False
        os.replace(tmp, dst)
        return True
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Recovery:
    """What the round engine reads back from disk, checked before use, and what it does about a
    bad file: quarantine it, say so in one error line, count it, note it in the state (meta
    'state_recoveries') and recover: from an intact copy, by making the file again, by voiding
    a receipt (the school sends again), or by carrying on without it (docs/RELIABILITY.md)."""

    def __init__(self, eng: RoundEngine) -> None:
        self.eng = eng
        self.state_dir = Path(eng.cfg.server.state_dir)
        self.copies_dir = self.state_dir / COPIES
        self.log = get_logger("state")
        self.lost: set[str] = set()   # adapters found lost in this process (reported once)

    # ------------------------------------------------------------ one bad file
    def bad_file(self, what: str, path: Path | None, problem: str, action: str, round_: int = 0, **fields: Any) -> Path | None:
        """Quarantine `path` (None: nothing left to move), log one error line with what was
        wrong and what the coordinator did, count it and note it."""
        moved = None
        if path is not None:
            try:
                moved = quarantine(self.state_dir, path, what)
            except OSError as exc:   # cannot move it: it is still not used
                fields["quarantine_error"] = repr(exc)
        self.log.error(f"{what.replace('_', ' ')} failed verification and was not used; {action}", what=what,
                       path=str(path) if path else "", problem=problem[:400],
                       quarantined_to=str(moved) if moved else "", **({"round": round_} if round_ else {}), **fields)
        m = self.eng.metrics
        m.quarantined.labels(what).inc()
        m.note_failure(str(fields.get("school", "")), round_, f"{what.replace('_', ' ')} quarantined", f"{problem}; {action}")
        try:
            self.eng.store.add_recovery_note({"at": time.time(), "what": what, "path": str(path or ""), "round": round_,
                                              "problem": problem[:400], "action": action,
                                              "quarantined_to": str(moved or "")})
        except Exception as exc:   # the note is for the operator; a full disk must not stop the start
            self.log.warning("could not note the recovery in the state database", error=repr(exc))
        return moved

    # ------------------------------------------------------------ adapters
    def adapter_state(self, data: bytes) -> dict[str, torch.Tensor]:
        """An adapter's tensors, all finite (ValidationError otherwise)."""
        state = bytes_to_tensors(data)
        for name, t in state.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValidationError(f"{name} holds NaN or Inf")
        return state

    def checkpoint_files(self, sha: str) -> list[Path]:
        """The PEFT checkpoints' weights files that should hold `sha`'s bytes (rounds that
        committed it; round 0's initial adapter)."""
        numbers = {0} | {r.round for r in self.eng.store.rounds() if r.global_out == sha}
        out = []
        for n in sorted(numbers, reverse=True):
            folder = self.eng.checkpoint_dir / str(n)
            if not (folder / MERGED_FILE).exists():   # with merged tensors the weights file is not the artefact
                out.append(folder / "adapter" / "adapter_model.safetensors")
        return out

    def intact_copy(self, sha: str) -> tuple[bytes | None, str]:
        """(bytes that hash to `sha`, where they came from), or (None, '')."""
        for path, source in [(self.copies_dir / sha, "its second copy"),
                             *((p, f"the checkpoint {p.parent.parent.name}") for p in self.checkpoint_files(sha))]:
            try:
                if not path.is_file():
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            if sha256_hex(data) == sha:
                return data, f"{source} ({path})"
            if path == self.copies_dir / sha:   # a damaged copy is no safety net: out of the way
                self.bad_file("artifact_copy", path, f"the second copy of {sha[:12]}… does not hash to its name",
                              "a new copy is made once the adapter is intact again")
        cfg = self.eng.cfg
        data = tensors_to_bytes(initial_state(self.eng.layout, cfg.lora.seed))
        if sha256_hex(data) == sha:
            return data, "round 0's initial adapter, made again from its seed"
        return None, ""

    def repair_checkpoints(self, sha: str) -> None:
        """Checkpoint weights files damaged with the artefact (they share its bytes): linked to the restored artefact."""
        src = self.eng.artifacts.path(sha)
        for path in self.checkpoint_files(sha):
            try:
                if not path.is_file() or file_sha256(path) == sha:
                    continue
                tmp = path.with_name(f".{path.name}.repair")
                tmp.unlink(missing_ok=True)
                try:
                    os.link(src, tmp)
                except OSError:
                    shutil.copyfile(src, tmp)
                os.replace(tmp, path)
                self.log.warning("checkpoint weights repaired from the restored artefact", path=str(path))
            except OSError as exc:
                self.log.warning("could not repair a checkpoint's weights", path=str(path), error=repr(exc))

    def read_adapter(self, sha: str, what: str, lost: str, round_: int = 0,
                     quiet_missing: bool = False) -> dict[str, torch.Tensor] | None:
        """An adapter artefact's tensors, checked (hash, finite values); a bad or missing one is
        restored from an intact copy if there is one. None: lost (`lost` says what follows)."""
        arts = self.eng.artifacts
        if sha in self.lost:
            return None
        try:
            return self.adapter_state(arts.get(sha))
        except NotFoundError:
            if quiet_missing:
                return None
            found, problem = False, f"{what} {sha[:12]}… is missing from {arts.root}"
        except (CorruptFileError, ValidationError, OSError) as exc:
            found, problem = True, f"{what} {sha[:12]}…: {exc}"
        data, source = self.intact_copy(sha)
        state = None
        if data is not None:
            try:
                state = self.adapter_state(data)
            except ValidationError:
                data = None
        self.bad_file("global_adapter", arts.path(sha) if found else None, problem,
                      f"restored from {source}" if data is not None else f"no intact copy: {lost}", round_)
        if data is None:
            self.lost.add(sha)
            return None
        arts.put(data)
        self.repair_checkpoints(sha)
        return state

    def keep_copy(self, sha: str, keep: Collection[str] | None = None, check: bool = False) -> None:
        """A second copy of artefact `sha` under STATE_DIR/artifact-copies (a separate file, not a
        link: a damaged artefact and its checkpoint share their bytes). `keep`: the copies to
        keep besides it (the others are removed; None: none is). `check`: an existing copy is
        hashed too (at start-up)."""
        dst = self.copies_dir / sha
        try:
            if dst.is_file() and check and file_sha256(dst) != sha:
                self.bad_file("artifact_copy", dst, f"the second copy of {sha[:12]}… does not hash to its name",
                              "a new copy is made from the intact artefact")
            if not dst.is_file() and not copy_verified(self.eng.artifacts.path(sha), dst, sha, self.eng.artifacts.blake3(sha)):
                self.log.error("the global adapter changed on disk before its second copy was made; no copy kept", sha256=sha[:12])
            if keep is not None:
                for p in self.copies_dir.iterdir():
                    if p.name != sha and p.name not in keep:
                        p.unlink(missing_ok=True)
        except OSError as exc:   # a copy is a safety net: its failure is logged, never fatal
            self.log.warning("could not keep a second copy of the global adapter", sha256=sha[:12], error=repr(exc))

    def load_global(self, sha: str) -> tuple[str, dict[str, torch.Tensor]]:
        """The global adapter of record, checked; if it is lost (damaged, no intact copy), the
        newest intact older one (round 0's, made again from its seed, at worst) becomes the
        global adapter of record, loudly."""
        state = self.read_adapter(sha, "the global adapter", "the newest intact older global adapter is used instead")
        if state is not None:
            self.keep_copy(sha, check=True)
            return sha, state
        older, number = "", 0
        seen = {sha}
        for row in reversed(self.eng.store.rounds()):
            for cand, n in ((row.global_out, row.round), (row.global_in, row.round - 1)):
                if not cand or cand in seen or (cand == row.global_out and row.status != "committed"):
                    continue
                seen.add(cand)
                state = self.read_adapter(cand, f"round {n}'s global adapter", "an older one is tried", n, quiet_missing=True)
                if state is not None:
                    older, number = cand, n
                    break
            if state is not None:
                break
        if state is None:
            state = initial_state(self.eng.layout, self.eng.cfg.lora.seed)
            older, number = self.eng.artifacts.put_tensors(state), 0
        self.eng.store.set_meta("global_sha256", older)
        self.keep_copy(older, check=True)
        lost = [r.round for r in self.eng.store.rounds() if r.status == "committed" and r.round > number
                and r.global_out and r.global_out != older]
        self.eng.metrics.global_fallbacks.inc()
        self.log.error("the global adapter of record is lost (damaged on disk, no intact copy); the federation continues "
                       f"from round {number}'s global adapter: what rounds {lost[0] if lost else number + 1}.. taught it is lost",
                       lost_sha256=sha[:12], continues_from=older[:12], from_round=number, rounds_lost=len(lost))
        self.eng.store.add_recovery_note({"at": time.time(), "what": "global_adapter_fallback", "lost": sha,
                                          "continues_from": older, "from_round": number, "rounds_lost": lost})
        return older, state

    # ------------------------------------------------------------ the interrupted round
    def pack_ok(self, kind: Any, number: int, sha: str) -> bool:
        """The open round's pack is intact, or was made again with the same bytes."""
        arts = self.eng.artifacts
        try:
            arts.verify(sha)
            return True
        except NotFoundError:
            found, problem = False, f"round {number}'s pack {sha[:12]}… is missing"
        except (CorruptFileError, OSError) as exc:
            found, problem = True, f"round {number}'s pack: {exc}"
        data = kind.rebuild_pack(self.eng, number)
        ok = data is not None and sha256_hex(data) == sha
        self.bad_file("pack", arts.path(sha) if found else None, problem,
                      "made again from the prompt pool (the same bytes)" if ok
                      else "it cannot be made again: the round is closed as failed and the next one starts", number)
        if ok:
            assert data is not None
            arts.put(data)
        return ok

    def void_receipt(self, rc: Receipt, exc: BaseException) -> None:
        """A receipted result whose kept file is damaged, missing or no longer valid: quarantined
        and its receipt voided, so the school is asked for the result again."""
        problem = f"file missing ({exc.filename})" if isinstance(exc, FileNotFoundError) else str(exc)
        self.bad_file("update", Path(rc.path), problem,
                      f"its receipt is voided: {rc.school_id} counts as not having sent round {rc.round}'s result and "
                      "is asked for it again when it connects", rc.round, school=rc.school_id)
        self.eng.store.void_receipt(rc)

    # ------------------------------------------------------------ other files
    def strategy_state(self, path: Path, last: int) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The strategy's saved state after round `last`, checked against the sha256 its commit
        recorded and for finite values; None (quarantined, logged) when it is bad."""
        recorded = self.eng.store.get_meta("strategy_state_sha256") or ""
        rec_round, _, rec_sha = recorded.partition(":")
        try:
            data = path.read_bytes()
            digest = sha256_hex(data)
            if rec_round == str(last) and digest != rec_sha:
                raise CorruptFileError(f"{len(data)} bytes hashing to {digest[:12]}…, not to the {rec_sha[:12]}… "
                                       f"recorded with round {last}'s commit: it changed on disk")
            tensors, header = bytes_to_tensors_with_metadata(data)
            json.loads(header.get("strategy", "{}"))
            json.loads(header.get("meta", "{}"))
            for name, t in tensors.items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ValidationError(f"{name} holds NaN or Inf")
        except (CorruptFileError, ValidationError, ValueError, OSError) as exc:
            self.bad_file("strategy_state", path, str(exc), "the strategy's server state (its moments, its "
                          "accountant) starts from zero, as in a new federation", last)
            return None
        return tensors, header

    def teacher_adapter(self) -> str:
        """The teacher's adapter of record ('' for none), checked against the sha256 its commit
        recorded; a bad one is quarantined and the teacher starts from its base model."""
        store = self.eng.store
        saved = store.get_meta("teacher_adapter") or ""
        recorded = store.get_meta("teacher_adapter_sha256") or ""
        if not saved or not recorded:
            return saved
        weights = Path(saved) / "adapter_model.safetensors"
        try:
            digest = file_sha256(weights)
            if digest == recorded:
                return saved
            problem = f"{weights.name} hashes to {digest[:12]}…, not to the {recorded[:12]}… recorded with its commit"
        except OSError as exc:
            problem = f"{weights.name} cannot be read: {exc!r}"
        self.bad_file("teacher_adapter", Path(saved), problem, "the teacher starts from its base model: what it "
                      "learned in teach rounds is lost (its label packs are made again)")
        store.set_meta("teacher_adapter", "")
        store.set_meta("teacher_adapter_sha256", "")
        return ""

    def artifact_ok(self, sha: str, what: str, action: str) -> bool:
        """An artefact is intact (True); or it is missing (False) or damaged (quarantined, False)."""
        try:
            self.eng.artifacts.verify(sha)
            return True
        except NotFoundError:
            return False
        except (CorruptFileError, OSError) as exc:
            self.bad_file(what, self.eng.artifacts.path(sha), str(exc), action)
            return False

    def served_ok(self, sha: str) -> None:
        """Before an artefact is served: intact, or restored from an intact copy; else
        quarantined and CorruptFileError (NotFoundError when there is no such artefact)."""
        arts = self.eng.artifacts
        try:
            arts.verify(sha)
            return
        except CorruptFileError as exc:
            problem = str(exc)
        data, source = self.intact_copy(sha)
        self.bad_file("artifact", arts.path(sha), f"asked for by a download: {problem}",
                      f"restored from {source}" if data is not None else "no intact copy: the download is refused")
        if data is None:
            raise CorruptFileError(f"artefact {sha[:12]}… is damaged on the coordinator (its operator is told); "
                                   "wait for the next command")
        arts.put(data)
        self.repair_checkpoints(sha)
