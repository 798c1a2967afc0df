"""The strategy library: one contract every registered strategy passes and numeric checks of
each formula against a direct dense computation (attacks: tests/test_attacks.py)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from common.errors import ConfigError
from common.lora import LoraSettings, TensorSpec, merge_keys, split_merge
from fedserver import strategy as S
from fedserver.strategy import ClientFailure, ClientUpdate, StrategyContext, lowrank

R, ALPHA = 4, 8.0
SCALE = ALPHA / R
SHAPES = {"m.0.q.lora_A.weight": (R, 24), "m.0.q.lora_B.weight": (20, R),
          "m.1.v.lora_A.weight": (R, 24), "m.1.v.lora_B.weight": (12, R)}
SCHOOLS = tuple(f"school-{i}" for i in range(12))


def context(tmp_path=None, rank: int = R) -> StrategyContext:
    return StrategyContext(LoraSettings(rank=rank, alpha=ALPHA), {k: TensorSpec(v) for k, v in SHAPES.items()},
                           SCHOOLS, tmp_path)


def rand_state(gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    return {k: torch.randn(v, generator=gen) * scale for k, v in SHAPES.items()}


def make(name: str, wrappers: tuple[dict, ...] = (), tmp_path=None, **options) -> S.Strategy:
    section = dataclasses.make_dataclass("Sec", ["name", "options", "wrappers"])(name, options, wrappers)
    strat = S.build(section)
    strat.setup(context(tmp_path))
    return strat


def run_round(strat: S.Strategy, glob, updates, failures=(), rnd: int = 1) -> S.AggregateResult:
    strat.begin_round(rnd, glob)
    for f in failures:
        strat.record_failure(ClientFailure(f, rnd, "dropped"))
    for sid, n, d in updates:
        strat.accumulate(ClientUpdate(sid, rnd, n, d))
    return strat.finalize()


def product(state) -> torch.Tensor:
    """The effective change to the base weights: s·B·A plus any merged base delta B_m A_m."""
    parts = []
    for a, b in lowrank.pairs(state):
        p = SCALE * state[b].double() @ state[a].double()
        ma, mb = merge_keys(a)
        if ma in state:
            p = p + state[mb].double() @ state[ma].double()
        parts.append(p.flatten())
    return torch.cat(parts)


def min_k(name: str) -> int:
    return max(3, S.create(name).min_updates())


NAMES = S.available()
WRAPPED = [("fedavg", ({"name": "clip", "max_norm": 100.0},)),
           ("fedavg", ({"name": "compress", "kind": "int8"},)),
           ("fedadam", ({"name": "clip", "max_norm": 100.0},)),
           ("median", ({"name": "clip", "max_norm": 100.0},))]
CASES = [(n, ()) for n in NAMES] + WRAPPED
IDS = [n if not w else f"{n}+{w[0]['name']}" for n, w in CASES]


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    glob = rand_state(gen, 0.3)
    deltas = [rand_state(gen, 0.05) for _ in range(9)]
    return glob, deltas


# ----------------------------------------------------------------------------- the contract


@pytest.mark.parametrize(("name", "wrappers"), CASES, ids=IDS)
def test_contract(name, wrappers, data, tmp_path):
    glob, deltas = data
    k = max(min_k(name), 5)
    ups = [(SCHOOLS[i], 10 + 3 * i, deltas[i]) for i in range(k)]

    base = run_round(make(name, wrappers, tmp_path), glob, ups)
    # Output: the adapter's names, shapes and dtypes, all finite.
    lora, merged = split_merge(base.state)
    assert {k: (tuple(v.shape), v.dtype) for k, v in lora.items()} == {k: (v, torch.float32) for k, v in SHAPES.items()}
    assert all(v.dtype == torch.float32 for v in merged.values())
    assert all(bool(torch.isfinite(v).all()) for v in base.state.values())
    assert base.metrics["updates"] == k

    # Permutation invariance (products compared: factorisations are unique only up to rotation).
    shuffled = ups[:]
    random.Random(1).shuffle(shuffled)
    perm = run_round(make(name, wrappers, tmp_path), glob, shuffled)
    torch.testing.assert_close(product(perm.state), product(base.state), atol=1e-4, rtol=1e-4)

    # Failures and stragglers are recorded without changing the math, interleaved anywhere.
    strat = make(name, wrappers, tmp_path)
    strat.begin_round(1, glob)
    for i, (sid, n, d) in enumerate(ups):
        strat.accumulate(ClientUpdate(sid, 1, n, d))
        if i == 1:
            strat.record_failure(ClientFailure("school-11", 1, "no update by the deadline"))
    late = strat.finalize()
    assert late.metrics["failures"] == 1
    torch.testing.assert_close(product(late.state), product(base.state), atol=1e-4, rtol=1e-4)

    # Identical updates: K copies give what K + 2 copies give.
    same = [(SCHOOLS[i], 10, deltas[0]) for i in range(k)]
    more = [(SCHOOLS[i], 10, deltas[0]) for i in range(k + 2)]
    torch.testing.assert_close(product(run_round(make(name, wrappers, tmp_path), glob, same).state),
                               product(run_round(make(name, wrappers, tmp_path), glob, more).state), atol=1e-4, rtol=1e-4)

    # Scaling every school's example count by the same factor changes nothing.
    scaled = [(sid, 7 * n, d) for sid, n, d in ups]
    torch.testing.assert_close(product(run_round(make(name, wrappers, tmp_path), glob, scaled).state),
                               product(base.state), atol=1e-4, rtol=1e-4)

    # An empty round cannot be finalised (the engine then fails the round, keeping the adapter).
    strat = make(name, wrappers, tmp_path)
    strat.begin_round(2, glob)
    with pytest.raises(ValueError):
        strat.finalize()


@pytest.mark.parametrize(("name", "wrappers"), CASES, ids=IDS)
def test_state_round_trip_resumes_identically(name, wrappers, data, tmp_path):
    """What state() saves after round 1 makes a fresh instance (a restarted coordinator)
    compute round 2 exactly as the original does."""
    glob, deltas = data
    k = max(min_k(name), 5)
    ups1 = [(SCHOOLS[i], 10 + i, deltas[i]) for i in range(k)]
    ups2 = [(SCHOOLS[i], 10 + i, deltas[-1 - i]) for i in range(k)]
    a = make(name, wrappers, tmp_path)
    mid = run_round(a, glob, ups1, rnd=1).state
    tensors, meta = a.state()
    b = make(name, wrappers, tmp_path)
    b.load_state(tensors, meta)
    torch.testing.assert_close(run_round(b, mid, ups2, rnd=2).state, run_round(a, mid, ups2, rnd=2).state)


def test_averaging_strategies_match_the_identical_update_exactly(data):
    """Where every school sends the same Δ, an averaging rule returns global + Δ."""
    glob, deltas = data
    for name in ("fedavg", "fedavgm", "ffa_lora", "fedsa_lora", "flexlora", "flora", "fedex_lora", "median", "trimmed_mean", "krum",
                 "multi_krum", "bulyan", "geometric_median", "centred_clipping"):
        k = max(min_k(name), 3)
        res = run_round(make(name), glob, [(SCHOOLS[i], 10 + i, deltas[0]) for i in range(k)])
        d = deltas[0] if name != "ffa_lora" else {k_: (v if "lora_B" in k_ else torch.zeros_like(v)) for k_, v in deltas[0].items()}
        want = product({k_: glob[k_] + d[k_] for k_ in glob})
        torch.testing.assert_close(product(res.state), want, atol=1e-4, rtol=1e-4, msg=name)


# ----------------------------------------------------------------------------- formulas


def test_fedavg_is_the_example_weighted_mean(data):
    glob, deltas = data
    ns = [5, 10, 30]
    res = run_round(make("fedavg"), glob, [(SCHOOLS[i], ns[i], deltas[i]) for i in range(3)])
    for k in glob:
        want = glob[k] + sum(n * deltas[i][k] for i, n in enumerate(ns)) / sum(ns)
        torch.testing.assert_close(res.state[k], want)
    uniform = run_round(make("fedavg", weighting="uniform"), glob, [(SCHOOLS[i], ns[i], deltas[i]) for i in range(3)])
    for k in glob:
        torch.testing.assert_close(uniform.state[k], glob[k] + sum(deltas[i][k] for i in range(3)) / 3)


def test_fedavg_weight_two_equals_two_copies(data):
    glob, deltas = data
    for name in ("fedavg", "fedadam", "flexlora", "geometric_median"):
        opts = {"weighting": "examples"} if name == "geometric_median" else {}   # robust rules default to uniform
        one = run_round(make(name, **opts), glob, [("a", 20, deltas[0]), ("b", 10, deltas[1]), ("c", 10, deltas[2])])
        two = run_round(make(name, **opts), glob, [("a", 10, deltas[0]), ("a2", 10, deltas[0]), ("b", 10, deltas[1]), ("c", 10, deltas[2])])
        torch.testing.assert_close(product(one.state), product(two.state), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam", "ffa_lora"])
def test_sums_kept_between_rounds_give_the_answer_of_fresh_ones(name, data):
    """The float64 sums are kept from one round to the next and overwritten by the next round's
    first update: round after round (different schools, weights and globals, a failed round
    in between), the same bits as a fresh strategy that replays the same history."""
    glob, deltas = data
    kept = make(name)
    rounds = [[(SCHOOLS[0], 5, deltas[0]), (SCHOOLS[1], 7, deltas[1]), (SCHOOLS[2], 9, deltas[2])],
              [(SCHOOLS[3], 30, deltas[3]), (SCHOOLS[4], 1, deltas[4]), (SCHOOLS[5], 2, deltas[5])],
              [(SCHOOLS[6], 3, deltas[6]), (SCHOOLS[7], 3, deltas[7]), (SCHOOLS[8], 4, deltas[8])]]
    history, g, buffers = [], glob, None
    for rnd, ups in enumerate(rounds, start=1):
        res = run_round(kept, g, ups, rnd=rnd)
        ptrs = {k: v.data_ptr() for k, v in kept._kept.items()}
        assert buffers is None or ptrs == buffers   # the same memory, refilled
        buffers = ptrs
        fresh = make(name)
        for r, (gg, uu) in enumerate(history, start=1):
            run_round(fresh, gg, uu, rnd=r)
        want = run_round(fresh, g, ups, rnd=rnd)
        for k in glob:
            assert torch.equal(res.state[k], want.state[k]), (name, rnd, k)
        history.append((g, ups))
        g = res.state
        if rnd == 1:   # a round that fails after one fold leaves nothing behind for the next
            kept.begin_round(9, g)
            kept.accumulate(ClientUpdate("x", 9, 1, {k: torch.full_like(v, 1e6) for k, v in deltas[0].items()}))


def _mean(deltas, ns):
    return {k: sum(n * d[k].double() for n, d in zip(ns, deltas)) / sum(ns) for k in deltas[0]}


@pytest.mark.parametrize("name", ["fedavgm", "fedadagrad", "fedadam", "fedyogi"])
def test_server_optimisers_follow_reddi_et_al(name, data):
    """Three rounds against a direct transcription of the FedOpt update rules (Reddi et al., ICLR 2021)."""
    glob, deltas = data
    strat = make(name)
    o = strat.options
    m: dict = {}
    v: dict = {}
    w = {k: t.double() for k, t in glob.items()}
    state = glob
    for rnd in range(3):
        ups = [(SCHOOLS[i], 10 + i, deltas[3 * rnd + i]) for i in range(3)]
        state = run_round(strat, state, ups, rnd=rnd + 1).state
        d = _mean([u[2] for u in ups], [u[1] for u in ups])
        for k in w:
            if name == "fedavgm":
                m[k] = o.momentum * m.get(k, 0) + d[k]
                w[k] = w[k] + o.server_lr * m[k]
                continue
            m[k] = o.beta1 * m.get(k, 0) + (1 - o.beta1) * d[k]
            v0 = v.get(k, torch.full_like(d[k], o.tau ** 2))
            if name == "fedadagrad":
                v[k] = v0 + d[k] ** 2
            elif name == "fedadam":
                v[k] = o.beta2 * v0 + (1 - o.beta2) * d[k] ** 2
            else:
                v[k] = v0 - (1 - o.beta2) * d[k] ** 2 * torch.sign(v0 - d[k] ** 2)
            w[k] = w[k] + o.server_lr * m[k] / (v[k].sqrt() + o.tau)
        torch.testing.assert_close(state["m.0.q.lora_A.weight"].double(), w["m.0.q.lora_A.weight"], atol=1e-5, rtol=1e-5)


def test_ffa_lora_keeps_a_and_asks_schools_to_freeze_it(data):
    from common.training import TrainParams

    glob, deltas = data
    strat = make("ffa_lora")
    params = strat.configure_round(1, TrainParams())
    assert params.freeze == ("lora_A",)
    res = run_round(strat, glob, [(SCHOOLS[i], 10, deltas[i]) for i in range(3)])
    for k in glob:
        if "lora_A" in k:
            torch.testing.assert_close(res.state[k], glob[k])
        else:
            torch.testing.assert_close(res.state[k], glob[k] + sum(deltas[i][k] for i in range(3)) / 3)


def test_fedsa_lora_asks_schools_to_keep_b():
    from common.training import TrainParams

    assert make("fedsa_lora").configure_round(1, TrainParams()).personal == ("lora_B",)


def _dense_updates(glob, ups):
    return torch.stack([product({k: glob[k] + d[k] for k in glob}) - product(glob) for _, _, d in ups])


def _truncated(glob, target_flat):
    """Rank-R truncation of a dense flat product, per module, as a flat product."""
    out, at = [], 0
    for a, b in lowrank.pairs(glob):
        n_out, n_in = SHAPES[b][0], SHAPES[a][1]
        t = target_flat[at : at + n_out * n_in].reshape(n_out, n_in)
        at += n_out * n_in
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        out.append(((u[:, :R] * s[:R]) @ vh[:R]).flatten())
    return torch.cat(out)


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "flexlora", "geometric_median", "krum", "multi_krum",
                                  "flora", "fedex_lora"])
def test_product_space_rules_match_a_dense_reference(name, data):
    glob, deltas = data
    k = 7
    ups = [(SCHOOLS[i], 5 + 2 * i, deltas[i]) for i in range(k)]
    dw = _dense_updates(glob, ups)
    p = torch.tensor([float(n) for _, n, _ in ups], dtype=torch.float64)
    p /= p.sum()
    if name == "median":
        agg = dw.median(dim=0).values
    elif name == "trimmed_mean":
        cut = math.floor(0.1 * k)
        agg = dw.sort(dim=0).values[cut : k - cut].mean(dim=0)
    elif name in ("flexlora", "flora", "fedex_lora"):
        agg = (p[:, None] * dw).sum(0)
    elif name == "geometric_median":
        z = (p[:, None] * dw).sum(0)
        for _ in range(200):
            wts = p / (dw - z).norm(dim=1).clamp_min(1e-8)
            z = (wts[:, None] * dw).sum(0) / wts.sum()
        agg = z
    else:
        d2 = torch.cdist(dw, dw) ** 2
        d2.fill_diagonal_(math.inf)
        scores = d2.sort(dim=1).values[:, : k - 1 - 2].sum(1)
        if name == "krum":
            agg = dw[int(scores.argmin())]
        else:
            sel = scores.argsort()[: k - 1]
            agg = (p[sel, None] * dw[sel]).sum(0) / p[sel].sum()
    want = _truncated(glob, product(glob) + agg) if name not in ("flora", "fedex_lora") else product(glob) + agg   # exact
    opts = {"weighting": "examples"} if name in ("geometric_median", "multi_krum") else {}
    got = product(run_round(make(name, **opts), glob, ups).state)
    tol = 2e-3 if name == "geometric_median" else 1e-4
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_gram_matches_dense_inner_products(data):
    glob, deltas = data
    states = [glob] + [{k: glob[k] + d[k] for k in glob} for d in deltas[:4]]
    g = lowrank.gram(lambda i, k: states[i][k], 5, lowrank.pairs(glob), SCALE)
    dense = torch.stack([product(s) for s in states])
    torch.testing.assert_close(g, dense @ dense.T, atol=1e-9, rtol=1e-9)


def test_hetlora_trains_schools_at_their_ranks_and_weights_by_product_norm(data):
    from common.training import TrainParams

    glob, deltas = data
    strat = make("hetlora", ranks={"school-0": 2, "school-1": 3})
    assert strat.configure_school(1, "school-0", TrainParams()).rank == 2
    assert strat.configure_school(1, "school-2", TrainParams()).rank == 0    # the federation's rank
    # A rank-2 school's delta is zero beyond its rank (the client pads it); its pad(A) is zero there.
    d0 = {k: v.clone() for k, v in deltas[0].items()}
    for k, v in d0.items():
        if "lora_A" in k:
            v[2:] = 0
        else:
            v[:, 2:] = 0
    res = run_round(strat, glob, [("school-0", 10, d0), ("school-1", 10, deltas[1]), ("school-2", 10, deltas[2])])
    finals = []
    for _sid, r, d in (("school-0", 2, d0), ("school-1", 3, deltas[1]), ("school-2", R, deltas[2])):
        f = {k: glob[k] + d[k] for k in glob}
        for k, v in f.items():
            if "lora_A" in k:
                v[r:] = 0
            else:
                v[:, r:] = 0
        finals.append(f)
    norms = torch.tensor([float(product(f).norm()) for f in finals], dtype=torch.float64)
    omega = norms / norms.sum()
    for k in glob:
        torch.testing.assert_close(res.state[k].double(), sum(float(omega[i]) * finals[i][k].double() for i in range(3)), atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="exceed the federation's LoRA rank"):
        make("hetlora", ranks={"school-0": 64})


def test_centred_clipping_starts_from_last_step_and_clips(data):
    glob, deltas = data
    strat = make("centred_clipping", tau=1e-3, iterations=1)
    ups = [(SCHOOLS[i], 10, deltas[i]) for i in range(5)]
    res = run_round(strat, glob, ups)
    # One iteration from v = 0 with a tiny tau: every update is clipped to norm tau, so the step is at most tau.
    assert res.metrics["clipped"] == 5
    assert res.metrics["step_norm"] <= 1e-3 + 1e-9
    res2 = run_round(strat, res.state, ups, rnd=2)
    assert res2.metrics["step_norm"] > 0


# ----------------------------------------------------------------------------- wrappers


def test_clip_wrapper_bounds_each_school(data):
    glob, deltas = data
    huge = {k: 1000 * v for k, v in deltas[0].items()}
    res = run_round(make("fedavg", ({"name": "clip", "max_norm": 0.5},), weighting="uniform"), glob,
                    [("a", 1, huge), ("b", 1, deltas[1])])
    step = math.sqrt(sum(float(((res.state[k] - glob[k]) ** 2).sum()) for k in glob))
    assert res.metrics["clipped"] >= 1 and step <= 0.5 + 1e-5


def test_dp_wrapper_adds_calibrated_noise_and_accounts(data):
    glob, deltas = data
    wrappers = ({"name": "dp", "clip_norm": 0.1, "noise_multiplier": 2.0, "seed": 3},)
    strat = make("fedavg", wrappers, weighting="uniform")
    ups = [(SCHOOLS[i], 10, {k: torch.zeros_like(v) for k, v in deltas[0].items()}) for i in range(4)]
    res = run_round(strat, glob, ups)
    noise = torch.cat([(res.state[k] - glob[k]).flatten() for k in glob]).double()
    expected = 2.0 * 0.1 / 4
    assert abs(float(noise.std()) - expected) / expected < 0.1
    eps1 = res.metrics["dp_epsilon"]
    eps2 = run_round(strat, res.state, ups, rnd=2).metrics["dp_epsilon"]
    assert 0 < eps1 < eps2 < math.inf and res.metrics["dp_sample_rate"] == pytest.approx(4 / len(SCHOOLS))
    # The accountant survives a restart through state().
    tensors, meta = strat.state()
    fresh = make("fedavg", wrappers, weighting="uniform")
    fresh.load_state(tensors, meta)
    assert fresh.accountant.epsilon() == pytest.approx(eps2)   # type: ignore[attr-defined]


def test_dp_refuses_example_weights_and_non_averaging_rules():
    with pytest.raises(ConfigError, match="weighting"):
        make("fedavg", ({"name": "dp"},))
    with pytest.raises(ConfigError, match="averaging strategy"):
        make("median", ({"name": "dp"},))


def test_compress_wrapper_asks_schools_to_compress():
    from common.compression import CompressionSpec
    from common.training import TrainParams

    params = make("fedadam", ({"name": "compress", "kind": "topk", "topk_fraction": 0.05},)).configure_school(1, "a", TrainParams())
    assert CompressionSpec.from_json(params.compression).kind == "topk"


# ----------------------------------------------------------------------------- configuration


def test_bad_configuration_is_reported_clearly():
    with pytest.raises(ConfigError, match="unknown strategy 'fedavgg'"):
        make("fedavgg")
    with pytest.raises(ConfigError, match="unknown key"):
        make("fedadam", eta=0.1)
    with pytest.raises(ConfigError, match="beta1"):
        make("fedadam", beta1=1.5)
    with pytest.raises(ConfigError, match="unknown wrapper 'noise'"):
        make("fedavg", ({"name": "noise"},))
    with pytest.raises(ConfigError, match="needs name"):
        make("fedavg", ({"max_norm": 1.0},))


def test_coordinator_config_checks_quorum_against_the_rule(tmp_path):
    from fedserver.config import CoordinatorConfig, RoundsSection, SchoolEntry, StrategySection

    cfg = dict(rounds=RoundsSection(min_schools=3, quorum=3), schools=(SchoolEntry("a", "0" * 64),))
    problems = CoordinatorConfig(strategy=StrategySection("krum", {"f": 1}), **cfg).problems()
    assert any("needs at least 4 updates" in p for p in problems)
    assert not CoordinatorConfig(strategy=StrategySection("median"), **cfg).problems()
    problems = CoordinatorConfig(strategy=StrategySection("hetlora", {"ranks": {"a": 64, "zz": 2}}), **cfg).problems()
    assert any("exceed the federation's LoRA rank" in p for p in problems)


# ----------------------------------------------------------------------------- memory


def test_buffer_spills_to_disk_and_gives_the_same_answer(data, tmp_path):
    glob, deltas = data
    ups = [(SCHOOLS[i], 10 + i, deltas[i]) for i in range(7)]
    in_memory = run_round(make("median"), glob, ups)
    strat = make("median", tmp_path=tmp_path, buffer_mb=0)
    spilled = run_round(strat, glob, ups)
    assert spilled.metrics["spilled"] == 7
    torch.testing.assert_close(spilled.state, in_memory.state)
    assert not list(tmp_path.rglob("*.safetensors"))    # spill files are removed after the round


@pytest.mark.parametrize("name", ["flora", "fedex_lora"])
def test_merging_strategies_are_exact_over_rounds_and_can_cap_the_rank(name, data):
    glob, deltas = data
    strat = make(name)
    state = glob
    for rnd in (1, 2):
        ups = [(SCHOOLS[i], 5 + i, deltas[3 * (rnd - 1) + i]) for i in range(3)]
        want = (sum((5 + i) * product({k: state[k] + d[k] if k in d else state[k] for k in state}) for i, (_, _, d) in enumerate(ups))
                / sum(5 + i for i in range(3)))
        res = run_round(strat, state, ups, rnd=rnd)
        torch.testing.assert_close(product(res.state), want, atol=1e-5, rtol=1e-5)
        state = res.state
    grow = 3 * R if name == "flora" else 4 * R
    assert res.metrics["merge_rank"] == 2 * grow
    capped = run_round(make(name, max_merge_rank=5), glob, [(SCHOOLS[i], 5, deltas[i]) for i in range(3)])
    assert capped.metrics["merge_rank"] == 5 and capped.metrics["merge_truncation_error"] > 0
    if name == "flora":   # the next round starts from a fresh LoRA: B = 0
        assert all(float(v.abs().max()) == 0 for k, v in res.state.items() if "lora_B" in k)


def test_base_merge_follows_the_artifact(tiny_model):
    """A school's model applies the merged base delta, and only the change from what it
    applied before, round after round (and removes it on request)."""
    from common.lora import BaseMerge, wrap
    from common.models import load_model

    base, _ = load_model(tiny_model)
    model = wrap(base, LoraSettings(rank=2, alpha=4.0))
    path = "base_model.model.model.layers.0.self_attn.q_proj"
    w0 = model.get_submodule(path).get_base_layer().weight.detach().clone()
    d_out, d_in = w0.shape
    gen = torch.Generator().manual_seed(0)
    m1 = {f"{path}.merged_A.weight": torch.randn(3, d_in, generator=gen), f"{path}.merged_B.weight": torch.randn(d_out, 3, generator=gen)}
    m2 = {k: 2 * v for k, v in m1.items()}
    bm = BaseMerge()
    bm.sync(model, m1)
    bm.sync(model, m2)
    w = model.get_submodule(path).get_base_layer().weight
    torch.testing.assert_close(w, w0 + m2[f"{path}.merged_B.weight"] @ m2[f"{path}.merged_A.weight"], atol=1e-4, rtol=1e-4)
    bm.sync(model, {})
    torch.testing.assert_close(w, w0, atol=1e-4, rtol=1e-4)


def test_tensor_file_reads_one_tensor_at_a_time_and_refuses_garbage(tmp_path):
    from common.wire import tensors_to_bytes
    from fedserver.strategy.buffer import TensorFile

    d = {"a": torch.randn(3, 4), "b": torch.randn(5).double(), "empty": torch.zeros(0)}
    path = tmp_path / "u.safetensors"
    path.write_bytes(tensors_to_bytes(d, {"note": "x"}))
    f = TensorFile(path)
    assert all(torch.equal(f.read(k), d[k]) for k in d)
    f.close()
    path.write_bytes(path.read_bytes()[:-8])      # truncated
    truncated = TensorFile(path)
    with pytest.raises(ValueError, match="truncated"):
        for k in d:
            truncated.read(k)
    truncated.close()
    (tmp_path / "bad").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(ValueError, match="not a safetensors file"):
        TensorFile(tmp_path / "bad")


def test_randomized_svd_is_close_to_exact():
    shapes = {"m.q.lora_A.weight": (R, 96), "m.q.lora_B.weight": (64, R)}
    ctx = StrategyContext(LoraSettings(rank=R, alpha=ALPHA), {k: TensorSpec(v) for k, v in shapes.items()}, SCHOOLS)
    gen = torch.Generator().manual_seed(5)
    glob = {k: torch.randn(v, generator=gen) * 0.3 for k, v in shapes.items()}
    ups = [(SCHOOLS[i], 10, {k: torch.randn(v, generator=gen) * 0.05 for k, v in shapes.items()}) for i in range(7)]
    results = []
    for svd in ("exact", "randomized"):
        strat = S.create("median", {"svd": svd})
        strat.setup(ctx)
        results.append(run_round(strat, glob, ups))
    exact, fast = (product(r.state) for r in results)
    assert float((fast - exact).norm() / exact.norm()) < 1e-3
    assert results[1].metrics["truncation_error"] == pytest.approx(results[0].metrics["truncation_error"], rel=1e-3)


def test_merged_step_norm_from_factors_equals_the_dense_difference():
    from fedserver.strategy.lora_aware import _merged_step_norm
    from fedserver.strategy.lowrank import product_inner

    gen = torch.Generator().manual_seed(3)
    old = {"m.merged_A.weight": torch.randn(4, 10, generator=gen), "m.merged_B.weight": torch.randn(6, 4, generator=gen)}
    new = {"m.merged_A.weight": torch.randn(7, 10, generator=gen), "m.merged_B.weight": torch.randn(6, 7, generator=gen),
           "n.merged_A.weight": torch.randn(2, 5, generator=gen), "n.merged_B.weight": torch.randn(3, 2, generator=gen)}
    dense = lambda s, m: s[f"{m}.merged_B.weight"].double() @ s[f"{m}.merged_A.weight"].double()   # noqa: E731
    want = ((dense(new, "m") - dense(old, "m")).pow(2).sum() + dense(new, "n").pow(2).sum()).sqrt()
    assert abs(_merged_step_norm(old, new) - float(want)) < 1e-9 * float(want)
    b, a = new["m.merged_B.weight"], new["m.merged_A.weight"]
    assert abs(product_inner(b, a, b, a) - float(dense(new, "m").pow(2).sum())) < 1e-9 * float(dense(new, "m").pow(2).sum())
