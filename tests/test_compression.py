"""Update compression (int8, top-k) with error feedback: real tensors, real safetensors bytes."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from common.compression import (
    CompressionSpec, ErrorFeedback, decode, encode, payload_sizes, topk_count,
)
from common.errors import ValidationError
from common.wire import bytes_to_tensors, tensors_to_bytes

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
V = "base_model.model.model.layers.0.norm.vector"  # a 1-D tensor: one row
INT8 = CompressionSpec(kind="int8")
TOPK = CompressionSpec(kind="topk", topk_fraction=0.01)


def smol_delta(seed: int = 0, scale: float = 0.01) -> dict[str, torch.Tensor]:
    """SmolLM2-135M shapes (hidden 576, intermediate 1536, r = 16)."""
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(16, 1536, generator=g) * scale, B: torch.randn(576, 16, generator=g) * scale,
            V: torch.randn(40, generator=g) * scale}


def row_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t


# ---------------------------------------------------------------- spec


def test_spec_defaults_are_valid_and_problems_are_listed():
    assert CompressionSpec().problems() == []
    assert TOPK.problems() == [] and INT8.problems() == []
    problems = CompressionSpec(kind="zstd", topk_fraction=0.0, feedback_decay=0.4).problems()
    assert len(problems) == 3
    assert "'zstd' is unknown; use one of none, int8, topk" in problems[0]
    assert "topk_fraction 0.0 must be a number in (0, 1]" in problems[1]
    assert "feedback_decay 0.4 must be a number in [0.5, 1]" in problems[2]
    for bad in (1.5, -0.1, math.nan, math.inf):
        assert any("topk_fraction" in p for p in CompressionSpec(topk_fraction=bad).problems())
    for bad in (1.01, 0.49, math.nan):
        assert any("feedback_decay" in p for p in CompressionSpec(feedback_decay=bad).problems())
    assert CompressionSpec(topk_fraction=1.0, feedback_decay=0.5).problems() == []
    assert any("error_feedback" in p for p in CompressionSpec(error_feedback="yes").problems())  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", [
    CompressionSpec(), INT8, TOPK, CompressionSpec("topk", 0.1234567890123, False, 0.9),
    CompressionSpec("int8", 1.0, True, 0.5), CompressionSpec(kind="zstd"),  # invalid specs round-trip too
])
def test_spec_json_round_trips_exactly(spec):
    text = spec.to_json()
    assert " " not in text
    assert CompressionSpec.from_json(text) == spec


@pytest.mark.parametrize("text,match", [
    ("{", "not valid JSON"),
    ("[1]", "must be a JSON object"),
    ('{"kind":"int8","level":3}', r"unknown fields \['level'\]"),
    ('{"kind":8}', "'kind' must be a string"),
    ('{"topk_fraction":"0.1"}', "'topk_fraction' must be a number"),
    ('{"feedback_decay":true}', "'feedback_decay' must be a number"),
    ('{"error_feedback":1}', "'error_feedback' must be true or false"),
])
def test_spec_from_json_refuses_garbage(text, match):
    with pytest.raises(ValueError, match=match):
        CompressionSpec.from_json(text)


def test_spec_from_json_fills_defaults():
    assert CompressionSpec.from_json('{"kind":"topk"}') == CompressionSpec(kind="topk")


def test_encode_refuses_bad_spec_and_bad_delta():
    d = smol_delta()
    with pytest.raises(ValueError, match="invalid compression spec: .*topk_fraction"):
        encode(d, CompressionSpec(kind="topk", topk_fraction=2.0))
    with pytest.raises(ValueError, match="invalid compression spec"):
        ErrorFeedback(CompressionSpec(kind="gzip"))
    cases: list[tuple[dict[str, torch.Tensor], str]] = [
        ({A: d[A].double()}, "expected a float32 tensor"),
        ({A: torch.zeros(2, 3, 4)}, "1-D or 2-D"),
        ({A: torch.zeros(0)}, "non-empty"),
        ({A + "::q": d[A]}, "without '::'"),
        ({A: torch.tensor([1.0, math.nan])}, "NaN or Inf"),
        ({A: torch.tensor([1.0, math.inf])}, "NaN or Inf"),
    ]
    for delta, match in cases:
        for spec in (INT8, TOPK, CompressionSpec()):
            with pytest.raises(ValueError, match=match):
                encode(delta, spec)


# ---------------------------------------------------------------- codecs


def test_none_is_the_identity():
    d = smol_delta()
    enc = encode(d, CompressionSpec())
    assert enc.keys() == d.keys() and all(enc[k] is d[k] for k in d)
    dec = decode(enc, "none")
    assert all(torch.equal(dec[k], d[k]) for k in d)


def test_int8_layout_and_error_bound():
    d = smol_delta()
    d[B][3] = 0.0                         # an all-zero row: scale 0, q 0
    d[B][7] = 0.0
    d[B][7, 5] = -0.2                     # a row with one non-zero entry: exact
    d[A][2] *= 1000.0                     # rows of very different magnitude
    enc = encode(d, INT8)
    assert set(enc) == {f"{k}::{s}" for k in d for s in ("q", "scale")}
    for k, t in d.items():
        q, s = enc[f"{k}::q"], enc[f"{k}::scale"]
        assert q.dtype == torch.int8 and q.shape == t.shape
        assert s.dtype == torch.float32 and s.shape == (row_view(t).shape[0],)
        assert torch.equal(s, row_view(t).abs().amax(dim=1) / 127)
        assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert float(enc[f"{B}::scale"][3]) == 0.0 and not enc[f"{B}::q"][3].any()
    dec = decode(enc, "int8")
    for k, t in d.items():
        assert dec[k].dtype == torch.float32 and dec[k].shape == t.shape
        err = row_view(dec[k] - t).abs()
        bound = row_view(enc[f"{k}::scale"])[0] if t.dim() == 1 else enc[f"{k}::scale"]
        assert bool((err <= bound.reshape(-1, 1) / 2 * (1 + 1e-5) + 1e-12).all()), k
    assert not dec[B][3].any()
    assert float(dec[B][7, 5]) == pytest.approx(-0.2, rel=1e-6) and int((dec[B][7] != 0).sum()) == 1


def test_topk_keeps_exactly_the_k_largest():
    d = smol_delta(seed=1)
    enc = encode(d, TOPK)
    assert set(enc) == {f"{k}::{s}" for k in d for s in ("idx", "val", "shape")}
    dec = decode(enc, "topk")
    for k, t in d.items():
        idx, val, shape = enc[f"{k}::idx"], enc[f"{k}::val"], enc[f"{k}::shape"]
        kk = max(1, math.ceil(0.01 * t.numel()))
        assert idx.dtype == torch.int32 and val.dtype == torch.float32 and shape.dtype == torch.int64
        assert idx.numel() == val.numel() == kk
        assert shape.tolist() == list(t.shape)
        assert bool((idx[1:] > idx[:-1]).all())                          # sorted, no duplicates
        flat = t.reshape(-1)
        assert torch.equal(val, flat[idx.long()])                        # the values are exact
        kept = torch.zeros(flat.numel(), dtype=torch.bool)
        kept[idx.long()] = True
        assert float(flat[kept].abs().min()) >= float(flat[~kept].abs().max())  # and the largest
        assert int((dec[k] != 0).sum()) == kk
        assert torch.equal(dec[k].reshape(-1)[kept], flat[kept]) and not dec[k].reshape(-1)[~kept].any()
    assert enc[f"{A}::idx"].numel() == 246 and enc[f"{B}::idx"].numel() == 93 and enc[f"{V}::idx"].numel() == 1


def test_topk_fraction_one_is_lossless():
    d = smol_delta(seed=2)
    dec = decode(encode(d, CompressionSpec(kind="topk", topk_fraction=1.0)), "topk")
    assert all(torch.equal(dec[k], d[k]) for k in d)


@pytest.mark.parametrize("fraction,numel,k", [
    (0.01, 9216, 93), (0.01, 24576, 246), (0.01, 40, 1), (1e-9, 10, 1), (1.0, 5, 5),
    (0.07, 100, 7),   # 0.07 * 100 == 7.000000000000001 in floating point: still 7
    (0.5, 3, 2),
])
def test_topk_count(fraction, numel, k):
    assert topk_count(fraction, numel) == k


@pytest.mark.parametrize("spec", [INT8, TOPK], ids=["int8", "topk"])
def test_encoded_payload_survives_safetensors_bytes(spec):
    d = smol_delta(seed=3)
    enc = encode(d, spec)
    back = bytes_to_tensors(tensors_to_bytes(enc))
    assert back.keys() == enc.keys() and all(back[k].dtype == enc[k].dtype for k in enc)
    a, b = decode(enc, spec.kind), decode(back, spec.kind)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compression_ratio_on_smollm2_shapes():
    """The bytes-saved figure on SmolLM2-135M adapter shapes (r = 16): B of q_proj is 576x16,
    A of down_proj is 16x1536. int8 with per-row scales is ~4x on wide rows and ~3.1x on the
    16-wide rows of B (one 4-byte scale per 16 bytes of q); top-1% is ~30-40x."""
    g = torch.Generator().manual_seed(4)
    b_q = {B: torch.randn(576, 16, generator=g) * 0.01}
    a_down = {A: torch.randn(16, 1536, generator=g) * 0.01}
    ratios = {}
    for name, d in {"576x16": b_q, "16x1536": a_down, "both": {**b_q, **a_down}}.items():
        for spec in (INT8, TOPK):
            dense, packed = payload_sizes(d, encode(d, spec))
            assert dense == len(tensors_to_bytes(d))
            ratios[name, spec.kind] = dense / packed
    assert 3.9 < ratios["16x1536", "int8"] <= 4.0
    assert 3.0 < ratios["576x16", "int8"] < 3.3
    assert 3.6 < ratios["both", "int8"] < 4.0
    assert ratios["16x1536", "topk"] > 35 and ratios["576x16", "topk"] > 25 and ratios["both", "topk"] > 30
    dense, packed = payload_sizes(b_q, encode(b_q, CompressionSpec()))
    assert dense == packed


# ---------------------------------------------------------------- hostile payloads

Mutation = Callable[[dict[str, torch.Tensor]], None]


def _set(key: str, value: torch.Tensor) -> Mutation:
    def f(t: dict[str, torch.Tensor]) -> None:
        t[key] = value
    return f


def _del(key: str) -> Mutation:
    def f(t: dict[str, torch.Tensor]) -> None:
        del t[key]
    return f


def _edit(key: str, fn: Callable[[torch.Tensor], None]) -> Mutation:
    def f(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        fn(t[key])
    return f


def _poke(i: int, v: float) -> Callable[[torch.Tensor], None]:
    def f(x: torch.Tensor) -> None:
        x.view(-1)[i] = v
    return f


INT8_CASES: list[tuple[str, Mutation, str]] = [
    ("missing scale", _del(f"{B}::scale"), r"has ::q but is missing its companion ::scale"),
    ("missing q", _del(f"{A}::q"), r"has ::scale but is missing its companion ::q"),
    ("q dtype", lambda t: t.update({f"{A}::q": t[f"{A}::q"].to(torch.int16)}), r"::q has dtype torch.int16, expected torch.int8"),
    ("q float", lambda t: t.update({f"{A}::q": t[f"{A}::q"].float()}), r"::q has dtype torch.float32, expected torch.int8"),
    ("scale dtype", lambda t: t.update({f"{B}::scale": t[f"{B}::scale"].double()}), r"::scale has dtype torch.float64"),
    ("scale count", lambda t: t.update({f"{B}::scale": t[f"{B}::scale"][:-1]}), r"::q has 576 row\(s\); int8 needs exactly one float32 scale per row"),
    ("scale count 1-D", lambda t: t.update({f"{V}::scale": torch.ones(2)}), r"::q has 1 row\(s\)"),
    ("scale 2-D", lambda t: t.update({f"{A}::scale": t[f"{A}::scale"].reshape(16, 1)}), "one float32 scale per row"),
    ("scale NaN", _edit(f"{A}::scale", _poke(3, math.nan)), r"::scale contains NaN or Inf"),
    ("scale Inf", _edit(f"{A}::scale", _poke(0, math.inf)), r"::scale contains NaN or Inf"),
    ("scale negative", _edit(f"{B}::scale", _poke(9, -1e-3)), r"::scale contains a negative value"),
    ("q -128", _edit(f"{A}::q", _poke(100, -128)), r"::q contains -128, which the symmetric int8 codec never produces"),
    ("q in zero row", _edit(f"{B}::scale", _poke(5, 0.0)), r"non-zero values in a row whose scale is 0"),
    ("scale overflow", _edit(f"{A}::scale", _poke(0, 3e38)), r"overflows float32"),
    ("q 3-D", lambda t: t.update({f"{A}::q": t[f"{A}::q"].reshape(4, 4, 1536)}), r"::q must be a non-empty 1-D or 2-D tensor"),
    ("q empty", lambda t: t.update({f"{V}::q": torch.zeros(0, dtype=torch.int8)}), "non-empty"),
    ("unknown suffix", _set(f"{A}::zero_point", torch.zeros(16)), r"unknown suffix '::zero_point' for kind 'int8'"),
    ("other codec's suffix", _set(f"{A}::idx", torch.zeros(1, dtype=torch.int32)), r"unknown suffix '::idx' for kind 'int8'"),
    ("no suffix", _set(A, torch.zeros(16, 1536)), r"has no codec suffix; a int8 payload holds only ::q, ::scale"),
    ("nested name", _set(f"x::{A}::q", torch.zeros(1, dtype=torch.int8)), "malformed name"),
    ("empty name", _set("::q", torch.zeros(1, dtype=torch.int8)), "malformed name"),
]

TOPK_CASES: list[tuple[str, Mutation, str]] = [
    ("missing idx", _del(f"{A}::idx"), r"has ::shape, ::val but is missing its companion ::idx"),
    ("missing val", _del(f"{B}::val"), r"missing its companion ::val"),
    ("missing shape", _del(f"{V}::shape"), r"missing its companion ::shape"),
    ("idx dtype", lambda t: t.update({f"{A}::idx": t[f"{A}::idx"].long()}), r"::idx has dtype torch.int64, expected torch.int32"),
    ("val dtype", lambda t: t.update({f"{A}::val": t[f"{A}::val"].half()}), r"::val has dtype torch.float16, expected torch.float32"),
    ("shape dtype", lambda t: t.update({f"{A}::shape": t[f"{A}::shape"].int()}), r"::shape has dtype torch.int32, expected torch.int64"),
    ("idx too large", _edit(f"{A}::idx", _poke(-1, 16 * 1536)), r"::idx has index 24576, outside 0..24575"),
    ("idx negative", _edit(f"{B}::idx", _poke(0, -1)), r"::idx has index -1, outside"),
    ("idx duplicated", _edit(f"{A}::idx", lambda x: x.__setitem__(5, int(x[4]))), r"::idx contains a duplicated index"),
    ("idx unsorted", _edit(f"{A}::idx", lambda x: x.copy_(x.flip(0))), r"::idx is not sorted ascending"),
    ("idx/val lengths", lambda t: t.update({f"{A}::val": t[f"{A}::val"][:-1]}), r"must be 1-D with the same length"),
    ("idx 2-D", lambda t: t.update({f"{B}::idx": t[f"{B}::idx"].reshape(1, -1)}), r"must be 1-D with the same length"),
    ("no entries", lambda t: t.update({f"{V}::idx": torch.zeros(0, dtype=torch.int32), f"{V}::val": torch.zeros(0)}), "keeps no entries"),
    ("shape zero", _set(f"{V}::shape", torch.tensor([0], dtype=torch.int64)), r"::shape \[0\] has a non-positive dimension"),
    ("shape negative", _set(f"{A}::shape", torch.tensor([-16, -1536], dtype=torch.int64)), "non-positive dimension"),
    ("shape 3 dims", _set(f"{A}::shape", torch.tensor([4, 4, 1536], dtype=torch.int64)), r"::shape must be a 1-D int64 tensor of 1 or 2 dims"),
    ("shape 2-D tensor", _set(f"{A}::shape", torch.tensor([[16, 1536]], dtype=torch.int64)), "1-D int64 tensor of 1 or 2 dims"),
    ("shape smaller than entries", _set(f"{A}::shape", torch.tensor([16, 2], dtype=torch.int64)), r"keeps 246 entries but ::shape \[16, 2\] has only 32"),
    ("shape inconsistent with idx", _set(f"{A}::shape", torch.tensor([16, 1000], dtype=torch.int64)), r"outside 0..15999 for shape \[16, 1000\]"),
    ("val NaN", _edit(f"{B}::val", _poke(2, math.nan)), r"::val contains NaN or Inf"),
    ("val Inf", _edit(f"{B}::val", _poke(2, -math.inf)), r"::val contains NaN or Inf"),
    ("terabyte shape", _set(f"{A}::shape", torch.tensor([2**40, 2**20], dtype=torch.int64)),
     r"declares 1152921504606846976 elements, more than the \d+ this payload may still declare"),
    ("shape over max_numel", _set(f"{A}::shape", torch.tensor([50_000_001], dtype=torch.int64)),
     r"more than the \d+ this payload may still declare \(max_numel\)"),
    ("unknown suffix", _set(f"{A}::scale", torch.ones(16)), r"unknown suffix '::scale' for kind 'topk'"),
]


def _check_message(exc: ValidationError) -> None:
    """Every refusal names the payload, and says what to do after the ';'."""
    msg = str(exc)
    assert msg.startswith("compressed update, tensor '") and "; " in msg
    assert any(w in msg.split("; ", 1)[1] for w in ("re-encode", "check", "declare", "refused", "lower"))


@pytest.mark.parametrize("case", INT8_CASES, ids=[c[0] for c in INT8_CASES])
def test_int8_decode_refuses_malformed_payloads(case):
    _, mutate, match = case
    enc = encode(smol_delta(), INT8)
    mutate(enc)
    with pytest.raises(ValidationError, match=match) as info:
        decode(enc, "int8")
    _check_message(info.value)


@pytest.mark.parametrize("case", TOPK_CASES, ids=[c[0] for c in TOPK_CASES])
def test_topk_decode_refuses_malformed_payloads(case):
    _, mutate, match = case
    enc = encode(smol_delta(), TOPK)
    mutate(enc)
    with pytest.raises(ValidationError, match=match) as info:
        decode(enc, "topk")
    _check_message(info.value)


def test_decode_budget_is_for_the_whole_payload():
    """Many tensors, each under the limit, cannot add up to a huge allocation either."""
    one = torch.tensor([0], dtype=torch.int32)
    enc: dict[str, torch.Tensor] = {}
    for i in range(3):
        enc[f"t{i}::idx"], enc[f"t{i}::val"] = one, torch.ones(1)
        enc[f"t{i}::shape"] = torch.tensor([20_000_000], dtype=torch.int64)
    with pytest.raises(ValidationError, match=r"tensor 't2'.*more than the 10000000 this payload may still declare"):
        decode(enc, "topk")
    with pytest.raises(ValidationError, match="max_numel"):
        decode(encode(smol_delta(), INT8), "int8", max_numel=30_000)
    with pytest.raises(ValidationError, match="max_numel"):
        decode(smol_delta(), "none", max_numel=30_000)
    small = encode(smol_delta(), TOPK)
    assert decode(small, "topk", max_numel=16 * 1536 + 576 * 16 + 40).keys() == smol_delta().keys()
    with pytest.raises(ValidationError, match="max_numel"):
        decode(small, "topk", max_numel=16 * 1536 + 576 * 16 + 39)


def test_decode_refuses_unknown_kind_and_bad_uncompressed_payloads():
    with pytest.raises(ValidationError, match="compression kind 'zstd' is unknown; use one of none, int8, topk"):
        decode({}, "zstd")
    enc = encode(smol_delta(), INT8)
    with pytest.raises(ValidationError, match=r"has a codec suffix but the update was declared uncompressed") as info:
        decode(enc, "none")
    _check_message(info.value)
    with pytest.raises(ValidationError, match=r"has no codec suffix; a topk payload"):
        decode(smol_delta(), "topk")
    with pytest.raises(ValidationError, match="dtype torch.float16, expected torch.float32"):
        decode({A: torch.zeros(4, dtype=torch.float16)}, "none")
    with pytest.raises(ValidationError, match="NaN or Inf"):
        decode({A: torch.tensor([0.0, math.nan])}, "none")


# ---------------------------------------------------------------- error feedback


@pytest.mark.parametrize("spec", [TOPK, INT8], ids=["topk", "int8"])
def test_error_feedback_loses_nothing(spec):
    """sum_t decode(C(u_t)) + e_T == sum_t delta_t: what was not sent is still in the residual."""
    ef = ErrorFeedback(spec)
    true_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in smol_delta().items()}
    sent_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in true_sum.items()}
    for step in range(50):
        delta = smol_delta(seed=100 + step)
        dec = decode(bytes_to_tensors(tensors_to_bytes(ef.compress(delta))), spec.kind)
        for k in delta:
            true_sum[k] += delta[k].double()
            sent_sum[k] += dec[k].double()
    residual = ef.state_dict()
    gap = max(float((sent_sum[k] + residual[k].double() - true_sum[k]).abs().max()) for k in true_sum)
    assert gap <= 1e-5
    assert ef.residual_norm() == pytest.approx(
        math.sqrt(sum(float((true_sum[k] - sent_sum[k]).square().sum()) for k in true_sum)), rel=1e-4)


def test_error_feedback_beats_plain_topk_on_a_persistent_direction():
    """A school that keeps pushing the same direction: without feedback top-k drops the same
    99% every round and the error grows linearly; with feedback it is the bounded residual."""
    g = smol_delta(seed=7)
    rounds = 100
    with_ef, without = ErrorFeedback(TOPK), ErrorFeedback(CompressionSpec(kind="topk", error_feedback=False))
    sums = {name: {k: torch.zeros_like(v) for k, v in g.items()} for name in ("ef", "plain")}
    for _ in range(rounds):
        for name, ef in (("ef", with_ef), ("plain", without)):
            dec = decode(ef.compress(g), "topk")
            for k in g:
                sums[name][k] += dec[k]

    def rel_err(s: dict[str, torch.Tensor]) -> float:
        num = sum(float((s[k] - rounds * g[k]).square().sum()) for k in g)
        den = sum(float((rounds * g[k]).square().sum()) for k in g)
        return math.sqrt(num / den)

    assert without.residual_norm() == 0.0 and without.state_dict() == {}
    assert rel_err(sums["plain"]) > 0.9                  # 1% of the entries carry little of the norm
    assert rel_err(sums["ef"]) < 0.5 * rel_err(sums["plain"])
    assert rel_err(sums["ef"]) * rounds * math.sqrt(sum(float(v.square().sum()) for v in g.values())) == pytest.approx(
        with_ef.residual_norm(), rel=1e-3)


def test_without_feedback_or_compression_there_is_no_residual():
    d = smol_delta()
    plain = ErrorFeedback(CompressionSpec(kind="int8", error_feedback=False))
    enc = plain.compress(d)
    ref = encode(d, INT8)
    assert all(torch.equal(enc[k], ref[k]) for k in ref)
    assert plain.residual_norm() == 0.0
    none = ErrorFeedback(CompressionSpec())
    assert all(torch.equal(none.compress(d)[k], d[k]) for k in d) and none.residual_norm() == 0.0


def test_missed_round_decays_the_residual():
    d = smol_delta()
    ef = ErrorFeedback(CompressionSpec(kind="topk", topk_fraction=0.05, feedback_decay=0.5))
    ef.compress(d)
    before, norm = ef.state_dict(), ef.residual_norm()
    assert norm > 0
    ef.missed_round()
    assert all(torch.equal(ef.state_dict()[k], before[k] * 0.5) for k in d)
    ef.missed_round()
    assert ef.residual_norm() == pytest.approx(norm * 0.25, rel=1e-6)
    keep = ErrorFeedback(CompressionSpec(kind="topk", topk_fraction=0.05, feedback_decay=1.0))
    keep.compress(d)
    kept = keep.state_dict()
    keep.missed_round()
    assert all(torch.equal(keep.state_dict()[k], kept[k]) for k in d)
    # a decayed residual then enters the next upload: u = delta + 0.25 e
    nxt = smol_delta(seed=9)
    residual = ef.state_dict()
    sent = decode(ef.compress(nxt), "topk")
    assert max(float((sent[k] + ef.state_dict()[k] - nxt[k] - residual[k]).abs().max()) for k in d) < 1e-6


def test_state_dict_round_trips_through_safetensors_bytes():
    spec = CompressionSpec(kind="topk", topk_fraction=0.02, feedback_decay=0.9)
    ef = ErrorFeedback(spec)
    for step in range(3):
        ef.compress(smol_delta(seed=20 + step))
    ef.missed_round()
    saved = tensors_to_bytes(ef.state_dict())   # what the school daemon writes to disk
    restored = ErrorFeedback(spec)
    restored.load_state_dict(bytes_to_tensors(saved))
    assert restored.residual_norm() == ef.residual_norm()
    nxt = smol_delta(seed=30)
    a, b = ef.compress(nxt), restored.compress(nxt)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(ef.state_dict()[k], restored.state_dict()[k]) for k in nxt)
    # state_dict hands out copies: changing them does not change the residual
    sd = ef.state_dict()
    sd[A].zero_()
    assert ef.residual_norm() == restored.residual_norm()


def test_residual_must_match_the_adapter():
    ef = ErrorFeedback(TOPK)
    ef.compress(smol_delta())
    with pytest.raises(ValueError, match=r"different adapter tensors.*call reset\(\)"):
        ef.compress({A: smol_delta()[A]})
    with pytest.raises(ValueError, match=r"residual shape \(576, 16\) differs.*call reset\(\)"):
        ef.compress({**smol_delta(), B: torch.zeros(576, 8)})
    ef.reset()
    assert ef.residual_norm() == 0.0
    ef.compress({A: smol_delta()[A]})
    with pytest.raises(ValueError, match="NaN or Inf"):
        ef.load_state_dict({A: torch.full((2,), math.nan)})
    with pytest.raises(ValueError, match="without '::'"):
        ef.load_state_dict({A + "::q": torch.zeros(2)})
    ef.load_state_dict({})
    assert ef.residual_norm() == 0.0


async def test_daemon_keeps_the_residual_on_disk_and_decays_it_for_missed_rounds(tmp_path):
    """The school's error-feedback residual survives a restart (it is on disk) and shrinks
    by feedback_decay for every round the school sat out."""
    from common.compression import CompressionSpec, ErrorFeedback
    from common.wire import bytes_to_tensors, tensors_to_bytes
    from fedclient.config import SchoolConfig, SchoolSection
    from fedclient.daemon import SchoolDaemon

    cfg = SchoolConfig(school=SchoolSection(state_dir=tmp_path))
    spec = CompressionSpec("topk", topk_fraction=0.1, error_feedback=True, feedback_decay=0.5)
    gen = torch.Generator().manual_seed(0)
    d1 = {"m.lora_A.weight": torch.randn(4, 10, generator=gen), "m.lora_B.weight": torch.randn(6, 4, generator=gen)}
    zero = {k: torch.zeros_like(v) for k, v in d1.items()}

    SchoolDaemon(cfg, "t", None)._encode(d1, spec.to_json(), 1)     # type: ignore[arg-type]
    # A new daemon process (restart), two rounds later: the residual was decayed twice.
    payload, kind = SchoolDaemon(cfg, "t", None)._encode(zero, spec.to_json(), 4)   # type: ignore[arg-type]
    ref = ErrorFeedback(spec)
    ref.compress(d1)
    ref.missed_round()
    ref.missed_round()
    want = ref.compress(zero)
    got = bytes_to_tensors(payload)
    assert kind == "topk" and got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert payload == tensors_to_bytes(want)
