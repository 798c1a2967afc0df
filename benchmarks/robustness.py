"""Attack table: how far each robust strategy limits a malicious minority compared with FedAvg.

Run:  .venv/bin/python -m benchmarks.robustness [--out table.md] [--seed 0] [--honest 10] [--attackers 3]

One synthetic round on a small LoRA layout (3 modules, rank 4, d_in/d_out 16..48). Every
school's factor delta is a shared true direction plus its own noise, so honest schools
roughly agree; example counts vary. The attackers then send instead:

  none        their honest delta (every school behaves)
  sign_flip   -3 x their honest delta
  scale_100   100 x their honest delta
  colluding   all the same crafted delta, -2 x the honest mean plus a shared offset, each
              claiming `claimed_examples` examples (far more than any honest school)
  nan_inf     a delta holding NaN or Inf: never reaches a strategy, the coordinator's
              validation (fedserver.validation.validate_update) refuses the upload

Every strategy is built exactly as the coordinator builds it (fedserver.strategy.build on a
section with .name/.options/.wrappers) and driven through setup / begin_round / accumulate /
finalize. Damage is measured in adapter-product space, P = concat over modules of s·B·A
(s = alpha / rank), with dense products (the layout is small):

    damage = ||P(result) - P(ref)||_F / ||P(ref) - P(global)||_F

where ref is FedAvg over the honest updates of that scenario alone (under `none`, all of
them). 0 = as if the attackers were absent; 1 = an error as large as the honest step itself.
Under `none` a robust rule's damage is the price of its robustness (how far it lands from the
honest mean when nobody attacks).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.errors import ValidationError
from common.lora import LoraSettings, TensorSpec
from common.wire import sha256_hex, tensors_to_bytes
from fedserver import strategy as S
from fedserver.config import StrategySection
from fedserver.strategy import ClientUpdate, StrategyContext, lowrank
from fedserver.strategy.base import flat_norm
from fedserver.validation import validate_update

RANK, ALPHA = 4, 8.0
# (name, d_out, d_in) of the adapted modules.
MODULES = (("layers.0.self_attn.q_proj", 32, 16),
           ("layers.0.mlp.up_proj", 48, 32),
           ("layers.1.mlp.down_proj", 16, 48))
ATTACKS = ("none", "sign_flip", "scale_100", "colluding")
NAN_INF = "nan_inf"
REFUSED = "refused at validation"


def layout() -> dict[str, TensorSpec]:
    out = {}
    for name, d_out, d_in in MODULES:
        out[f"base_model.model.{name}.lora_A.weight"] = TensorSpec((RANK, d_in))
        out[f"base_model.model.{name}.lora_B.weight"] = TensorSpec((d_out, RANK))
    return out


def product(state: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    """All modules' s·B·A, flattened and concatenated, float64."""
    return torch.cat([(scale * state[b].double() @ state[a].double()).flatten() for a, b in lowrank.pairs(state)])


def _section(name: str, options: Mapping[str, Any], wrappers: Sequence[Mapping[str, Any]] = ()) -> StrategySection:
    return StrategySection(name, dict(options), tuple(dict(w) for w in wrappers))


@dataclass(frozen=True)
class Contender:
    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    wrappers: tuple[dict[str, Any], ...] = ()
    note: str = ""


