"""The averaging family (docs/STRATEGIES.md): FedAvg over LoRA factor deltas and the
server optimisers FedAvgM, FedAdagrad, FedAdam and FedYogi, which all start from the same
weighted mean delta and differ only in how they step. They fold uploads into running sums
as they arrive (memory O(adapter), whatever the number of schools).

Two client-side modes make the factor-space math exact or personal:
  lora_a = "frozen"  FFA-LoRA: A stays at the shared seeded init; only B trains and is
                     averaged, so the average of products equals the product of averages.
  personal_b = true  FedSA-LoRA: each school keeps its own B; A is shared and averaged.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.buffers import joined_spans, memory_axis, merge_runs, storage_view
from common.lora import is_merge_key
from common.training import TrainParams
from fedserver.strategy import lowrank
from fedserver.strategy.base import AggregateResult, ClientFailure, ClientUpdate, State, Strategy, flat_norm
from fedserver.validation import FileDelta, FileState, read_into, shapes_of, sum_of_squares

# Elements read and folded at a time from an upload's file (128 KiB of float32). Not more than
# torch's grain size (at::internal::GRAIN_SIZE, 32768): each step then runs on the calling
# thread, without OpenMP's team. On a coordinator whose cores are busy with gRPC's threads, the
# team's barriers cost more than the split saves (a fold under load: 8.2-8.7 ms in 128K-element
# slices, 5.8-5.9 ms in 32K ones; benchmarks/README.md).
FOLD_SLICE = 1 << 15

LORA_A, LORA_B = "lora_A", "lora_B"

# Adapter dtypes whose float64 -> dtype rounding numpy does as torch's copy_ does (not float16:
# torch rounds a double to float first, then to half; numpy rounds once), for new_state's adds.
_NUMPY_CASTS = (torch.float32, torch.float64)

Sink = Callable[[torch.Tensor], None]   # takes a finished buffer of the new state (FedAvg.stream_state)


@dataclass(frozen=True)
class AvgOptions:
    weighting: str = "examples"   # "examples": p_k ∝ n_k; "uniform": p_k = 1/K
    lora_a: str = "train"         # "train" | "frozen" (FFA-LoRA)
    personal_b: bool = False      # FedSA-LoRA: schools keep their own B
    server_lr: float = 1.0        # η: w ← w + η·step

    def problems(self) -> list[str]:
        out = []
        if self.weighting not in ("examples", "uniform"):
            out.append(f"weighting: {self.weighting!r} is not 'examples' or 'uniform'")
        if self.lora_a not in ("train", "frozen"):
            out.append(f"lora_a: {self.lora_a!r} is not 'train' or 'frozen'")
        if self.lora_a == "frozen" and self.personal_b:
            out.append("lora_a = 'frozen' with personal_b = true leaves nothing to share; pick one")
        if not self.server_lr > 0:
            out.append("server_lr: must be > 0")
        return out


class FedAvg(Strategy):
    """w ← w + η Σ_k p_k Δ_k with p_k = n_k / Σ_j n_j over the schools that delivered
    (FedIT: A and B averaged separately; the cross-term bias of C.2 remains unless A is frozen)."""

    name = "fedavg"
    summary = "Weighted mean of the factor deltas (FedIT). The baseline; cross-term bias on B·A."
    Options = AvgOptions
    folds_files = True   # the whole averaging family: fold_file reads an upload in slices

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self._global: State = {}
        self._sum: dict[str, torch.Tensor] = {}
        # the last round's sums, kept for the next round to fold into (see _allocate_sums)
        self._kept: dict[str, torch.Tensor] = {}
        self._weight = 0.0
        self._count = 0
        self._failures = 0
        self._sink: Sink | None = None   # stream_state's: where finalize's new buffers go
        self._made = KeptBuffers()   # the new state's buffers, reused by the next close when free
        # Hooks a wrapper (DP noise) applies to the mean delta before the server step.
        self.mean_hooks: list[Callable[[dict[str, torch.Tensor], int], dict[str, float]]] = []

    # --------------------------------------------------------------- client modes
    def shared(self, key: str) -> bool:
        """Is this tensor aggregated (True) or left to the schools / frozen (False)?"""
        if is_merge_key(key):    # merged base deltas of an earlier FLoRA / FedEx round are kept as they are
            return False
        if self.options.lora_a == "frozen" and LORA_A in key:
            return False
        return True

    def configure_round(self, round_: int, params: TrainParams) -> TrainParams:
        freeze = (LORA_A,) if self.options.lora_a == "frozen" else ()
        personal = (LORA_B,) if self.options.personal_b else ()
        return dataclasses.replace(params, freeze=tuple(sorted({*params.freeze, *freeze})),
                                   personal=tuple(sorted({*params.personal, *personal})))

    # --------------------------------------------------------------- the round
    def begin_round(self, round_: int, global_state: State) -> None:
        # The engine never changes a global state in place (a commit makes a new one): no copy.
        # A FileState stays one: read for shapes now, for values only at the close.
        self._global = global_state if isinstance(global_state, FileState) else dict(global_state)
        # float64 running sums: views of ~4 MiB segments (in the payload's tensor order, by name),
        # filled by the first update (no zero pass), kept from one round to the next
        self._sum = {}
        self._weight, self._count, self._failures = 0.0, 0, 0

    def _allocate_sums(self) -> None:
        """The round's float64 sums: the last round's buffers when the layout is the same (the
        first update overwrites them), else new ones. Kept rather than freed at the close: new
        memory costs a page fault per 4 KiB on first touch, ~20 ms for the 39 MB of sums of the
        SmolLM2-135M adapter against ~5 ms to refill kept buffers (benchmarks/README.md), on
        every round's first fold; holding them costs 2x the adapter between rounds."""
        like = shapes_of(self._global)
        want = {k: like[k] for k in sorted(like) if self.shared(k)}
        kept = self._kept
        if kept.keys() == want.keys() and all(kept[k].shape == want[k].shape for k in want):
            self._sum = dict(kept)
        else:
            self._kept = {}   # dropped before the new ones are made
            self._kept = segmented_empty_like(want)
            self._sum = dict(self._kept)

    def weight_of(self, update: ClientUpdate) -> float:
        if update.num_examples <= 0:
            raise ValueError(f"update from {update.school_id} claims {update.num_examples} examples")
        return 1.0 if self.options.weighting == "uniform" else float(update.num_examples)

    def accumulate(self, update: ClientUpdate) -> None:
        w = self.weight_of(update)
        first = self._count == 0
        if first:
            self._allocate_sums()
        if isinstance(update.delta, FileDelta):   # an upload on disk: read in long slices, never whole
            fold_file(update.delta, self._sum, w, first)
        else:
            for k, acc in self._sum.items():   # float64 sums: order-independent to ~1e-12
                if first:
                    acc.copy_(update.delta[k])
                    if w != 1.0:
                        acc.mul_(w)
                else:
                    acc.add_(update.delta[k].to(torch.float64), alpha=w)   # not mixed-dtype add_: ~75x slower
        self._weight += w
        self._count += 1

    def record_failure(self, failure: ClientFailure) -> None:
        self._failures += 1

    def mean_delta(self) -> dict[str, torch.Tensor]:
        if self._count == 0:
            raise ValueError("finalize() with no accepted updates")
        # in place: the sums are not needed after the round (saves 2x the adapter at the close)
        return {k: s.div_(self._weight) for k, s in self._sum.items()}

    def step(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The server step from the (float64) mean delta; FedAvg: η·mean."""
        if self.options.server_lr == 1.0:
            return mean
        return {k: v.mul_(self.options.server_lr) for k, v in mean.items()}   # `mean` is ours to change

    def stream_state(self, sink: Sink | None) -> bool:
        self._sink = sink
        return True

    def stored(self, state: Mapping[str, torch.Tensor], path: Path) -> None:
        self._made.stored(state, path)

    def finalize(self) -> AggregateResult:
        metrics: dict[str, float] = {}
        own = type(self).step is FedAvg.step and type(self).mean_delta is FedAvg.mean_delta
        if self._count and own and not self.mean_hooks and fusable(self._global):
            # FedAvg's own mean and step, nothing to see the mean first: mean, step, norm and the
            # new state in one pass over the sums (MeanStep), which are left as they are
            fused = MeanStep(self._weight, self.options.server_lr)
            sums, self._sum = self._sum, {}   # the buffers stay in self._kept for the next round
            state = new_state(self._global, dict(sums), self._sink, fused, self._made)
            step_norm = math.sqrt(fused.sumsq)
        else:
            mean = self.mean_delta()
            for hook in self.mean_hooks:
                metrics.update(hook(mean, self._count))
            step = self.step(mean)
            step_norm = flat_norm(step)
            self._sum = {}   # the buffers stay in self._kept for the next round
            del mean
            state = new_state(self._global, step, self._sink, kept=self._made)
        metrics.update(updates=float(self._count), failures=float(self._failures),
                       examples=self._weight if self.options.weighting == "examples" else float(self._count),
                       update_norm=step_norm)
        if self.ctx is not None and self.ctx.product_metrics:
            metrics["step_norm"] = lowrank.step_norm(dict(self._global), state, self.ctx.scale)   # read once
        return AggregateResult(state, metrics)


SEGMENT_BYTES = 4 << 20   # the float64 sums are allocated in segments of about this size
# new_state hands its buffers to the sink (the writer of the new adapter's file, which hashes and
# writes each on its own thread) in pieces of about this many elements as they are made
# (1 MiB of float32), not a ~4 MiB segment at a time: what is left for the writer once the
# last element is made is then one piece, not a segment.
SINK_ELEMENTS = 1 << 18


def segmented_empty_like(like: dict[str, torch.Tensor], dtype: torch.dtype = torch.float64,
                         segments: list[tuple[torch.Tensor, list[str]]] | None = None,
                         kept: KeptBuffers | None = None) -> dict[str, torch.Tensor]:
    """Uninitialised tensors shaped like `like`'s, as views of consecutive buffers of about
    SEGMENT_BYTES each (in `like`'s order): each buffer is its own mapping, given back to the OS
    as soon as the last view of it is dropped. `segments`, if given, gets each buffer with the
    names of the tensors it holds, in order. `kept`: take the buffers from there when it has
    ones of these sizes that nothing uses any more (else new ones, as without it)."""
    size = torch.empty((), dtype=dtype).element_size()
    groups: list[list[str]] = []
    group: list[str] = []
    filled = 0
    for k, t in like.items():
        group.append(k)
        filled += t.numel() * size
        if filled >= SEGMENT_BYTES:
            groups.append(group)
            group, filled = [], 0
    if group:
        groups.append(group)
    sizes = [sum(like[k].numel() for k in g) for g in groups]
    flats = kept.take(sizes, dtype) if kept is not None else None
    if flats is None:
        flats = [torch.empty(n, dtype=dtype) for n in sizes]
    out: dict[str, torch.Tensor] = {}
    for flat, names in zip(flats, groups):
        pos = 0
        for k in names:
            n = like[k].numel()
            out[k] = flat[pos:pos + n].view(like[k].shape)
            pos += n
        if segments is not None:
            segments.append((flat, names))
    return out


class KeptBuffers:
    """The new state's buffers, kept from one close to the next (FedAvg's): new memory costs a
    page fault per 4 KiB on first touch, and the coordinator hands its free memory back to the
    OS after every round, so each close's new adapter was made in memory faulted in anew (most
    of the 16-17 ms of reading the global into it, for the 19.6 MB SmolLM2-135M adapter;
    benchmarks/README.md). One set is kept, costing 1x the adapter between rounds. A close
    takes it only when nothing still holds a view of the last state made in it (an evaluation
    of it, say): each buffer is a numpy array lent to torch, whose every view keeps a reference
    to the array, so the array's reference count says whether any view is alive. When the
    engine stored the state made in them as the file that is now the global adapter (`stored`),
    and nothing has taken them since, they already hold that global's bytes: the close then
    adds the step to them without reading the global from its file."""

    _OURS = 3   # sys.getrefcount of an array only this list holds (the list, the loop name, the argument)

    def __init__(self) -> None:
        self._arrays: list[np.ndarray] = []
        self._holds = ""        # the file whose tensors the buffers hold, byte for byte ("": none known)
        self.took_holding = ""  # what the buffers the last take() gave held then ("": none known, or not taken)

    def stored(self, state: Mapping[str, torch.Tensor], path: Path) -> None:
        """`state` was stored as the file `path` (Strategy.stored): if its tensors are these
        buffers, all of them, the buffers hold that file's tensors until they are next taken."""
        spans = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in state.values() if t.numel())
        if self._arrays and joined_spans(spans) == sorted((a.ctypes.data, a.nbytes) for a in self._arrays):
            self._holds = str(path)

    def idle(self) -> bool:
        for a in self._arrays:
            if sys.getrefcount(a) > self._OURS:
                return False
        return True

    def take(self, sizes: list[int], dtype: torch.dtype) -> list[torch.Tensor] | None:
        """Buffers of `sizes` elements of `dtype`: the kept ones, or new ones kept in their
        place (different sizes or dtype); None while a view of the kept ones is alive (the
        caller makes its own, not kept)."""
        self.took_holding = ""
        if not self.idle():
            return None
        np_dtype = torch.empty((), dtype=dtype).numpy().dtype
        if [a.size for a in self._arrays] != sizes or any(a.dtype != np_dtype for a in self._arrays):
            self._arrays, self._holds = [], ""   # dropped before the new ones are made
            self._arrays = [np.empty(n, dtype=np_dtype) for n in sizes]
        self.took_holding, self._holds = self._holds, ""   # the taker writes them
        return [torch.from_numpy(a) for a in self._arrays]


