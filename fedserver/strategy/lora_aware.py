"""LoRA-aware aggregation beyond the FedAvg family (docs/STRATEGIES.md).

  flexlora  ΔW̄ = Σ p_k s B_k A_k (the exact product average), re-factorised to rank r by SVD;
            the Frobenius truncation error is logged. Schools may train at lower ranks
            (option `ranks`): they take the top-r_k singular directions of the global adapter.
  hetlora   schools at different ranks; zero-padded factors averaged with weights
            ω_k ∝ ‖B_k A_k‖_F; each school takes the first r_k components back.

  flora       FLoRA stacking: Σ p_k s B_k A_k exactly, merged into the base weights every
              round; the next round starts from a fresh LoRA (new A from a shared seed, B = 0).
  fedex_lora  FedEx-LoRA: FedAvg's (Ā, B̄) stay the adapter; the residual Σ p_k s B_k A_k − s B̄ Ā
              is merged into the base, so the model is the exact average.
Merged terms travel in the global artifact (common.lora MERGED_A / MERGED_B, rank growing by
K·r or (K+1)·r a round unless max_merge_rank caps it) and every party applies them.

FFA-LoRA and FedSA-LoRA are client-side modes of the averaging family (fedavg.py).
Lower-rank schools keep s = alpha/r fixed (common.lora.at_rank), so factors of every school
mean the same thing and can be padded and averaged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from common.errors import ConfigError
from common.lora import MERGED_A, MERGED_B, TensorSpec, initial_state, is_merge_key, merge_keys, split_merge
from common.training import TrainParams
from fedserver.strategy import lowrank
from fedserver.strategy.base import AggregateResult, ClientFailure, ClientUpdate, State, Strategy, StrategyContext
from fedserver.strategy.robust import ProductStrategy, RobustOptions


@dataclass(frozen=True)
class RankOptions(RobustOptions):
    weighting: str = "examples"   # averaging rules: p_k ∝ n_k
    ranks: dict[str, int] = field(default_factory=dict)   # school id -> LoRA rank (others: the federation's)

    def problems(self) -> list[str]:
        bad = [f"{k}={v!r}" for k, v in self.ranks.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        return super().problems() + ([f"ranks: must be positive integers ({', '.join(bad)})"] if bad else [])


class _Ranked(ProductStrategy):
    Options = RankOptions
    options: RankOptions

    def setup(self, ctx: StrategyContext) -> None:
        too_big = {k: v for k, v in self.options.ranks.items() if v > ctx.settings.rank}
        if too_big:
            raise ConfigError(f"[strategy.options] ranks {too_big} exceed the federation's LoRA rank {ctx.settings.rank}; "
                              "the global adapter has the largest rank, raise [lora] rank")
        unknown = sorted(set(self.options.ranks) - set(ctx.enrolled)) if ctx.enrolled else []
        if unknown:
            raise ConfigError(f"[strategy.options] ranks name schools that are not enrolled: {unknown}")
        super().setup(ctx)

    def rank_of(self, school_id: str) -> int:
        return self.options.ranks.get(school_id, self.context.settings.rank)

    def configure_school(self, round_: int, school_id: str, params: TrainParams) -> TrainParams:
        r = self.rank_of(school_id)
        return dataclasses.replace(params, rank=0 if r == self.context.settings.rank else r)


class FlexLoRA(_Ranked):
    name = "flexlora"
    summary = "Average the products s·B_k·A_k exactly, SVD back to rank r (logs the truncation error)."

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        coeffs = torch.zeros(self.k + 1, dtype=torch.float64)
        coeffs[1:] = self.weights()
        state, err = self.from_coeffs(coeffs)
        return state, {"truncation_error": err}


class HetLoRA(_Ranked):
    name = "hetlora"
    summary = "Schools train at their own ranks; padded factors averaged with weights ∝ ‖B_k A_k‖_F."

    def load(self, i: int, key: str) -> torch.Tensor:
        if i == 0:
            return self.global_state[key]
        assert self.buffer is not None
        rank = self.rank_of(self.buffer.entries[i - 1].school_id)
        t = self.global_state[key] + self.buffer.tensor(i - 1, key)   # a new tensor: zero beyond the school's rank
        if "lora_A" in key:
            t[rank:] = 0
        elif "lora_B" in key:
            t[:, rank:] = 0
        return t

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        g = lowrank.gram(self.load, self.k + 1, self.modules(), self.context.scale)
        norms = g.diag()[1:].clamp_min(0).sqrt()
        omega = norms / norms.sum() if float(norms.sum()) > 0 else torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)
        state = {}
        for key, g0 in self.global_state.items():
            if is_merge_key(key):
                state[key] = g0.clone()
                continue
            acc = torch.zeros_like(g0, dtype=torch.float64)
            for i in range(self.k):
                acc += float(omega[i]) * self.load(i + 1, key).to(torch.float64)
            state[key] = acc.to(g0.dtype)
        return state, {"omega_min": float(omega.min()), "omega_max": float(omega.max())}


# ------------------------------------------------------------------ exact aggregation by merging


@dataclass(frozen=True)
class MergeOptions:
    weighting: str = "examples"   # "examples" | "uniform"
    max_merge_rank: int = 0       # cap on the merged base delta's rank per module; 0 = exact (grows every round)

    def problems(self) -> list[str]:
        out = []
        if self.weighting not in ("examples", "uniform"):
            out.append(f"weighting: {self.weighting!r} is not 'examples' or 'uniform'")
        if self.max_merge_rank < 0:
            out.append("max_merge_rank: must be >= 0")
        return out


class _Merging(Strategy):
    """Streams each school's resulting factors into per-module stacks (the stacks are the
    output, so memory is what the downlink carries anyway) and appends an exact low-rank
    term to the merged base delta W₀ ← W₀ + B_m A_m that every party applies."""

    Options = MergeOptions

    def begin_round(self, round_: int, global_state: State) -> None:
        self.round = round_
        self.lora, self.merged = split_merge({k: v.detach().clone() for k, v in global_state.items()})
        self.stack_b: dict[str, list[torch.Tensor]] = {}
        self.stack_a: dict[str, list[torch.Tensor]] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.weight, self.count, self.failures = 0.0, 0, 0

    def accumulate(self, update: ClientUpdate) -> None:
        if update.num_examples <= 0:
            raise ValueError(f"update from {update.school_id} claims {update.num_examples} examples")
        w = 1.0 if self.options.weighting == "uniform" else float(update.num_examples)
        s = self.context.scale
        for a_key, b_key in lowrank.pairs(self.lora):
            a = (self.lora[a_key] + update.delta[a_key]).to(torch.float64)
            b = (self.lora[b_key] + update.delta[b_key]).to(torch.float64)
            self.stack_a.setdefault(a_key, []).append(a)
            self.stack_b.setdefault(a_key, []).append(w * s * b)     # divided by Σw at finalize
            for key, t in ((a_key, a), (b_key, b)):
                self.sums[key] = self.sums.get(key, 0) + w * t
        self.weight += w
        self.count += 1

    def record_failure(self, failure: ClientFailure) -> None:
        self.failures += 1

    def append_merge(self, extra: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """merged ⊕ extra per module ((B, A) with s folded into B), capped at max_merge_rank."""
        out: dict[str, torch.Tensor] = {}
        dropped, rank = 0.0, 0
        for a_key, (b_new, a_new) in extra.items():
            ma, mb = merge_keys(a_key)
            b = torch.cat([self.merged[mb].to(torch.float64), b_new], dim=1) if mb in self.merged else b_new
            a = torch.cat([self.merged[ma].to(torch.float64), a_new], dim=0) if ma in self.merged else a_new
            cap = self.options.max_merge_rank
            if cap and a.shape[0] > cap:
                u, sv, vh = lowrank.thin_svd(b, a)
                dropped += float((sv[cap:] ** 2).sum())
                b, a = u[:, :cap] * sv[:cap], vh[:cap]
            out[ma], out[mb] = a.to(torch.float32), b.to(torch.float32)
            rank = max(rank, a.shape[0])
        return out, {"merge_rank": float(rank), "merge_truncation_error": math.sqrt(dropped)}

    def result(self, lora: dict[str, torch.Tensor], merged: dict[str, torch.Tensor], metrics: dict[str, float]) -> AggregateResult:
        metrics.update(updates=float(self.count), failures=float(self.failures),
                       merged_step_norm=_merged_step_norm(self.merged, merged))
        return AggregateResult({**lora, **merged}, metrics)


def _merged_step_norm(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> float:
    """‖Σ_modules (B'_m A'_m − B_m A_m)‖_F from the factors (the ranks of old and new differ)."""
    total = 0.0
    for a_key in [k for k in new if MERGED_A in k]:
        b_key = a_key.replace(MERGED_A, MERGED_B)
        nb, na = new[b_key], new[a_key]
        total += lowrank.product_inner(nb, na, nb, na)
        if a_key in old:
            ob, oa = old[b_key], old[a_key]
            total += lowrank.product_inner(ob, oa, ob, oa) - 2 * lowrank.product_inner(nb, na, ob, oa)
    return math.sqrt(max(0.0, total))


class FLoRA(_Merging):
    """FLoRA (Wang et al. 2024): stack [p_k s B_k] and [A_k] so B_stack A_stack = Σ p_k s B_k A_k
    exactly, merge it into the base weights, and start the next round from a fresh LoRA
    (A re-drawn from a seed every party can reproduce, B = 0)."""

    name = "flora"
    summary = "Stack every school's factors: the exact product average, merged into the base each round."

    def finalize(self) -> AggregateResult:
        if self.count == 0:
            raise ValueError("finalize() with no accepted updates")
        extra = {a_key: (torch.cat(self.stack_b[a_key], dim=1) / self.weight, torch.cat(self.stack_a[a_key], dim=0))
                 for a_key in self.stack_a}
        merged, metrics = self.append_merge(extra)
        fresh = initial_state({k: TensorSpec(tuple(v.shape), v.dtype) for k, v in self.lora.items()}, seed=104729 * self.round)
        return self.result(fresh, merged, metrics)


class FedExLoRA(_Merging):
    """FedEx-LoRA (Singhal et al. 2025): keep FedAvg's (Ā, B̄) as the adapter and merge the
    residual Σ p_k s B_k A_k − s B̄ Ā (a rank-(K+1)r factorisation) into the base, so the
    model is the exact average."""

    name = "fedex_lora"
    summary = "FedAvg factors plus the exact residual Σp·BA − B̄Ā merged into the base weights."

    def finalize(self) -> AggregateResult:
        if self.count == 0:
            raise ValueError("finalize() with no accepted updates")
        mean = {k: v / self.weight for k, v in self.sums.items()}
        s = self.context.scale
        extra = {}
        for a_key, b_key in lowrank.pairs(self.lora):
            b = torch.cat([*self.stack_b[a_key], -s * self.weight * mean[b_key]], dim=1) / self.weight
            a = torch.cat([*self.stack_a[a_key], mean[a_key]], dim=0)
            extra[a_key] = (b, a)
        merged, metrics = self.append_merge(extra)
        lora = {k: mean[k].to(v.dtype) for k, v in self.lora.items()}
        return self.result(lora, merged, metrics)
