"""FedAvg over LoRA factor deltas (FedIT, ALGORITHMS.md C.2), weighted by example counts."""

from __future__ import annotations

import torch

from fedserver.strategy.base import AggregateResult, ClientFailure, ClientUpdate, State, Strategy


class FedAvg(Strategy):
    """w_{t+1} = w_t + sum_k p_k delta_k with p_k = n_k / sum_j n_j over the schools that
    delivered. Averages A and B separately (FedIT); the cross-term bias of C.2 remains."""

    name = "fedavg"

    def __init__(self) -> None:
        self._global: dict[str, torch.Tensor] = {}
        self._sum: dict[str, torch.Tensor] = {}
        self._weight = 0.0
        self._count = 0
        self._metric_sums: dict[str, float] = {}
        self._failures = 0

    def begin_round(self, round_: int, global_state: State) -> None:
        self._global = {k: v.detach().clone() for k, v in global_state.items()}
        self._sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in self._global.items()}
        self._weight, self._count, self._failures = 0.0, 0, 0
        self._metric_sums = {}

    def accumulate(self, update: ClientUpdate) -> None:
        w = float(update.num_examples)
        if w <= 0:
            raise ValueError(f"update from {update.school_id} claims {update.num_examples} examples")
        for k, acc in self._sum.items():
            acc.add_(update.delta[k].to(torch.float64), alpha=w)  # float64 sums: order-independent to ~1e-12
        self._weight += w
        self._count += 1
        for name, value in update.metrics.items():
            self._metric_sums[name] = self._metric_sums.get(name, 0.0) + w * float(value)

    def record_failure(self, failure: ClientFailure) -> None:
        self._failures += 1

    def finalize(self) -> AggregateResult:
        if self._count == 0:
            raise ValueError("finalize() with no accepted updates")
        state = {k: (self._global[k].to(torch.float64) + s / self._weight).to(self._global[k].dtype)
                 for k, s in self._sum.items()}
        step_norm = float(torch.sqrt(sum(((s / self._weight) ** 2).sum() for s in self._sum.values())))
        metrics = {f"train_{k}": v / self._weight for k, v in self._metric_sums.items()}
        metrics.update(updates=float(self._count), failures=float(self._failures),
                       examples=self._weight, update_norm=step_norm)
        return AggregateResult(state, metrics)