def fold_file(delta: FileDelta, sums: dict[str, torch.Tensor], w: float, first: bool) -> None:
    """sums[k] (+)= w * delta[k] for every k in `sums`, read from the upload's file a slice at a
    time: where the file and a buffer of the sums hold consecutive tensors in the same order
    (what schools send), one long run. Memory: one slice of the file and its float64 copy."""
    packed = delta.packed
    item = packed.dtype.itemsize
    pieces = [(("file", packed.data_start + begin, end - begin), memory_axis(sums[name]))
              for begin, end, name in packed.spans if name in sums]
    buf = bytearray(FOLD_SLICE * item)
    tmp = torch.empty(FOLD_SLICE, dtype=torch.float64)
    with open(packed.path, "rb") as fh:
        for (_, offset, _), (_, start, n, acc0) in merge_runs(pieces):
            flat = storage_view(acc0)
            for i in range(0, n, FOLD_SLICE):
                c = min(FOLD_SLICE, n - i)
                read_into(fh, offset + i * item, memoryview(buf)[:c * item])
                x = torch.frombuffer(buf, dtype=packed.dtype, count=c)
                acc = flat[start + i:start + i + c]
                if first:
                    acc.copy_(x)
                    if w != 1.0:
                        acc.mul_(w)
                else:
                    t = tmp[:c]
                    t.copy_(x)
                    acc.add_(t, alpha=w)


