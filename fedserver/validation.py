"""Checks on an uploaded update before it may touch the aggregate. Pure functions."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import digest
from common.buffers import memory_axis, merge_runs, storage_view
from common.compression import decode
from common.errors import ChecksumError, ValidationError
from common.lora import TensorSpec
from common.wire import bytes_to_tensors

CODECS = ("int8", "topk")


def validate_update(payload: bytes | bytearray, announced: str, layout: Mapping[str, TensorSpec],
                    max_norm: float = 0.0, payload_digest: str | None = None, encoding: str = "",
                    frozen: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Parse and check an update; returns its tensors. Raises with a message that says what
    was wrong and what the school should do, so a bad upload changes nothing.
    `announced`: the digest the upload's header named (tagged, common/digest.py: sha256 hex or
    "blake3:<hex>"). `payload_digest`: the same computed while the bytes arrived (saves a pass).
    `encoding`: a compressed upload is decoded (with its own checks) before the dense checks.
    `frozen`: name patterns the school trained frozen this round (FFA-LoRA: "lora_A"); their
    deltas are zero by construction, so the school may leave them out and they are filled in."""
    actual = payload_digest or digest.same_algorithm(payload, announced)
    if actual != announced:
        raise ChecksumError(f"payload digest {digest.short(actual)} does not match the announced {digest.short(announced)}; "
                            "re-send the upload")
    if not encoding and not frozen:
        packed = packed_views(payload, layout)
        if packed is not None:   # what schools send: checked in one pass over the data, no copy
            flat, views = packed
            norm = float(torch.linalg.vector_norm(flat)) if flat.numel() else 0.0
            if not math.isfinite(norm):
                return check_tensors(views, layout, max_norm)   # finds the tensor at fault and says so
            if max_norm > 0 and norm > max_norm:
                raise ValidationError(f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}")
            return views
    check_header(payload, layout, encoding)   # before any tensor is built
    tensors = bytes_to_tensors(bytes(payload))
    if encoding:
        if encoding not in CODECS:
            raise ValidationError(f"unknown upload encoding {encoding!r}; this coordinator decodes {sorted(CODECS)}. Upgrade the school")
        budget = sum(math.prod(spec.shape) for spec in layout.values())
        tensors = decode(tensors, encoding, max_numel=budget)
    if frozen:
        tensors = {**{n: torch.zeros(spec.shape, dtype=spec.dtype) for n, spec in layout.items()
                      if n not in tensors and any(f in n for f in frozen)}, **tensors}
    return check_tensors(tensors, layout, max_norm)


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
MAX_FAST_HEADER = 16 << 20   # larger headers take the general parser (and its limits)

# The safetensors header of an update is bounded by the federation's layout: per tensor its name
# (a compressed one has up to three parts, "<name>::idx"...), dtype, shape and offsets, plus
# some metadata. A header past the bound, or more tensors than the layout has, is refused before
# the header is parsed into tensors: a million empty tensors is a small payload but a huge parse.
PARTS_PER_TENSOR = {"": 1, "int8": 2, "topk": 3}   # tensors sent per layout tensor, by encoding
HEADER_BYTES_PER_TENSOR = 160                       # '{"dtype":"F32","shape":[..],"data_offsets":[..]}' and quotes
HEADER_METADATA_BYTES = 64 << 10                     # __metadata__ and padding


def header_limits(layout: Mapping[str, TensorSpec], encoding: str = "") -> tuple[int, int]:
    """(most header bytes, most tensors) an update of `layout` may have."""
    parts = PARTS_PER_TENSOR.get(encoding, max(PARTS_PER_TENSOR.values()))
    per_name = sum(len(name.encode()) + len("::scale") + HEADER_BYTES_PER_TENSOR for name in layout)
    return HEADER_METADATA_BYTES + parts * per_name, parts * len(layout)


