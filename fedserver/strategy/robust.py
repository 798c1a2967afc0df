"""Byzantine-robust aggregation in adapter-product space (see docs/STRATEGIES.md).

Every rule here compares the updates' products ΔW_k = s(B_k A_k − B A) (B_k = B + ΔB_k, ...),
never the raw factors, and writes the new global adapter back as rank-r factors by a thin
SVD (lowrank.combine). They need every update at once, so updates wait in a bounded buffer
that spills to disk (strategy option buffer_mb).

  median          coordinate-wise median of the ΔW_k
  trimmed_mean    per coordinate, drop the ⌊βK⌋ largest and smallest, average the rest
  krum            the update with the smallest sum of squared distances to its K−f−2 nearest
  multi_krum      the mean of the m best Krum scores
  bulyan          θ = K−2f picked by repeated Krum, then a trimmed mean (f each side)
  geometric_median  Weiszfeld iterations (RFA), distances from the Gram matrix
  centred_clipping  v ← v + mean_k clip_τ(ΔW_k − v) from last round's step (Karimireddy 2021)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fedserver.strategy import lowrank
from fedserver.strategy.base import AggregateResult, ClientFailure, ClientUpdate, State, Strategy
from fedserver.strategy.buffer import UpdateBuffer


@dataclass(frozen=True)
class RobustOptions:
    # "uniform" by default: a school's example count is its own claim, and a rule meant to
    # resist attackers must not let a minority win by claiming more examples.
    weighting: str = "uniform"    # "uniform" | "examples" (where a rule weights at all)
    buffer_mb: int = 512          # updates kept in memory; the rest are read back from disk
    dense_block_mb: int = 64      # working memory of coordinate-wise rules, per block of rows
    # Coordinate-wise rules go back to rank r by an SVD of each layer's dense result:
    # "exact" (LAPACK, ~0.35 s for a 576x1536 layer on one core) or "randomized" (Halko et al.,
    # top r + 16 directions, 6 power iterations: ~5x faster, for big layers and many schools).
    svd: str = "exact"

    def problems(self) -> list[str]:
        out = [] if self.buffer_mb >= 0 and self.dense_block_mb > 0 else ["buffer_mb must be >= 0 and dense_block_mb > 0"]
        if self.svd not in ("exact", "randomized"):
            out.append(f"svd: {self.svd!r} is not 'exact' or 'randomized'")
        if self.weighting not in ("uniform", "examples"):
            out.append(f"weighting: {self.weighting!r} is not 'uniform' or 'examples'")
        return out


class ProductStrategy(Strategy):
    """Buffers the round's updates and hands subclasses a basis of products:
    index 0 = the global adapter, 1..K = each school's resulting adapter (global + delta)."""

    Options = RobustOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.buffer: UpdateBuffer | None = None
        self.global_state: dict[str, torch.Tensor] = {}
        self.failures = 0
        self.round = 0

    def begin_round(self, round_: int, global_state: State) -> None:
        self.round = round_
        self.global_state = {k: v.detach().clone() for k, v in global_state.items()}
        if self.buffer is not None:
            self.buffer.clear()
        work = self.context.work_dir
        self.buffer = UpdateBuffer(self.options.buffer_mb << 20, work / f"round-{round_}" if work else None)
        self.failures = 0

    def accumulate(self, update: ClientUpdate) -> None:
        if update.num_examples <= 0:
            raise ValueError(f"update from {update.school_id} claims {update.num_examples} examples")
        assert self.buffer is not None, "begin_round() first"
        self.buffer.add(update)

    def record_failure(self, failure: ClientFailure) -> None:
        self.failures += 1

    # ----------------------------------------------------------------- the basis
    @property
    def k(self) -> int:
        assert self.buffer is not None
        return len(self.buffer)

    def load(self, i: int, key: str) -> torch.Tensor:
        g = self.global_state[key]
        if i == 0:
            return g
        assert self.buffer is not None
        return g + self.buffer.tensor(i - 1, key)

    def weights(self) -> torch.Tensor:
        assert self.buffer is not None
        if self.options.weighting == "uniform":
            return torch.full((len(self.buffer.entries),), 1.0 / len(self.buffer.entries), dtype=torch.float64)
        n = torch.tensor([float(e.num_examples) for e in self.buffer.entries], dtype=torch.float64)
        return n / n.sum()

    def modules(self) -> list[tuple[str, str]]:
        return lowrank.pairs(self.global_state)

    def update_coeffs(self, n_basis: int | None = None) -> torch.Tensor:
        """Rows: ΔW_k = P_k − P_0 as coefficients over the basis."""
        n = n_basis or self.k + 1
        c = torch.zeros(self.k, n, dtype=torch.float64)
        c[:, 0] = -1
        c[torch.arange(self.k), torch.arange(1, self.k + 1)] = 1
        return c

    def from_coeffs(self, coeffs: torch.Tensor, load: Any = None) -> tuple[dict[str, torch.Tensor], float]:
        ctx = self.context
        state, err = lowrank.combine(load or self.load, coeffs.tolist(), self.modules(), ctx.settings.rank, ctx.scale)
        return {k: state.get(k, v) for k, v in self.global_state.items()}, err

    def coordinatewise(self, members: list[int], reduce: Any) -> tuple[dict[str, torch.Tensor], float]:
        """New factors from a coordinate-wise rule over the dense ΔW of `members` (1-based)."""
        ctx = self.context
        out: dict[str, torch.Tensor] = {}
        dropped = 0.0
        for a_key, b_key in self.modules():
            d_out, d_in = self.global_state[b_key].shape[0], self.global_state[a_key].shape[1]
            step = lowrank.row_block(d_out, d_in, len(members) + 1, self.options.dense_block_mb << 20)
            target = torch.empty(d_out, d_in, dtype=torch.float32)
            # Factors read once per module (spilled ones come from disk), dense rows per block.
            factors = [(self.load(i, a_key).to(torch.float32), ctx.scale * self.load(i, b_key).to(torch.float32))
                       for i in (0, *members)]
            for lo in range(0, d_out, step):
                rows = slice(lo, min(d_out, lo + step))
                base = factors[0][1][rows] @ factors[0][0]
                stack = torch.stack([b[rows] @ a - base for a, b in factors[1:]])
                target[rows] = base + reduce(stack)
            r = ctx.settings.rank
            t = target.to(torch.float64) / ctx.scale
            if self.options.svd == "randomized" and r + 16 < min(t.shape):
                gen_state = torch.random.get_rng_state()
                torch.manual_seed(self.round)      # deterministic per round: every replay gives the same adapter
                u, s, v = torch.svd_lowrank(t, q=r + 16, niter=6)
                torch.random.set_rng_state(gen_state)
                vh = v.T
                dropped += max(0.0, float((t ** 2).sum()) - float((s[:r] ** 2).sum()))
            else:
                u, s, vh = torch.linalg.svd(t, full_matrices=False)
                dropped += float((s[r:] ** 2).sum())
            out[b_key] = (u[:, :r] * s[:r]).to(self.global_state[b_key].dtype)
            out[a_key] = vh[:r].to(self.global_state[a_key].dtype)
        return {k: out.get(k, v) for k, v in self.global_state.items()}, math.sqrt(dropped) * ctx.scale

    # ----------------------------------------------------------------- finalize
    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        raise NotImplementedError

    def finalize(self) -> AggregateResult:
        assert self.buffer is not None
        k = self.k
        if k < self.min_updates():
            raise ValueError(f"{self.name} needs at least {self.min_updates()} updates, got {k}")
        try:
            state, metrics = self.aggregate()
        finally:
            spilled = self.buffer.spilled
            self.buffer.clear()
        metrics.update(updates=float(k), failures=float(self.failures), spilled=float(spilled),
                       step_norm=lowrank.step_norm(self.global_state, state, self.context.scale))
        return AggregateResult(state, metrics)


