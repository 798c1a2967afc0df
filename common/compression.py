"""Update compression for LoRA delta uploads, with client-side error feedback.

Per school k and round t (see docs/STRATEGIES.md), with compressor C and residual e_k (0 at start):

    u = Δ_k + e_k;   send C(u);   e_k <- u - D(C(u))        (D = decode)
    e_k <- γ · e_k   for every round the school misses, γ = feedback_decay ∈ [0.5, 1]

so Σ_t D(C(u_t)) + e_k = Σ_t Δ_t (γ = 1): nothing is lost, only delayed.

Codecs (every delta tensor is float32, 1-D or 2-D; a 1-D tensor is one row):

- int8:  s_r = max_j |u_rj| / 127,  q_rj = round(u_rj / s_r) ∈ [-127, 127]  (s_r = 0 ⇒ q_r = 0),
         D = q_rj · s_r, so |u_rj - D_rj| <= s_r / 2.  Sent as `<name>::q` (int8, u's shape) and
         `<name>::scale` (float32, one per row).
- topk:  keep the k = max(1, ceil(f · numel)) entries of largest |u|; sent as `<name>::idx`
         (int32 flat indices, strictly increasing), `<name>::val` (float32) and `<name>::shape`
         (int64, the dense shape).  D is zero elsewhere.
- none:  the delta itself.

`decode` is the coordinator's side: it treats the payload as hostile, checks every tensor
before allocating anything, never allocates more than the declared dense size and refuses
payloads that declare more than `max_numel` elements in total.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from common.errors import ValidationError
from common.wire import tensors_to_bytes

KINDS = ("none", "int8", "topk")
SEP = "::"
SUFFIXES: dict[str, tuple[str, ...]] = {"none": (), "int8": ("q", "scale"), "topk": ("idx", "val", "shape")}
DEFAULT_MAX_NUMEL = 50_000_000
_INT32_MAX = 2**31 - 1
_FIX = "the school must re-encode its update with common.compression.encode (update the school daemon if it is old)"


@dataclass(frozen=True)
class CompressionSpec:
    kind: str = "none"  # "none" | "int8" | "topk"
    topk_fraction: float = 0.01
    error_feedback: bool = True
    feedback_decay: float = 1.0

    def problems(self) -> list[str]:
        """Every problem with this spec, as sentences an operator can act on; [] if valid."""
        out: list[str] = []
        if self.kind not in KINDS:
            out.append(f"compression kind {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if not _is_real(self.topk_fraction) or not 0.0 < self.topk_fraction <= 1.0:
            out.append(f"topk_fraction {self.topk_fraction!r} must be a number in (0, 1], e.g. 0.01 for 1%")
        if not isinstance(self.error_feedback, bool):
            out.append(f"error_feedback {self.error_feedback!r} must be true or false")
        if not _is_real(self.feedback_decay) or not 0.5 <= self.feedback_decay <= 1.0:
            out.append(f"feedback_decay {self.feedback_decay!r} must be a number in [0.5, 1] (1 = keep the residual)")
        return out

    def to_json(self) -> str:
        """Compact JSON; from_json(to_json()) == self. Non-finite numbers raise ValueError."""
        return json.dumps({"kind": self.kind, "topk_fraction": self.topk_fraction,
                           "error_feedback": self.error_feedback, "feedback_decay": self.feedback_decay},
                          separators=(",", ":"), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> CompressionSpec:
        """Parse to_json()'s output. Structural errors raise ValueError; see problems() for values."""
        try:
            d = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"compression spec is not valid JSON: {exc}") from exc
        if not isinstance(d, dict):
            raise ValueError(f"compression spec must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {"kind", "topk_fraction", "error_feedback", "feedback_decay"})
        if unknown:
            raise ValueError(f"compression spec has unknown fields {unknown}")
        kw: dict[str, object] = {}
        if "kind" in d:
            if not isinstance(d["kind"], str):
                raise ValueError(f"compression spec 'kind' must be a string, got {d['kind']!r}")
            kw["kind"] = d["kind"]
        for name in ("topk_fraction", "feedback_decay"):
            if name in d:
                if not _is_real(d[name]):
                    raise ValueError(f"compression spec {name!r} must be a number, got {d[name]!r}")
                kw[name] = float(d[name])
        if "error_feedback" in d:
            if not isinstance(d["error_feedback"], bool):
                raise ValueError(f"compression spec 'error_feedback' must be true or false, got {d['error_feedback']!r}")
            kw["error_feedback"] = d["error_feedback"]
        return cls(**kw)  # type: ignore[arg-type]


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_spec(spec: CompressionSpec) -> None:
    problems = spec.problems()
    if problems:
        raise ValueError("invalid compression spec: " + "; ".join(problems))


def topk_count(fraction: float, numel: int) -> int:
    """k = max(1, ceil(fraction · numel)), capped at numel. The product is rounded to 6
    decimals first so float noise (0.07 · 100 = 7.000000000000001) does not add an entry."""
    return min(numel, max(1, math.ceil(round(fraction * numel, 6))))


# ---------------------------------------------------------------- encode


def _check_delta(delta: Mapping[str, torch.Tensor]) -> None:
    for name, t in delta.items():
        if not isinstance(name, str) or not name or SEP in name:
            raise ValueError(f"delta tensor name {name!r} must be a non-empty string without {SEP!r}")
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
            raise ValueError(f"{name}: expected a float32 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty 1-D or 2-D tensor, got shape {tuple(t.shape)}")
        if t.numel() > _INT32_MAX:
            raise ValueError(f"{name}: {t.numel()} elements do not fit int32 indices")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name}: contains NaN or Inf; refusing to compress a diverged update")


