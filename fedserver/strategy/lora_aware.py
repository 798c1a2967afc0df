"""LoRA-aware aggregation beyond the FedAvg family (ALGORITHMS.md C.3).

  flexlora  ΔW̄ = Σ p_k s B_k A_k (the exact product average), re-factorised to rank r by SVD;
            the Frobenius truncation error is logged. Schools may train at lower ranks
            (option `ranks`): they take the top-r_k singular directions of the global adapter.
  hetlora   schools at different ranks; zero-padded factors averaged with weights
            ω_k ∝ ‖B_k A_k‖_F; each school takes the first r_k components back.

FFA-LoRA and FedSA-LoRA are client-side modes of the averaging family (fedavg.py).
Lower-rank schools keep s = alpha/r fixed (common.lora.at_rank), so factors of every school
mean the same thing and can be padded and averaged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from common.errors import ConfigError
from common.lora import pad_rank, truncate_rank
from common.training import TrainParams
from fedserver.strategy import lowrank
from fedserver.strategy.base import StrategyContext
from fedserver.strategy.robust import ProductStrategy, RobustOptions


@dataclass(frozen=True)
class RankOptions(RobustOptions):
    ranks: dict[str, int] = field(default_factory=dict)   # school id -> LoRA rank (others: the federation's)

    def problems(self) -> list[str]:
        bad = [f"{k}={v!r}" for k, v in self.ranks.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1]
        return super().problems() + ([f"ranks: must be positive integers ({', '.join(bad)})"] if bad else [])


class _Ranked(ProductStrategy):
    Options = RankOptions

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
        full = {key: self.global_state[key] + self.buffer.tensor(i - 1, key)}
        return pad_rank(truncate_rank(full, rank), full)[key]   # pad(A_k): zero beyond the school's rank

    def aggregate(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        g = lowrank.gram(self.load, self.k + 1, self.modules(), self.context.scale)
        norms = g.diag()[1:].clamp_min(0).sqrt()
        omega = norms / norms.sum() if float(norms.sum()) > 0 else torch.full((self.k,), 1.0 / self.k, dtype=torch.float64)
        state = {}
        for key, g0 in self.global_state.items():
            acc = torch.zeros_like(g0, dtype=torch.float64)
            for i in range(self.k):
                acc += float(omega[i]) * self.load(i + 1, key).to(torch.float64)
            state[key] = acc.to(g0.dtype)
        return state, {"omega_min": float(omega.min()), "omega_max": float(omega.max())}