class MeanStep:
    """What `new_state` adds when it is given FedAvg's sums rather than a step: each element is
    divided by `weight` (the mean), times `lr` if that is not 1 (the step), and the step's sum
    of squares is kept in `sumsq` (its norm, a round metric) - in the one pass that adds it,
    a cache-sized slice at a time, not three more passes over the float64 sums (a 4.9M-parameter
    adapter: see benchmarks/README.md). Elementwise the same operations as mean_delta() then
    step() then new_state(), so the same bits; only the norm's summation order differs."""

    def __init__(self, weight: float, lr: float = 1.0) -> None:
        self.weight, self.lr, self.sumsq = weight, lr, 0.0
        self._tmp = np.empty(FOLD_SLICE, dtype=np.float64)

    def add(self, o: np.ndarray, s: np.ndarray) -> None:
        for i in range(0, len(o), FOLD_SLICE):
            c = min(FOLD_SLICE, len(o) - i)
            t = self._tmp[:c]
            np.divide(s[i:i + c], self.weight, out=t)
            if self.lr != 1.0:
                np.multiply(t, self.lr, out=t)
            self.sumsq += sum_of_squares(t)
            oc = o[i:i + c]
            np.add(oc, t, out=oc, casting="unsafe")


def fusable(global_state: State) -> bool:
    """Can new_state take a MeanStep for this global: one dtype (a mixed global takes new_state's
    per-tensor path, which adds a step as it is), and one that numpy rounds to as torch does?"""
    dtypes = {g.dtype for g in shapes_of(global_state).values()}
    return len(dtypes) == 1 and dtypes <= set(_NUMPY_CASTS)


