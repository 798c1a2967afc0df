"""Checks on an uploaded update before it may touch the aggregate. Pure functions."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Collection, Mapping

import torch

from common.compression import decode
from common.errors import ChecksumError, ValidationError
from common.lora import TensorSpec
from common.wire import bytes_to_tensors, sha256_hex

CODECS = ("int8", "topk")


def validate_update(payload: bytes | bytearray, announced_sha256: str, layout: Mapping[str, TensorSpec],
                    max_norm: float = 0.0, payload_sha256: str | None = None, encoding: str = "",
                    frozen: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Parse and check an update; returns its tensors. Raises with a message that says what
    was wrong and what the school should do, so a bad upload changes nothing.
    `payload_sha256`: the digest already computed while the bytes arrived (saves a pass).
    `encoding`: a compressed upload is decoded (with its own checks) before the dense checks.
    `frozen`: name patterns the school trained frozen this round (FFA-LoRA: "lora_A"); their
    deltas are zero by construction, so the school may leave them out and they are filled in."""
    actual = payload_sha256 or sha256_hex(payload)
    if actual != announced_sha256:
        raise ChecksumError(f"payload sha256 {actual[:12]}… does not match the announced {announced_sha256[:12]}…; re-send the upload")
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


def packed_views(payload: bytes | bytearray, layout: Mapping[str, TensorSpec]) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """(all elements as one flat tensor, each layout tensor as a view of it) when `payload` is
    a writable buffer (bytearray) holding exactly the layout's tensors, each of its dtype and
    shape, packed back to back in one dtype: no copy is made and the tensors share `payload`.
    None for anything else, which the general parser then takes (with its own messages)."""
    if not isinstance(payload, bytearray) or len(payload) < 8:
        return None
    (n,) = struct.unpack_from("<Q", payload, 0)
    if n > min(len(payload) - 8, MAX_FAST_HEADER, header_limits(layout)[0]):
        return None   # the general parser refuses it with its reasons
    try:
        header = json.loads(memoryview(payload)[8:8 + n].tobytes())
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
    if 8 + n + pos != len(payload) or (8 + n) % item:
        return None
    flat = torch.frombuffer(payload, dtype=dtype, offset=8 + n, count=pos // item) if pos else torch.empty(0, dtype=dtype)
    return flat, {name: flat[begin // item:end // item].view(layout[name].shape) for begin, end, name in spans}


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