def _encode_int8(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = u.reshape(1, -1) if u.dim() == 1 else u
    scale = rows.abs().amax(dim=1) / 127.0
    denom = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / denom[:, None]).clamp_(-127, 127)
    q[scale == 0] = 0
    return q.to(torch.int8).reshape(u.shape), scale.to(torch.float32)


def _encode_topk(u: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    flat = u.reshape(-1)
    k = topk_count(fraction, flat.numel())
    idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
    return idx.to(torch.int32), flat[idx].clone()


def encode(delta: Mapping[str, torch.Tensor], spec: CompressionSpec) -> dict[str, torch.Tensor]:
    """Compress a delta into a flat name -> tensor dict that safetensors can write.
    Raises ValueError for a bad spec or a delta that is not finite float32 1-D/2-D tensors."""
    _check_spec(spec)
    _check_delta(delta)
    if spec.kind == "none":
        return dict(delta)
    out: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        u = t.detach().cpu()
        if spec.kind == "int8":
            out[f"{name}{SEP}q"], out[f"{name}{SEP}scale"] = _encode_int8(u)
        else:
            out[f"{name}{SEP}idx"], out[f"{name}{SEP}val"] = _encode_topk(u, spec.topk_fraction)
            out[f"{name}{SEP}shape"] = torch.tensor(list(u.shape), dtype=torch.int64)
    return out


# ---------------------------------------------------------------- decode


def _bad(name: str, problem: str, fix: str = _FIX) -> ValidationError:
    return ValidationError(f"compressed update, tensor {name!r}: {problem}; {fix}")


def _group(tensors: Mapping[str, torch.Tensor], kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {suffix: tensor}, checking suffixes and that every companion is present."""
    allowed = SUFFIXES[kind]
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise _bad(key, f"is a {type(t).__name__}, not a tensor")
        base, sep, suffix = key.rpartition(SEP)
        if not sep:
            raise _bad(key, f"has no codec suffix; a {kind} payload holds only "
                            f"{', '.join(SEP + s for s in allowed)} tensors (was the kind declared wrongly?)")
        if suffix not in allowed:
            raise _bad(key, f"has unknown suffix {SEP + suffix!r} for kind {kind!r} "
                            f"(expected one of {', '.join(SEP + s for s in allowed)}; was the kind declared wrongly?)")
        if not base or SEP in base:
            raise _bad(key, f"has a malformed name (empty or containing a second {SEP!r})")
        groups.setdefault(base, {})[suffix] = t
    for base, parts in groups.items():
        missing = [s for s in allowed if s not in parts]
        if missing:
            raise _bad(base, f"has {', '.join(SEP + s for s in sorted(parts))} but is missing its companion "
                             f"{', '.join(SEP + s for s in missing)}")
    return groups


def _dtype(name: str, suffix: str, t: torch.Tensor, want: torch.dtype) -> None:
    if t.dtype != want:
        raise _bad(name, f"{SEP}{suffix} has dtype {t.dtype}, expected {want}")


def _check_int8(name: str, q: torch.Tensor, scale: torch.Tensor) -> int:
    """Checks that need no large allocation; returns the dense numel."""
    _dtype(name, "q", q, torch.int8)
    _dtype(name, "scale", scale, torch.float32)
    if q.dim() not in (1, 2) or q.numel() == 0:
        raise _bad(name, f"{SEP}q must be a non-empty 1-D or 2-D tensor, got shape {tuple(q.shape)}")
    rows = 1 if q.dim() == 1 else q.shape[0]
    if scale.dim() != 1 or scale.numel() != rows:
        raise _bad(name, f"{SEP}scale has shape {tuple(scale.shape)} but {SEP}q has {rows} row(s); "
                         "int8 needs exactly one float32 scale per row")
    return q.numel()


def _decode_int8(name: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if not bool(torch.isfinite(scale).all()):
        raise _bad(name, f"{SEP}scale contains NaN or Inf")
    if bool((scale < 0).any()):
        raise _bad(name, f"{SEP}scale contains a negative value (scales are max|u|/127 >= 0)")
    if bool((q == -128).any()):
        raise _bad(name, f"{SEP}q contains -128, which the symmetric int8 codec never produces")
    rows = q.reshape(1, -1) if q.dim() == 1 else q
    if bool((rows[scale == 0] != 0).any()):
        raise _bad(name, f"{SEP}q has non-zero values in a row whose scale is 0")
    dense = (rows.to(torch.float32) * scale[:, None]).reshape(q.shape)
    if not bool(torch.isfinite(dense).all()):
        raise _bad(name, f"{SEP}scale is so large that q * scale overflows float32")
    return dense


def _check_topk(name: str, idx: torch.Tensor, val: torch.Tensor, shape: torch.Tensor, budget: int) -> tuple[int, ...]:
    """Checks on the small tensors; returns the declared dense shape (numel <= budget)."""
    _dtype(name, "idx", idx, torch.int32)
    _dtype(name, "val", val, torch.float32)
    _dtype(name, "shape", shape, torch.int64)
    if shape.dim() != 1 or shape.numel() not in (1, 2):
        raise _bad(name, f"{SEP}shape must be a 1-D int64 tensor of 1 or 2 dims, got shape {tuple(shape.shape)}")
    dims = tuple(int(d) for d in shape.tolist())
    if any(d <= 0 for d in dims):
        raise _bad(name, f"{SEP}shape {list(dims)} has a non-positive dimension")
    numel = math.prod(dims)  # Python ints: no overflow
    if numel > budget:
        raise _bad(name, f"{SEP}shape {list(dims)} declares {numel} elements, more than the {budget} "
                         "this payload may still declare (max_numel); it is not an adapter delta of this federation",
                   "refused without allocating; check the school's model and LoRA settings")
    if idx.dim() != 1 or val.dim() != 1 or idx.numel() != val.numel():
        raise _bad(name, f"{SEP}idx (shape {tuple(idx.shape)}) and {SEP}val (shape {tuple(val.shape)}) "
                         "must be 1-D with the same length")
    if idx.numel() == 0:
        raise _bad(name, "keeps no entries; top-k always keeps at least one")
    if idx.numel() > numel:
        raise _bad(name, f"keeps {idx.numel()} entries but {SEP}shape {list(dims)} has only {numel}")
    return dims


def _decode_topk(name: str, idx: torch.Tensor, val: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    numel = math.prod(dims)
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= numel:
        raise _bad(name, f"{SEP}idx has index {lo if lo < 0 else hi}, outside 0..{numel - 1} for shape {list(dims)}")
    steps = idx[1:].to(torch.int64) - idx[:-1].to(torch.int64)
    if bool((steps == 0).any()):
        raise _bad(name, f"{SEP}idx contains a duplicated index")
    if bool((steps < 0).any()):
        raise _bad(name, f"{SEP}idx is not sorted ascending")
    if not bool(torch.isfinite(val).all()):
        raise _bad(name, f"{SEP}val contains NaN or Inf")
    dense = torch.zeros(numel, dtype=torch.float32)
    dense[idx.to(torch.int64)] = val
    return dense.reshape(dims)


def decode(tensors: Mapping[str, torch.Tensor], kind: str, max_numel: int = DEFAULT_MAX_NUMEL) -> dict[str, torch.Tensor]:
    """Dense float32 delta from `encode`'s output. Every malformed or hostile payload raises
    ValidationError saying what is wrong; nothing is allocated before the metadata checks pass,
    and the payload may declare at most `max_numel` dense elements in total."""
    if kind not in KINDS:
        raise ValidationError(f"compression kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    if kind == "none":
        total = 0
        for name, t in tensors.items():
            if SEP in name:
                raise _bad(name, "has a codec suffix but the update was declared uncompressed (kind 'none')",
                           "declare the kind the school actually used")
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise _bad(name, f"has dtype {getattr(t, 'dtype', type(t).__name__)}, expected torch.float32")
            total += t.numel()
            if total > max_numel:
                raise _bad(name, f"the payload holds more than max_numel={max_numel} elements",
                           "check the school's model and LoRA settings")
            if not bool(torch.isfinite(t).all()):
                raise _bad(name, "contains NaN or Inf", "the school's training diverged (lower its learning rate)")
        return dict(tensors)

    groups = _group(tensors, kind)
    budget = max_numel
    plans: list[tuple[str, dict[str, torch.Tensor], tuple[int, ...] | None]] = []
    dims: tuple[int, ...] | None
    for name, parts in groups.items():  # pass 1: metadata only, nothing dense allocated
        if kind == "int8":
            numel = _check_int8(name, parts["q"], parts["scale"])
            if numel > budget:
                raise _bad(name, f"the payload declares more than max_numel={max_numel} elements",
                           "check the school's model and LoRA settings")
            budget -= numel
            plans.append((name, parts, None))
        else:
            dims = _check_topk(name, parts["idx"], parts["val"], parts["shape"], budget)
            budget -= math.prod(dims)
            plans.append((name, parts, dims))
    out: dict[str, torch.Tensor] = {}
    for name, parts, dims in plans:  # pass 2: values, then the dense tensors
        if dims is None:
            out[name] = _decode_int8(name, parts["q"], parts["scale"])
        else:
            out[name] = _decode_topk(name, parts["idx"], parts["val"], dims)
    return out


# ---------------------------------------------------------------- error feedback


class ErrorFeedback:
    """One school's residual memory e: compress(Δ) sends C(Δ + e) and keeps what C dropped."""

    def __init__(self, spec: CompressionSpec) -> None:
        _check_spec(spec)
        self.spec = spec
        self._residual: dict[str, torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """Whether a residual is kept at all (never for kind 'none', which loses nothing)."""
        return self.spec.error_feedback and self.spec.kind != "none"

    def compress(self, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encoded tensors of Δ + e; updates e <- (Δ + e) - decode(encoded). (encode checks Δ + e.)"""
        if not self.active:
            return encode(delta, self.spec)
        if self._residual:
            if set(self._residual) != set(delta):
                raise ValueError("the residual was kept for different adapter tensors than this delta; "
                                 "call reset() after changing the LoRA settings")
            for name, t in delta.items():
                if self._residual[name].shape != t.shape:
                    raise ValueError(f"{name}: residual shape {tuple(self._residual[name].shape)} differs from "
                                     f"the delta's {tuple(t.shape)}; call reset() after changing the LoRA settings")
        u = {name: t.detach().cpu() + self._residual[name] if name in self._residual else t.detach().cpu().clone()
             for name, t in delta.items()}
        encoded = encode(u, self.spec)
        sent = decode(encoded, self.spec.kind, max_numel=sum(t.numel() for t in u.values()))
        self._residual = {name: u[name] - sent[name] for name in u}
        return encoded

    def missed_round(self) -> None:
        """The school was not selected this round: e <- feedback_decay · e."""
        if self.spec.feedback_decay != 1.0:
            for t in self._residual.values():
                t.mul_(self.spec.feedback_decay)

    def reset(self) -> None:
        self._residual = {}

    def residual_norm(self) -> float:
        """L2 norm of the whole residual (0.0 when empty)."""
        sq = sum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2 for t in self._residual.values())
        return math.sqrt(sq)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The residual, name -> float32 tensor (copies); safe to write with safetensors."""
        return {name: t.clone() for name, t in self._residual.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a residual saved by state_dict(); checks names, dtypes and finiteness."""
        if state:
            _check_delta(state)
        self._residual = {name: t.detach().cpu().clone() for name, t in state.items()}


def payload_sizes(delta: Mapping[str, torch.Tensor], encoded: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(bytes of the dense float32 safetensors payload, bytes of the encoded one)."""
    dense = {name: t.detach().to(torch.float32) for name, t in delta.items()}
    return len(tensors_to_bytes(dense)), len(tensors_to_bytes(encoded))