def new_state(global_state: State, step: dict[str, torch.Tensor], sink: Sink | None = None,
              mean: MeanStep | None = None, kept: KeptBuffers | None = None) -> dict[str, torch.Tensor]:
    """global + step (added in float64), in the global's dtypes, as views of new buffers (given
    back to the OS whole when the state is dropped, not left in the allocator's heap), or of
    `kept`'s when they are free. Each step
    tensor is dropped from `step` once used, so buffers it was the last view of are freed on the
    way. A single-dtype global is made a buffer (~4 MiB) at a time: the global's part copied in
    first (a FileState: read straight into it) and the step added in long runs where the step's
    and the buffer's memory both run on, a slice at a time (a few hundred operations, not a few
    per tensor: a 420-tensor adapter, 34.5 ms -> see benchmarks/README.md). Each finished buffer
    goes to `sink` (its bytes are the next of the state's safetensors file, whose order is the
    names' for one dtype), so the file can be written and hashed while the next one is made.
    `mean`: `step` holds FedAvg's sums, and `mean` says how each becomes the step (MeanStep;
    only where `fusable`). `kept`: the buffers to make a single-dtype state in, when free
    (KeptBuffers)."""
    like = shapes_of(global_state)
    dtypes = {g.dtype for g in like.values()}
    keys = sorted(like)
    if mean is not None and not fusable(global_state):
        raise ValueError("a MeanStep needs a global of one dtype, float32 or float64; divide the sums first")
    if len(dtypes) != 1:   # (never streamed: the writer sees too few bytes and the state is written whole)
        mixed = {k: torch.empty(g.shape, dtype=g.dtype) for k, g in like.items()}
        for k in keys:
            g = global_state[k]
            d = step.pop(k, None)
            mixed[k].copy_(d.add(g.to(torch.float64)) if d is not None else g)
            del d, g
        return {k: mixed[k] for k in like}
    segments: list[tuple[torch.Tensor, list[str]]] = []
    out = segmented_empty_like({k: like[k] for k in keys}, next(iter(dtypes)), segments, kept)
    # the kept buffers may hold the global's file byte for byte already: the state the last
    # close made, stored as that file (KeptBuffers.stored), and not written to since
    resident = False
    if kept is not None and isinstance(global_state, FileState) and kept.took_holding == str(global_state.path):
        global_state.confirm()   # as a read would: a file damaged or lost meanwhile is found (restored, or the close fails)
        resident = True
    tmp = torch.empty(FOLD_SLICE, dtype=torch.float64)
    for flat, names in segments:
        if not resident:   # (resident: the kept buffers hold the global already)
            if isinstance(global_state, FileState):
                global_state.read_into({k: out[k] for k in names})
            else:
                for k in names:
                    out[k].copy_(global_state[k])
        base = flat.storage_offset()
        done = 0   # elements of `flat` handed to the sink
        for (_, o_at, n, o0), (_, s_at, _, d0) in merge_runs(_step_pieces(names, out, step)):
            o_flat, s_flat = storage_view(o0), storage_view(d0)
            if mean is not None or o_flat.dtype in _NUMPY_CASTS:
                # numpy's ufunc adds float64(g) + d and rounds to g's dtype in one buffered pass:
                # the bits of the three torch steps below, in half their time (a 4.9M-parameter
                # adapter: 14.6 against 27.7 ms; benchmarks/README.md), and without the GIL.
                # A piece at a time, each to the sink once made: the writer, hashing the last
                # piece while the next is made, then finishes soon after the last one.
                for i in range(0, n, SINK_ELEMENTS):
                    c = min(SINK_ELEMENTS, n - i)
                    o_np = o_flat[o_at + i:o_at + i + c].numpy()
                    s_np = s_flat[s_at + i:s_at + i + c].numpy()
                    if mean is not None:
                        mean.add(o_np, s_np)
                    else:
                        np.add(o_np, s_np, out=o_np, casting="unsafe")
                    upto = o_at + i + c - base   # flat[:upto] is final
                    if sink is not None and upto - done >= SINK_ELEMENTS:
                        sink(flat[done:upto])
                        done = upto
                continue
            for i in range(0, n, FOLD_SLICE):   # slices at torch's grain size: on this thread (FOLD_SLICE)
                c = min(FOLD_SLICE, n - i)
                t = tmp[:c]
                o = o_flat[o_at + i:o_at + i + c]
                t.copy_(o)
                t.add_(s_flat[s_at + i:s_at + i + c])   # float64(g) + d: the same bits as d + float64(g)
                o.copy_(t)
        if sink is not None and flat.numel() > done:
            sink(flat[done:])
    return {k: out[k] for k in like}