def check_header(payload: bytes | bytearray, layout: Mapping[str, TensorSpec], encoding: str = "") -> None:
    """The safetensors header's size and tensor count against the layout's bounds, read from the
    8-byte length and the (bounded) JSON header only; ValidationError saying what is wrong."""
    if len(payload) < 8:
        raise ValidationError(f"payload is not valid safetensors: {len(payload)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack_from("<Q", payload, 0)
    most_bytes, most_tensors = header_limits(layout, encoding)
    if n > most_bytes:
        raise ValidationError(f"payload is not valid safetensors for this federation: a header of {n:,} bytes, but an "
                              f"update of its {len(layout)} adapter tensors has at most {most_bytes:,}. Refused unparsed; "
                              "check the school's model and LoRA settings match the coordinator's")
    if 8 + n > len(payload):
        raise ValidationError(f"payload is not valid safetensors: a header of {n:,} bytes is longer than the "
                              f"{len(payload):,}-byte payload; re-send the upload")
    try:
        header = json.loads(memoryview(payload)[8:8 + n].tobytes())
    except ValueError as exc:
        raise ValidationError(f"payload is not valid safetensors: its header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValidationError("payload is not valid safetensors: its header is not a JSON object")
    count = len(header) - ("__metadata__" in header)
    if count > most_tensors:
        raise ValidationError(f"update holds {count:,} tensors but the federation's adapter has {len(layout)}"
                              + (f" (sent as {most_tensors} {encoding} parts)" if encoding and most_tensors != len(layout) else "")
                              + f": at least {count - most_tensors:,} unexpected. Refused before any tensor was built; "
                              "check the school's model and LoRA settings match the coordinator's")


def packed_spans(header_bytes: bytes | bytearray | memoryview, data_len: int, layout: Mapping[str, TensorSpec],
                 ) -> tuple[torch.dtype, list[tuple[int, int, str]]] | None:
    """(dtype, [(begin byte, end byte, name)] in payload order) when the safetensors header
    `header_bytes` (the JSON after the 8-byte length) describes exactly the layout's tensors,
    each of its dtype and shape, packed back to back in one dtype over `data_len` data bytes.
    None for anything else, which the general parser then takes (with its own messages)."""
    n = len(header_bytes)
    if n > min(MAX_FAST_HEADER, header_limits(layout)[0]):
        return None
    try:
        header = json.loads(bytes(header_bytes))
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    dtypes = {spec.dtype for spec in layout.values()}
    if header.keys() != layout.keys() or len(dtypes) != 1 or next(iter(dtypes)) not in _ST_DTYPES:
        return None
    dtype = next(iter(dtypes))
    item = torch.empty((), dtype=dtype).element_size()
    spans = []
    for name, entry in header.items():
        shape = layout[name].shape
        if not isinstance(entry, dict) or entry.get("dtype") != _ST_DTYPES[dtype] or entry.get("shape") != list(shape):
            return None
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            return None
        begin, end = offsets
        if end - begin != math.prod(shape) * item or begin % item:
            return None
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, _ in spans:
        if begin != pos:
            return None
        pos = end
    if pos != data_len or (8 + n) % item:
        return None
    return dtype, spans


def packed_views(payload: bytes | bytearray, layout: Mapping[str, TensorSpec]) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """(all elements as one flat tensor, each layout tensor as a view of it) when `payload` is
    a writable buffer (bytearray) holding exactly the layout's tensors, each of its dtype and
    shape, packed back to back in one dtype: no copy is made and the tensors share `payload`.
    None for anything else, which the general parser then takes (with its own messages)."""
    if not isinstance(payload, bytearray) or len(payload) < 8:
        return None
    (n,) = struct.unpack_from("<Q", payload, 0)
    if n > len(payload) - 8:
        return None
    found = packed_spans(memoryview(payload)[8:8 + n], len(payload) - 8 - n, layout)
    if found is None:
        return None
    dtype, spans = found
    item = torch.empty((), dtype=dtype).element_size()
    pos = len(payload) - 8 - n
    flat = torch.frombuffer(payload, dtype=dtype, offset=8 + n, count=pos // item) if pos else torch.empty(0, dtype=dtype)
    return flat, {name: flat[begin // item:end // item].view(layout[name].shape) for begin, end, name in spans}


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64}


@dataclass(frozen=True)
class PackedFile:
    """A complete packed update on disk: where each layout tensor's bytes are in the file.
    Strategies read it as a mapping of tensors (`FileDelta`), a tensor at a time."""

    path: Path
    data_start: int                          # 8 + header length
    dtype: torch.dtype
    spans: tuple[tuple[int, int, str], ...]  # (begin, end) byte offsets after data_start, payload order


_DTYPES_BY_NAME = {v: k for k, v in _ST_DTYPES.items()}


class FileState(Mapping[str, torch.Tensor]):
    """A committed adapter's tensors read from its artefact file on access, so the coordinator
    does not hold the global adapter through a round (it is read twice: the strategy's start,
    for shapes only, and the close). Each access returns a new tensor. The file was hashed when
    written or loaded; before each read one fstat compares it with what was checked, and a file
    that changed is judged again by `recheck` (the engine's: intact, or restored from its kept
    copy, or CorruptFileError), then read anew. `meta()` gives shapes and dtypes, no data."""

    def __init__(self, path: Path, recheck: Any = None) -> None:
        self.path = Path(path)
        self.recheck = recheck   # () -> None, raises CorruptFileError
        self._open()

    def _open(self) -> None:
        with open(self.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            head = os.pread(fh.fileno(), 8, 0)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (st.st_size,)
            if 8 + n > st.st_size or n > MAX_FAST_HEADER:
                raise ValueError(f"{self.path}: not a safetensors file")
            header = json.loads(os.pread(fh.fileno(), n, 8))
        header.pop("__metadata__", None)
        where: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            dtype = _DTYPES_BY_NAME.get(entry.get("dtype"))
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if dtype is None or end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > st.st_size:
                raise ValueError(f"{self.path}: tensor {name!r} is not one this reader takes")
            where[name] = (dtype, shape, 8 + n + begin, 8 + n + end)
        self._where = where
        self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)

    @classmethod
    def open(cls, path: Path, recheck: Any = None) -> FileState | None:
        """The file as a lazy state, or None when it is not a plain safetensors file of the
        dtypes read here (the caller keeps the tensors in memory)."""
        try:
            return cls(path, recheck)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def _current(self, fh: Any) -> None:
        st = os.fstat(fh.fileno())
        if (st.st_ino, st.st_size, st.st_mtime_ns) != self._stamp:
            raise _Changed

    def _read(self, fn: Any) -> Any:
        """fn(open file) once the file is found to be what was hashed (else judged again first)."""
        for attempt in (0, 1):
            try:
                with open(self.path, "rb") as fh:
                    self._current(fh)
                    return fn(fh)
            except _Changed:
                if attempt or self.recheck is None:
                    raise OSError(f"{self.path}: it changed on disk while the coordinator used it") from None
                self.recheck()   # intact after all, or restored, or CorruptFileError
                self._open()
        raise AssertionError("unreachable")

    def confirm(self) -> None:
        """What a read checks first, without reading: the file is still what was hashed (one
        fstat), else it is judged again by `recheck` (restored, or CorruptFileError / OSError as a
        read would raise). For a caller that holds the file's bytes in memory already."""
        self._read(lambda fh: None)

    def __getitem__(self, name: str) -> torch.Tensor:
        def read(fh: Any) -> torch.Tensor:
            dtype, shape, begin, end = self._where[name]
            buf = bytearray(end - begin)
            read_into(fh, begin, buf)
            return torch.frombuffer(buf, dtype=dtype).view(shape) if buf else torch.empty(shape, dtype=dtype)
        result: torch.Tensor = self._read(read)
        return result

    def read_into(self, out: Mapping[str, torch.Tensor]) -> None:
        """The values of `out`'s tensors (all of the file's, or some) read straight into them,
        by name; shapes and dtypes as in the file, contiguous. One read per run where the file's
        order and `out`'s memory agree (a state in segments, in name order, as the file is: a
        few reads, not hundreds)."""
        unknown = sorted(set(out) - set(self._where))
        if unknown:
            raise KeyError(f"{self.path.name} has no tensor {unknown[0]!r}")

        def read(fh: Any) -> None:
            pieces = []
            for name, (dtype, shape, begin, end) in sorted(self._where.items(), key=lambda kv: kv[1][2]):
                if name not in out:
                    continue
                t = out[name]
                if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
                    raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)} cannot take the file's {dtype} {shape}")
                if end > begin:
                    pieces.append((("file", begin, end - begin), memory_axis(t, in_bytes=True)))
            for (_, begin, n), (_, first, _, t) in merge_runs(pieces):
                read_into(fh, begin, storage_view(t, torch.uint8)[first:first + n].numpy().data)
        self._read(read)

    def meta(self) -> dict[str, torch.Tensor]:
        """Shapes and dtypes only (tensors on the meta device: no memory)."""
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, _, _) in self._where.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


class _Changed(Exception):
    pass


class FileDelta(FileState):
    """An accepted update's tensors read from its file on access (a tensor at a time), so the
    coordinator never holds a whole upload: a FileState whose places come from the check made
    as its bytes arrived (`packed`: nothing parsed again), in the layout's order. The averaging
    strategies read `packed` directly, in long runs (fedserver/strategy/fedavg.py fold_file)."""

    def __init__(self, packed: PackedFile, layout: Mapping[str, TensorSpec]) -> None:
        self.path = packed.path
        self.recheck = None
        self.packed = packed
        self.layout = layout
        where = {name: (begin, end) for begin, end, name in packed.spans}
        self._where = {name: (packed.dtype, tuple(spec.shape), packed.data_start + where[name][0],
                              packed.data_start + where[name][1]) for name, spec in layout.items()}
        st = os.stat(self.path)
        self._stamp = (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self) -> dict[str, torch.Tensor]:
        """Every tensor at once: views of the file read in one go (for rules that hold updates)."""
        data = read_whole(self.packed.path)
        found = packed_views(data, self.layout)
        if found is None:
            raise OSError(f"{self.packed.path}: no longer the update that was accepted; it changed on disk")
        return found[1]


def shapes_of(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors with `state`'s shapes and dtypes, reading nothing from a FileState."""
    return state.meta() if isinstance(state, FileState) else dict(state)


def read_whole(path: Path) -> bytearray:
    """A file's bytes in one buffer of exactly its size (a bytearray: validated as views, no copy)."""
    with open(path, "rb") as fh:
        buf = bytearray(os.fstat(fh.fileno()).st_size)
        read_into(fh, 0, buf)
    return buf


def read_into(fh: Any, offset: int, buf: bytearray | memoryview) -> None:
    """Fill `buf` from `fh` at `offset` (OSError if the file is shorter: it changed on disk)."""
    view = memoryview(buf)
    done = 0
    while done < len(view):
        got = os.preadv(fh.fileno(), [view[done:]], offset + done)
        if got <= 0:
            raise OSError(f"{getattr(fh, 'name', 'file')}: ended {len(view) - done} bytes early; it changed on disk")
        done += got


def sum_of_squares(x: np.ndarray) -> float:
    """x·x on the calling thread. Not np.dot, for two reasons (benchmarks/README.md):
    OpenBLAS splits a dot of more than 10,000 elements over its own threads, which then spin
    waiting for work and took the CPU from the coordinator's other threads (a round's close
    66-72 ms with it, 46-59 ms without, on 2 cores); and chunks arrive as views a few bytes into
    gRPC's messages, so their elements are seldom aligned, which takes np.dot off BLAS (0.21-0.30
    ms a MiB of float32, against 0.025 aligned). einsum's own loop: 0.11-0.12 ms unaligned, 0.05
    aligned, and it costs nobody else anything."""
    return float(np.einsum("i,i->", x, x))


class StreamCheck:
    """`validate_update`'s one-pass check of a packed update (what schools send), made while
    the bytes arrive: the safetensors header once it is complete, then each chunk's elements
    (finite, and their sum of squares for the norm bound) as they come, so that when the last
    byte lands nothing is left to check and no payload was held. Fed in order, by one thread
    at a time (the upload's writer). Anything that is not a packed update of the layout
    (compressed, frozen parts left out, an odd header, a non-finite value) makes `packed`
    False: the general path then reads the file and checks it whole, with its own messages."""

    def __init__(self, layout: Mapping[str, TensorSpec], total_size: int, max_norm: float = 0.0) -> None:
        self.layout = layout
        self.total_size = total_size
        self.max_norm = max_norm
        self.packed: bool | None = None     # None: header not complete yet
        self.fed = 0
        self._head = bytearray()
        self._carry = b""                   # the bytes of an element split across chunks
        self._sumsq = 0.0
        self._np: Any = None
        self._item = 0
        self._found: tuple[int, torch.dtype, tuple[tuple[int, int, str], ...]] | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self.fed += len(data)
        if self.packed is False:
            return
        view = memoryview(data)
        if self.packed is None:
            view = self._take_header(view)
            if not self.packed:
                return
        self._check(view)

    def _take_header(self, view: memoryview) -> memoryview:
        need = 8
        if len(self._head) >= 8:
            need = 8 + struct.unpack_from("<Q", self._head, 0)[0]
        while True:
            take = max(0, need - len(self._head))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) < need:
                return view   # more header to come
            if need == 8:
                (n,) = struct.unpack_from("<Q", self._head, 0)
                if n > min(MAX_FAST_HEADER, header_limits(self.layout)[0]) or 8 + n > self.total_size:
                    self._give_up()
                    return view
                need = 8 + n
                continue
            break
        found = packed_spans(memoryview(self._head)[8:], self.total_size - len(self._head), self.layout)
        if found is None or found[0] not in _NUMPY_DTYPES:
            self._give_up()
            return view
        dtype, spans = found
        self._found = (len(self._head), dtype, tuple(spans))
        self._np = _NUMPY_DTYPES[dtype]
        self._item = torch.empty((), dtype=dtype).element_size()
        self.packed = True
        self._head = bytearray()
        return view

    def _give_up(self) -> None:
        self.packed = False
        self._head = bytearray()
        self._carry = b""

    def _check(self, view: memoryview) -> None:
        if self._carry:
            joined = self._carry + bytes(view[:self._item - len(self._carry)])
            view = view[self._item - len(self._carry):]
            if len(joined) < self._item:
                self._carry = joined
                return
            self._carry = b""
            self._elements(memoryview(joined))
        usable = len(view) - len(view) % self._item
        if usable:
            self._elements(view[:usable])
        self._carry = bytes(view[usable:])

    def _elements(self, view: memoryview) -> None:
        x = np.frombuffer(view, dtype=self._np)
        if x.dtype == np.float16:
            x = x.astype(np.float32)
        with np.errstate(all="ignore"):   # an overflow is a non-finite sum, decided below
            s = sum_of_squares(x)
        if not math.isfinite(s):   # NaN, Inf or a norm past float range: the general path words it
            self._give_up()
            return
        self._sumsq += s

    def result(self, path: Path) -> PackedFile | None:
        """After the last byte: the payload as a `PackedFile` at `path` (where it is kept), or
        None when the general path must check it. Raises ValidationError past the norm bound."""
        if not self.packed or self.fed != self.total_size or self._carry or self._found is None:
            return None
        norm = self._sumsq ** 0.5
        if self.max_norm > 0 and norm > self.max_norm:
            raise ValidationError(f"update L2 norm {norm:.4g} exceeds the bound {self.max_norm:.4g}")
        data_start, dtype, spans = self._found
        return PackedFile(path, data_start, dtype, spans)


def check_tensors(tensors: Mapping[str, torch.Tensor], layout: Mapping[str, TensorSpec],
                  max_norm: float = 0.0) -> dict[str, torch.Tensor]:
    """Names, shapes, dtypes, finiteness and the norm bound of a dense update."""
    missing = sorted(set(layout) - set(tensors))
    unexpected = sorted(set(tensors) - set(layout))
    if missing or unexpected:
        raise ValidationError(
            f"update tensor names differ from the federation's adapter: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
            "check the school's model and LoRA settings match the coordinator's"
        )
    sq = 0.0
    for name, spec in layout.items():
        t = tensors[name]
        if tuple(t.shape) != spec.shape:
            raise ValidationError(f"{name}: shape {tuple(t.shape)}, expected {spec.shape}")
        if t.dtype != spec.dtype:
            raise ValidationError(f"{name}: dtype {t.dtype}, expected {spec.dtype}")
        # One pass: NaN or Inf anywhere makes the norm non-finite. (A finite float32 tensor
        # whose norm overflows float32 is refused too; no sane LoRA update is that large.)
        n = float(torch.linalg.vector_norm(t))
        if not math.isfinite(n):
            what = "NaN or Inf" if not bool(torch.isfinite(t).all()) else "values too large (norm overflows float32)"
            raise ValidationError(f"{name}: contains {what}; the school's training diverged (lower its learning rate)")
        sq += n * n
    norm = sq**0.5
    if max_norm > 0 and norm > max_norm:
        raise ValidationError(f"update L2 norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return dict(tensors)


# Self-reported numbers: a school's word is taken only within these bounds.
MAX_REPORTED_EXAMPLES = 10_000_000   # num_examples of one school's update (weights FedAvg)
MAX_METRICS = 32                     # metrics in one upload header or evaluation report
MAX_METRIC_NAME = 64


def metrics_problem(metrics: Mapping[str, float]) -> str | None:
    """A school's metrics: a few named, finite numbers."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics (at most {MAX_METRICS})"
    for key, value in metrics.items():
        if not key or len(key) > MAX_METRIC_NAME or not key.replace("_", "").isalnum():
            return f"metric name {key[:MAX_METRIC_NAME]!r} (letters, digits and '_', at most {MAX_METRIC_NAME})"
        if not math.isfinite(value):
            return f"metric {key} = {value} (must be finite)"
    return None


def header_numbers_problem(num_examples: int, metrics: Mapping[str, float]) -> str | None:
    if not 0 <= num_examples <= MAX_REPORTED_EXAMPLES:
        return f"num_examples = {num_examples} (must be in [0, {MAX_REPORTED_EXAMPLES:,}])"
    return metrics_problem(metrics)


def eval_report_problem(num_examples: int, metrics: Mapping[str, float], asked_at_most: int) -> str | None:
    """An evaluation report: at most the questions asked for, an accuracy in [0, 1] and a loss >= 0."""
    if not 0 <= num_examples <= max(asked_at_most, 0):
        return f"num_examples = {num_examples}, but at most {asked_at_most} questions were asked for"
    problem = metrics_problem(metrics)
    if problem:
        return problem
    if num_examples > 0:
        if not 0.0 <= metrics.get("accuracy", -1.0) <= 1.0:
            return "an evaluation report needs accuracy in [0, 1]"
        if metrics.get("loss", 0.0) < 0:
            return "loss must be >= 0"
    return None