# ------------------------------------------------------------------------ coordinate-wise


class Median(ProductStrategy):
    name = "median"
    summary = "Coordinate-wise median of the update products; resists < 50% outliers per coordinate."

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        state, err = self.coordinatewise(list(range(1, self.k + 1)), lambda x: x.median(dim=0).values)
        return state, {"truncation_error": err}


@dataclass(frozen=True)
class TrimmedOptions(RobustOptions):
    beta: float = 0.1    # share trimmed at each end, per coordinate

    def problems(self) -> list[str]:
        return super().problems() + ([] if 0 <= self.beta < 0.5 else ["beta: must be in [0, 0.5)"])


def trimmed(x: torch.Tensor, cut: int) -> torch.Tensor:
    if cut == 0:
        return x.mean(dim=0)
    s = x.sort(dim=0).values
    return s[cut : x.shape[0] - cut].mean(dim=0)


class TrimmedMean(ProductStrategy):
    name = "trimmed_mean"
    summary = "Per coordinate, drop the βK largest and smallest update values and average the rest."
    Options = TrimmedOptions

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        cut = int(math.floor(self.options.beta * self.k))
        state, err = self.coordinatewise(list(range(1, self.k + 1)), lambda x: trimmed(x, cut))
        return state, {"truncation_error": err, "trimmed_each_side": float(cut)}