def _step_pieces(keys: list[str], out: dict[str, torch.Tensor], step: dict[str, torch.Tensor]) -> Any:
    """(new tensor, step tensor in float64) as merge_runs axes, in `keys` order, popping each
    key from `step` as it is taken (lazily: a step made of new tensors, as the server
    optimisers' is, is freed as the close goes; FedAvg's own sums are kept for the next round)."""
    for k in keys:
        d = step.pop(k, None)
        if d is None:
            continue
        o = out[k]
        if d.shape != o.shape:
            raise ValueError(f"{k}: the step's shape {tuple(d.shape)} is not the adapter's {tuple(o.shape)}")
        if o.numel():
            yield memory_axis(o), memory_axis(d.to(torch.float64).contiguous())


# ------------------------------------------------------------------ server momentum


@dataclass(frozen=True)
class AvgMOptions(AvgOptions):
    momentum: float = 0.9         # β: m ← β m + Δ; w ← w + η m

    def problems(self) -> list[str]:
        return super().problems() + ([] if 0 <= self.momentum < 1 else ["momentum: must be in [0, 1)"])


class FedAvgM(FedAvg):
    """FedAvg with server momentum (Hsu et al. 2019): m ← β m + Δ, w ← w + η m."""

    name = "fedavgm"
    summary = "FedAvg plus server momentum; smooths noisy rounds, helps under non-IID data."
    Options = AvgMOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.m: dict[str, torch.Tensor] = {}

    def step(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        beta = self.options.momentum
        self.m = {k: beta * self.m[k] + d if k in self.m else d.clone() for k, d in mean.items()}
        return {k: self.options.server_lr * v for k, v in self.m.items()}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"m::{k}": v.to(torch.float32) for k, v in self.m.items()}, {}

    def load_state(self, tensors: State, meta: Any) -> None:
        self.m = {k[3:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("m::")}


# ------------------------------------------------------------------ adaptive server optimisers


@dataclass(frozen=True)
class OptOptions(AvgOptions):
    server_lr: float = 1e-2       # η (C.5: start at 1e-2 for LoRA deltas)
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3             # adaptivity: larger τ → closer to FedAvgM

    def problems(self) -> list[str]:
        out = super().problems()
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            out.append("beta1, beta2: must be in [0, 1)")
        if not self.tau > 0:
            out.append("tau: must be > 0")
        return out


class _FedOpt(FedAvg):
    """Reddi et al. (ICLR 2021): m ← β₁m + (1−β₁)Δ; v by the subclass rule;
    w ← w + η m / (√v + τ), elementwise on the factor deltas."""

    Options = OptOptions
    options: OptOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def second_moment(self, v: torch.Tensor | None, d2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, mean: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o = self.options
        out = {}
        for k, d in mean.items():
            m = o.beta1 * self.m[k] + (1 - o.beta1) * d if k in self.m else (1 - o.beta1) * d
            v = self.second_moment(self.v.get(k), d * d)
            self.m[k], self.v[k] = m, v
            out[k] = o.server_lr * m / (v.sqrt() + o.tau)
        return out

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        t = {f"m::{k}": v.to(torch.float32) for k, v in self.m.items()}
        t.update({f"v::{k}": v.to(torch.float32) for k, v in self.v.items()})
        return t, {}

    def load_state(self, tensors: State, meta: Any) -> None:
        self.m = {k[3:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("m::")}
        self.v = {k[3:]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("v::")}


class FedAdagrad(_FedOpt):
    name = "fedadagrad"
    summary = "Adaptive server step, v ← v + Δ²; per-coordinate learning rates that only shrink."

    def second_moment(self, v: torch.Tensor | None, d2: torch.Tensor) -> torch.Tensor:
        # v⁰ = τ² (Reddi et al.), so the first step is bounded by η·(1−β₁)|Δ|/(|Δ|+2τ)-ish, not η.
        return (v if v is not None else torch.full_like(d2, self.options.tau ** 2)) + d2


class FedAdam(_FedOpt):
    name = "fedadam"
    summary = "Adam on the server's pseudo-gradient; robust to heterogeneous update scales."

    def second_moment(self, v: torch.Tensor | None, d2: torch.Tensor) -> torch.Tensor:
        b2 = self.options.beta2
        return b2 * (v if v is not None else torch.full_like(d2, self.options.tau ** 2)) + (1 - b2) * d2


class FedYogi(_FedOpt):
    name = "fedyogi"
    summary = "Yogi on the server: additive second moment, slower to forget than Adam."

    def second_moment(self, v: torch.Tensor | None, d2: torch.Tensor) -> torch.Tensor:
        b2 = self.options.beta2
        v = v if v is not None else torch.full_like(d2, self.options.tau ** 2)
        return v - (1 - b2) * d2 * torch.sign(v - d2)


# ------------------------------------------------------------------ LoRA modes as named presets


@dataclass(frozen=True)
class FFAOptions(AvgOptions):
    lora_a: str = "frozen"

    def problems(self) -> list[str]:
        return super().problems() + ([] if self.lora_a == "frozen" else ["lora_a: FFA-LoRA freezes A by definition; use fedavg for trainable A"])


class FFALoRA(FedAvg):
    """FFA-LoRA (Sun et al. 2024): A frozen at the shared seeded init, only B trains and is
    averaged, so ΔW = s·B̄·A₀ is the exact average. Use a larger alpha for the frozen A."""

    name = "ffa_lora"
    summary = "Freeze A at the shared init, train and average only B: the product average is exact."
    Options = FFAOptions


@dataclass(frozen=True)
class FedSAOptions(AvgOptions):
    personal_b: bool = True

    def problems(self) -> list[str]:
        return super().problems() + ([] if self.personal_b else ["personal_b: FedSA-LoRA keeps B at the schools by definition; use fedavg otherwise"])


class FedSALoRA(FedAvg):
    """FedSA-LoRA (Guo et al. 2025): A is shared and averaged, each school keeps its own B
    (personalisation). The global B the coordinator keeps is a reference average only."""

    name = "fedsa_lora"
    summary = "Share A, keep B at each school: personalised models for non-IID schools."
    Options = FedSAOptions
