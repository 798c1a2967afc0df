"""Wrappers that compose around any strategy (see docs/STRATEGIES.md):

  clip      Δ_k ← Δ_k · min(1, C / ‖Δ_k‖) on each school's update before the inner strategy.
  dp        DP-FedAvg: clip to C, then add N(0, (σC/K)²) to the mean delta, and account
            (ε, δ) after every round with an RDP accountant (school-level privacy).
  compress  the schools compress their uploads (int8 per row, or top-k with error
            feedback); the coordinator decodes them and records the bytes saved per round.

Norms are taken over the factor deltas the schools actually send: that is what the clipping
bound and the DP sensitivity are about.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from common.compression import CompressionSpec
from common.training import TrainParams
from fedserver.privacy import PrivacyAccountant
from fedserver.strategy.base import AggregateResult, ClientFailure, ClientUpdate, State, Strategy, Wrapper, flat_norm
from fedserver.strategy.fedavg import FedAvg


def clipped(update: ClientUpdate, max_norm: float) -> tuple[ClientUpdate, float, bool]:
    norm = flat_norm(update.delta)
    if norm <= max_norm:
        return update, norm, False
    factor = max_norm / norm
    return dataclasses.replace(update, delta={k: v * factor for k, v in update.delta.items()}), norm, True


@dataclass(frozen=True)
class ClipOptions:
    max_norm: float = 1.0   # C: every update is scaled down to at most this L2 norm

    def problems(self) -> list[str]:
        return [] if self.max_norm > 0 else ["max_norm: must be > 0"]


class Clip(Wrapper):
    """Norm clipping: bounds what any one school can move the model, whatever it sends."""

    name = "clip"
    summary = "Scale each update to at most L2 norm C before aggregation; bounds any one school's pull."
    Options = ClipOptions
    options: ClipOptions
    clipped: int
    norms: list[float]

    def begin_round(self, round_: int, global_state: State) -> None:
        self.clipped, self.norms = 0, []
        super().begin_round(round_, global_state)

    def accumulate(self, update: ClientUpdate) -> None:
        update, norm, was = clipped(update, self.options.max_norm)
        self.clipped += was
        self.norms.append(norm)
        self.inner.accumulate(update)

    def finalize(self) -> AggregateResult:
        result = self.inner.finalize()
        norms = sorted(self.norms)
        result.metrics.update(clipped=float(self.clipped), update_norm_median=norms[len(norms) // 2] if norms else 0.0)
        return result


@dataclass(frozen=True)
class DPOptions:
    clip_norm: float = 1.0          # C
    noise_multiplier: float = 1.0   # σ: noise std on the sum is σ·C
    delta: float = 1e-5             # δ reported with ε
    seed: int = -1                  # noise seed; -1 = from the OS (use a fixed seed only in tests)

    def problems(self) -> list[str]:
        out = []
        if not self.clip_norm > 0:
            out.append("clip_norm: must be > 0")
        if not self.noise_multiplier > 0:
            out.append("noise_multiplier: must be > 0 (without noise there is no privacy to account)")
        if not 0 < self.delta < 1:
            out.append("delta: must be in (0, 1)")
        return out


class DifferentialPrivacy(Wrapper):
    """DP-FedAvg (McMahan et al. 2018) with school-level (ε, δ) accounting."""

    name = "dp"
    summary = "Clip + Gaussian noise on the mean, with an RDP accountant reporting (ε, δ) every round."
    Options = DPOptions

    def __init__(self, inner: Strategy, options: Any = None) -> None:
        super().__init__(inner, options)
        self.accountant = PrivacyAccountant(self.options.delta)
        self._participants = 0
        self._gen = torch.Generator()
        if self.options.seed >= 0:
            self._gen.manual_seed(self.options.seed)
        else:
            self._gen.seed()
        base = self.innermost()
        if isinstance(base, FedAvg):
            base.mean_hooks.append(self._noise)

    def compatibility(self) -> list[str]:
        base = self.innermost()
        if not isinstance(base, FedAvg):
            return [f"dp needs an averaging strategy (fedavg, fedavgm, fedadam, fedadagrad, fedyogi, ffa_lora, fedsa_lora), not {base.name!r}"]
        if base.options.weighting != "uniform":
            return ["dp needs [strategy.options] weighting = \"uniform\": with example weights one school's share, "
                    "and so the sensitivity, is unbounded"]
        return []

    def begin_round(self, round_: int, global_state: State) -> None:
        self._participants = 0
        super().begin_round(round_, global_state)

    def accumulate(self, update: ClientUpdate) -> None:
        self._participants += 1
        self.inner.accumulate(clipped(update, self.options.clip_norm)[0])

    def record_failure(self, failure: ClientFailure) -> None:
        self._participants += 1    # sampled, even if it did not deliver
        self.inner.record_failure(failure)

    def _noise(self, mean: dict[str, torch.Tensor], count: int) -> dict[str, float]:
        std = self.options.noise_multiplier * self.options.clip_norm / count
        for v in mean.values():
            v.add_(torch.randn(v.shape, generator=self._gen, dtype=torch.float64) * std)
        enrolled = max(1, len(self.context.enrolled))
        rate = min(1.0, self._participants / enrolled)
        self.accountant.step(self.options.noise_multiplier, rate)
        return {"dp_epsilon": self.accountant.epsilon(), "dp_delta": self.options.delta,
                "dp_noise_std": std, "dp_sample_rate": rate}

    def own_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"accountant": self.accountant.to_json()}

    def load_own_state(self, tensors: State, meta: Any) -> None:
        if "accountant" in meta:
            self.accountant = PrivacyAccountant.from_json(meta["accountant"])


@dataclass(frozen=True)
class CompressOptions:
    kind: str = "int8"              # "int8" (per-row, ~4x) or "topk"
    topk_fraction: float = 0.01     # share of entries a top-k upload keeps
    error_feedback: bool = True     # schools carry what compression dropped into the next round
    feedback_decay: float = 1.0     # residual × this per missed round (partial participation)

    def spec(self) -> CompressionSpec:
        return CompressionSpec(self.kind, self.topk_fraction, self.error_feedback, self.feedback_decay)

    def problems(self) -> list[str]:
        return self.spec().problems()


class Compress(Wrapper):
    """Upload compression: the schools encode, the coordinator decodes before validation; the
    round's metrics carry upload_bytes, upload_bytes_dense and upload_bytes_saved."""

    name = "compress"
    summary = "Schools send int8 or top-k (error feedback) deltas; bytes saved recorded per round."
    Options = CompressOptions

    def configure_school(self, round_: int, school_id: str, params: TrainParams) -> TrainParams:
        params = self.inner.configure_school(round_, school_id, params)
        return dataclasses.replace(params, compression=self.options.spec().to_json())