def contenders(k: int, attackers: int, clip_norm: float) -> list[Contender]:
    """The rules compared, with options set for `attackers` Byzantine schools out of `k`."""
    beta = min(0.49, (attackers + 0.5) / k)         # floor(beta*k) == attackers: trims them on each side
    bulyan_f = min(attackers, (k - 3) // 4)         # Bulyan needs k >= 4f + 3
    bulyan_note = (f"f={bulyan_f}" if bulyan_f == attackers else
                   f"f={bulyan_f}: Bulyan needs K >= 4f+3 and K={k}, so it is configured for fewer than the {attackers} attackers")
    return [
        Contender("fedavg", "fedavg", note="example-weighted mean of factor deltas"),
        Contender("fedavg+clip", "fedavg", wrappers=({"name": "clip", "max_norm": clip_norm},),
                  note=f"clip max_norm={clip_norm:.3g} (median honest factor-delta norm)"),
        Contender("median", "median"),
        Contender("trimmed_mean", "trimmed_mean", {"beta": beta}, note=f"beta={beta:.3g} (trims {math.floor(beta * k)} each side)"),
        Contender("krum", "krum", {"f": attackers}, note=f"f={attackers}"),
        Contender("multi_krum", "multi_krum", {"f": attackers}, note=f"f={attackers}, m=K-f={k - attackers}"),
        Contender("bulyan", "bulyan", {"f": bulyan_f}, note=bulyan_note),
        Contender("geometric_median", "geometric_median", note="Weiszfeld, uniform weights (the default)"),
        Contender("geometric_median(examples)", "geometric_median", {"weighting": "examples"},
                  note="Weiszfeld, weights = claimed example counts"),
        Contender("centred_clipping", "centred_clipping", note="tau = median distance, 3 iterations, first round (v0 = 0)"),
    ]


def _scaled(delta: Mapping[str, torch.Tensor], c: float) -> dict[str, torch.Tensor]:
    return {k: c * v for k, v in delta.items()}


def _weighted_mean(deltas: Sequence[Mapping[str, torch.Tensor]], ns: Sequence[int]) -> dict[str, torch.Tensor]:
    total = float(sum(ns))
    return {k: (sum(n * d[k].double() for d, n in zip(deltas, ns)) / total).to(torch.float32) for k in deltas[0]}


def run_round(strat: S.Strategy, glob: Mapping[str, torch.Tensor],
              updates: Sequence[tuple[str, int, Mapping[str, torch.Tensor]]], rnd: int = 1) -> S.AggregateResult:
    strat.begin_round(rnd, glob)
    for sid, n, d in updates:
        strat.accumulate(ClientUpdate(sid, rnd, n, d))
    return strat.finalize()


def _validation_outcome(delta: Mapping[str, torch.Tensor], spec: Mapping[str, TensorSpec]) -> str:
    """What the coordinator's validation says about an upload of `delta` ("accepted" if nothing)."""
    payload = tensors_to_bytes(delta)
    try:
        validate_update(payload, sha256_hex(payload), spec)
    except ValidationError as exc:
        return f"{REFUSED}: {exc}"
    return "accepted"


def attack_table(seed: int = 0, honest: int = 10, attackers: int = 3, *, noise: float = 0.3,
                 sign: float = -3.0, scale: float = 100.0, claimed_examples: int = 1000,
                 examples: tuple[int, int] = (40, 200)) -> dict[str, Any]:
    """Damage of every contender under every attack; see the module docstring.

    noise: each school's per-entry noise std relative to the true direction's.
    Returns {"damage": {label: {attack: float}}, "refused": {"nan": msg, "inf": msg},
             "notes": {label: str}, "markdown": str, "settings": {...}}."""
    if honest < 1 or attackers < 1:
        raise ValueError("need at least one honest school and one attacker")
    # The matrices are tiny: intra-op threads only add overhead (10-40x on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _attack_table(seed, honest, attackers, noise, sign, scale, claimed_examples, examples)
    finally:
        torch.set_num_threads(threads)


def _attack_table(seed: int, honest: int, attackers: int, noise: float, sign: float, scale: float,
                  claimed_examples: int, examples: tuple[int, int]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    spec = layout()
    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    s = ALPHA / RANK
    k = honest + attackers
    ids = [f"school-{i:02d}" for i in range(k)]           # the last `attackers` are the attackers
    ctx = StrategyContext(settings, spec, tuple(ids))

    def randn(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    glob = {n: randn(t.shape, 0.3 if "lora_A" in n else 0.05) for n, t in spec.items()}
    true = {n: randn(t.shape, 0.03 if "lora_A" in n else 0.05) for n, t in spec.items()}
    deltas = [{n: true[n] + randn(t.shape, noise * (0.03 if "lora_A" in n else 0.05)) for n, t in spec.items()}
              for _ in range(k)]
    counts = [int(c) for c in torch.randint(examples[0], examples[1] + 1, (k,), generator=gen)]
    offset = {n: randn(t.shape, 0.5 * (0.03 if "lora_A" in n else 0.05)) for n, t in spec.items()}
    honest_mean = _weighted_mean(deltas[:honest], counts[:honest])
    crafted = {n: -2.0 * honest_mean[n] + offset[n] for n in spec}
    clip_norm = statistics.median(flat_norm(d) for d in deltas[:honest])

    scenarios: dict[str, list[tuple[str, int, Mapping[str, torch.Tensor]]]] = {}
    behaving = [(ids[i], counts[i], deltas[i]) for i in range(honest)]
    bad = range(honest, k)
    scenarios["none"] = behaving + [(ids[i], counts[i], deltas[i]) for i in bad]
    scenarios["sign_flip"] = behaving + [(ids[i], counts[i], _scaled(deltas[i], sign)) for i in bad]
    scenarios["scale_100"] = behaving + [(ids[i], counts[i], _scaled(deltas[i], scale)) for i in bad]
    scenarios["colluding"] = behaving + [(ids[i], claimed_examples, crafted) for i in bad]

    p_glob = product(glob, s)
    rivals = contenders(k, attackers, clip_norm)
    damage: dict[str, dict[str, float]] = {c.label: {} for c in rivals}
    honest_step: dict[str, float] = {}
    for attack, ups in scenarios.items():
        ref_ups = ups if attack == "none" else behaving
        ref = run_round(_build(S.build(_section("fedavg", {})), ctx), glob, ref_ups)
        p_ref = product(ref.state, s)
        step = float((p_ref - p_glob).norm())
        honest_step[attack] = step
        for c in rivals:
            res = run_round(_build(S.build(_section(c.name, c.options, c.wrappers)), ctx), glob, ups)
            damage[c.label][attack] = float((product(res.state, s) - p_ref).norm()) / step

    # NaN / Inf: what the coordinator does with such an upload before any strategy sees it.
    nan = {n: v.clone() for n, v in deltas[honest].items()}
    first = next(iter(nan))
    nan[first].view(-1)[0] = float("nan")
    inf = {n: v.clone() for n, v in deltas[honest].items()}
    inf[first].view(-1)[-1] = float("inf")
    refused = {"nan": _validation_outcome(nan, spec), "inf": _validation_outcome(inf, spec)}

    result: dict[str, Any] = {
        "damage": damage,
        "refused": refused,
        "notes": {c.label: c.note for c in rivals if c.note},
        "settings": {"seed": seed, "honest": honest, "attackers": attackers, "rank": RANK, "alpha": ALPHA,
                     "modules": [list(m) for m in MODULES], "noise": noise, "sign": sign, "scale": scale,
                     "claimed_examples": claimed_examples, "examples": list(examples), "clip_norm": clip_norm,
                     "counts": counts, "honest_step_norm": honest_step},
    }
    result["markdown"] = format_table(result)
    return result


def _build(strat: S.Strategy, ctx: StrategyContext) -> S.Strategy:
    strat.setup(ctx)
    return strat


def _cell(x: float) -> str:
    return f"{x:.3g}"


def format_table(result: Mapping[str, Any]) -> str:
    damage: Mapping[str, Mapping[str, float]] = result["damage"]
    labels = list(damage)
    cfg = result["settings"]
    lines = [
        f"Relative damage ||P(result) - P(honest FedAvg)||_F / ||P(honest FedAvg) - P(global)||_F in adapter-product "
        f"space (0 = as if the attackers were absent, 1 = an error as large as the honest step). "
        f"{cfg['honest']} honest schools, {cfg['attackers']} attackers, seed {cfg['seed']}.",
        "",
        "| attack | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for attack in ATTACKS:
        lines.append(f"| {attack} | " + " | ".join(_cell(damage[lb][attack]) for lb in labels) + " |")
    refused_all = all(v.startswith(REFUSED) for v in result["refused"].values())
    cell = "refused" if refused_all else "ACCEPTED"
    lines.append(f"| {NAN_INF} ({REFUSED if refused_all else 'NOT refused at validation'}) | "
                 + " | ".join(cell for _ in labels) + " |")
    lines += ["", "Attacks: sign_flip = attackers send "
              f"{cfg['sign']:g} x their honest delta; scale_100 = {cfg['scale']:g} x; colluding = every attacker sends "
              f"-2 x the honest mean + a shared offset and claims {cfg['claimed_examples']} examples "
              f"(honest schools: {cfg['examples'][0]}..{cfg['examples'][1]}); "
              f"{NAN_INF} = an update holding NaN or Inf, {REFUSED} (fedserver.validation.validate_update raises "
              "ValidationError), so no strategy ever sees it.", ""]
    lines += [f"- {lb}: {note}" for lb, note in result["notes"].items()]
    for what, msg in result["refused"].items():
        lines.append(f"- {what}: {msg}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.robustness", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--honest", type=int, default=10)
    ap.add_argument("--attackers", type=int, default=3)
    args = ap.parse_args(argv)
    result = attack_table(seed=args.seed, honest=args.honest, attackers=args.attackers)
    sys.stdout.write(result["markdown"])
    if args.out:
        args.out.write_text(result["markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