# ------------------------------------------------------------------------ distance-based


@dataclass(frozen=True)
class KrumOptions(RobustOptions):
    f: int = 1           # Byzantine schools tolerated
    m: int = 0           # multi_krum: how many to average; 0 = K − f

    def problems(self) -> list[str]:
        return super().problems() + ([] if self.f >= 0 and self.m >= 0 else ["f and m must be >= 0"])


def krum_scores(dist: torch.Tensor, f: int) -> torch.Tensor:
    k = dist.shape[0]
    nearest = max(1, k - f - 2)
    d = dist + torch.diag(torch.full((k,), math.inf, dtype=dist.dtype))
    return d.sort(dim=1).values[:, :nearest].sum(dim=1)


def ranked(scores: torch.Tensor, ids: list[str]) -> list[int]:
    """Indices by ascending score; exact ties (common: two mutual nearest neighbours) broken by
    school id, so the choice never depends on the order uploads arrived in."""
    return sorted(range(len(ids)), key=lambda i: (round(float(scores[i]), 12), ids[i]))


class Krum(ProductStrategy):
    name = "krum"
    summary = "Pick the one update closest to its K−f−2 nearest neighbours (Blanchard et al. 2017)."
    Options = KrumOptions
    options: KrumOptions

    def min_updates(self) -> int:
        return self.options.f + 3

    def update_distances(self) -> torch.Tensor:
        g = lowrank.gram(self.load, self.k + 1, self.modules(), self.context.scale)
        return lowrank.distances(g, self.update_coeffs())

    def ids(self) -> list[str]:
        assert self.buffer is not None
        return [e.school_id for e in self.buffer.entries]

    def select(self, dist: torch.Tensor) -> list[int]:
        return ranked(krum_scores(dist, self.options.f), self.ids())[:1]

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        chosen = self.select(self.update_distances())
        w = self.weights()[chosen]
        coeffs = torch.zeros(self.k + 1, dtype=torch.float64)
        coeffs[[i + 1 for i in chosen]] = w / w.sum()
        state, err = self.from_coeffs(coeffs)
        return state, {"selected": float(len(chosen)), "truncation_error": err}


class MultiKrum(Krum):
    name = "multi_krum"
    summary = "Mean of the m updates with the best Krum scores."

    def select(self, dist: torch.Tensor) -> list[int]:
        m = self.options.m or max(1, self.k - self.options.f)
        return sorted(ranked(krum_scores(dist, self.options.f), self.ids())[:m])


class Bulyan(Krum):
    name = "bulyan"
    summary = "Repeated Krum picks K−2f updates, then a coordinate-wise trimmed mean (El Mhamdi et al. 2018)."

    def min_updates(self) -> int:
        return 4 * self.options.f + 3

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        dist, f = self.update_distances(), self.options.f
        remaining, chosen, ids = list(range(self.k)), [], self.ids()
        for _ in range(self.k - 2 * f):
            sub = dist[remaining][:, remaining]
            pick = remaining[ranked(krum_scores(sub, f), [ids[i] for i in remaining])[0]]
            chosen.append(pick)
            remaining.remove(pick)
        state, err = self.coordinatewise([i + 1 for i in sorted(chosen)], lambda x: trimmed(x, f))
        return state, {"selected": float(len(chosen)), "truncation_error": err}


@dataclass(frozen=True)
class GeoMedOptions(RobustOptions):
    iterations: int = 20
    nu: float = 1e-8          # smoothing: distances below ν count as ν
    tolerance: float = 1e-6   # stop when the weights move less than this

    def problems(self) -> list[str]:
        return super().problems() + ([] if self.iterations >= 1 and self.nu > 0 else ["iterations >= 1 and nu > 0 required"])


class GeometricMedian(ProductStrategy):
    name = "geometric_median"
    summary = "Weiszfeld's geometric median of the update products (RFA, Pillutla et al. 2022)."
    Options = GeoMedOptions

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        g = lowrank.gram(self.load, self.k + 1, self.modules(), self.context.scale)
        c = self.update_coeffs()
        h = c @ g @ c.T                     # Gram of the ΔW_k
        beta = self.weights()
        w = beta.clone()
        it = 0
        for it in range(1, self.options.iterations + 1):  # noqa: B007 (read after the loop: the iterations run)
            d = (h.diag() - 2 * (h @ w) + w @ h @ w).clamp_min(0).sqrt()
            new = beta / d.clamp_min(self.options.nu)
            new = new / new.sum()
            moved = float((new - w).abs().max())
            w = new
            if moved < self.options.tolerance:
                break
        coeffs = torch.zeros(self.k + 1, dtype=torch.float64)
        coeffs[1:] = w
        state, err = self.from_coeffs(coeffs)
        return state, {"iterations": float(it), "weight_min": float(w.min()), "truncation_error": err}


@dataclass(frozen=True)
class CentredOptions(RobustOptions):
    tau: float = 0.0          # clipping radius around v; 0 = the median distance this round
    iterations: int = 3

    def problems(self) -> list[str]:
        return super().problems() + ([] if self.tau >= 0 and self.iterations >= 1 else ["tau >= 0 and iterations >= 1 required"])


class CentredClipping(ProductStrategy):
    name = "centred_clipping"
    summary = "Clip each update around last round's step, then average (Karimireddy et al. 2021)."
    Options = CentredOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        self.previous: dict[str, torch.Tensor] = {}   # the global adapter before the last commit

    def load(self, i: int, key: str) -> torch.Tensor:
        if i == self.k + 1:
            return self.previous[key]
        return super().load(i, key)

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        have_prev = bool(self.previous)
        n = self.k + 2 if have_prev else self.k + 1
        g = lowrank.gram(self.load, n, self.modules(), self.context.scale)
        x = self.update_coeffs(n)
        v = torch.zeros(n, dtype=torch.float64)
        if have_prev:      # momentum: start from last round's step P_0 − P_prev
            v[0], v[-1] = 1.0, -1.0
        clipped = 0
        for _ in range(self.options.iterations):
            diff = x - v
            norms = torch.einsum("ki,ij,kj->k", diff, g, diff).clamp_min(0).sqrt()
            tau = self.options.tau or float(norms.median())
            scale = torch.where(norms > tau, tau / norms.clamp_min(1e-300), torch.ones_like(norms))
            clipped = int((scale < 1).sum())
            v = v + (diff * scale[:, None]).mean(dim=0)
        coeffs = v.clone()
        coeffs[0] += 1.0      # new product = P_0 + v
        state, err = self.from_coeffs(coeffs)
        self.previous = {k: t.clone() for k, t in self.global_state.items()}
        return state, {"clipped": float(clipped), "truncation_error": err}

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"previous::{k}": v for k, v in self.previous.items()}, {}

    def load_state(self, tensors: State, meta: Any) -> None:
        self.previous = {k[len("previous::"):]: v for k, v in tensors.items() if k.startswith("previous::")}
