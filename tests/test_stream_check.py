"""Uploads checked as their bytes arrive and folded from their file a slice at a time: the
coordinator never holds a whole upload (issue #9, memory). The streamed check must agree
with `validate_update` on every payload it decides, and hand every payload it cannot decide
to the general path; the file fold must give bit-for-bit the sums of the in-memory fold."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

from common.errors import ValidationError
from common.lora import TensorSpec, initial_state
from common.wire import tensors_to_bytes
from fedserver.strategy import ClientUpdate, FedAvg, StrategyContext
from fedserver.strategy.fedavg import FedAvgM
from common.errors import CorruptFileError
from common.safetensors_stream import write_safetensors
from fedserver.validation import FileDelta, FileState, StreamCheck, validate_update

LAYOUT = {
    "m.0.lora_A.weight": TensorSpec((4, 33)),   # odd sizes: elements straddle chunk boundaries
    "m.0.lora_B.weight": TensorSpec((47, 4)),
    "m.1.lora_A.weight": TensorSpec((4, 33)),
    "m.1.lora_B.weight": TensorSpec((47, 4)),
}


def delta(seed: int, scale: float = 1e-2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in LAYOUT.items()}


def feed(payload: bytes, max_norm: float = 0.0, seed: int = 0) -> StreamCheck:
    """The payload fed in random pieces, from 1 byte up, as gRPC chunks might cut it."""
    check = StreamCheck(LAYOUT, len(payload), max_norm)
    rng, pos = random.Random(seed), 0
    while pos < len(payload):
        n = rng.choice([1, 2, 3, 5, 64, 700, 4096])
        check.feed(payload[pos:pos + n])
        pos += n
    return check


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_packed_update_is_decided_as_it_arrives(tmp_path, seed):
    d = delta(seed)
    payload = tensors_to_bytes(d)
    check = feed(payload, seed=seed)
    packed = check.result(tmp_path / "u")
    assert packed is not None and check.packed
    (tmp_path / "u").write_bytes(payload)
    back = FileDelta(packed, LAYOUT)
    assert set(back) == set(LAYOUT)
    for k, v in d.items():
        assert torch.equal(back[k], v)


def test_the_norm_bound_is_the_same_as_validate_updates(tmp_path):
    payload = tensors_to_bytes(delta(3))
    norm = float(torch.sqrt(sum((v.double() ** 2).sum() for v in delta(3).values())))
    assert feed(payload, max_norm=norm * 1.001).result(tmp_path / "u") is not None
    with pytest.raises(ValidationError, match="exceeds the bound") as streamed:
        feed(payload, max_norm=norm * 0.999).result(tmp_path / "u")
    with pytest.raises(ValidationError, match="exceeds the bound") as whole:
        validate_update(bytearray(payload), sha(payload), LAYOUT, max_norm=norm * 0.999)
    assert str(streamed.value).split(" exceeds")[0][:18] == str(whole.value).split(" exceeds")[0][:18]


def sha(b: bytes) -> str:
    import hashlib

    return hashlib.sha256(b).hexdigest()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_a_non_finite_update_goes_to_the_general_path_which_names_the_tensor(tmp_path, bad):
    d = delta(4)
    d["m.1.lora_B.weight"][5, 2] = bad
    d["m.1.lora_B.weight"][6, 2] = bad
    payload = tensors_to_bytes(d)
    check = feed(payload)
    assert check.result(tmp_path / "u") is None and check.packed is False
    with pytest.raises(ValidationError, match="m.1.lora_B.weight"):
        validate_update(bytearray(payload), sha(payload), LAYOUT)


@pytest.mark.parametrize("bad", [None, float("nan")])
def test_chunks_that_are_views_at_odd_addresses_give_the_norm_of_aligned_ones(tmp_path, bad):
    """gRPC hands chunks over as views a few bytes into its messages, so their elements are
    seldom aligned: the sum of squares, and a non-finite value, are found as from aligned bytes."""
    d = {k: v * 100 for k, v in delta(6).items()}
    if bad is not None:
        d["m.1.lora_A.weight"][3, 30] = bad
    payload = tensors_to_bytes(d)
    held = bytearray(b"\x00" + payload)   # every view below starts one byte past an aligned address
    check = StreamCheck(LAYOUT, len(payload))
    pos = 0
    for n in (9, 301, 1500, 20, 2048, 10**6):
        check.feed(memoryview(held)[1 + pos:1 + min(pos + n, len(payload))])
        pos = min(pos + n, len(payload))
    assert pos == len(payload)
    if bad is not None:
        assert check.packed is False and check.result(tmp_path / "u") is None
        return
    assert check.result(tmp_path / "u") is not None
    want = float(sum((v.double() ** 2).sum() for v in d.values()))
    assert check._sumsq == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("what", ["missing", "extra", "shape", "dtype", "metadata-only-ok", "short", "garbage"])
def test_anything_but_a_packed_update_of_the_layout_is_left_to_the_general_path(tmp_path, what):
    d = delta(5)
    if what == "missing":
        del d["m.0.lora_A.weight"]
    elif what == "extra":
        d["x.lora_A.weight"] = torch.zeros(2, 2)
    elif what == "shape":
        d["m.0.lora_A.weight"] = torch.zeros(33, 4)
    elif what == "dtype":
        d["m.0.lora_A.weight"] = d["m.0.lora_A.weight"].double()
    payload = tensors_to_bytes(d, {"note": "x"} if what == "metadata-only-ok" else None)
    if what == "short":
        payload = payload[:-4]
    if what == "garbage":
        payload = b"\xff" * 200
    check = StreamCheck(LAYOUT, len(payload) + (4 if what == "short" else 0))
    check.feed(payload)
    found = check.result(tmp_path / "u")
    if what == "metadata-only-ok":
        assert found is not None   # metadata is allowed, as validate_update allows it
    else:
        assert found is None


def ctx() -> StrategyContext:
    from common.lora import LoraSettings

    return StrategyContext(LoraSettings(rank=4, alpha=8), LAYOUT)


@pytest.mark.parametrize("strategy", [FedAvg, FedAvgM])
def test_folding_from_files_gives_the_same_bits_as_folding_tensors(tmp_path, strategy):
    glob = initial_state(LAYOUT, 0)
    results = []
    for from_file in (False, True):
        s = strategy()
        s.setup(ctx())
        s.begin_round(1, glob)
        for i, n in enumerate((3, 11, 7)):
            d = delta(10 + i)
            if from_file:
                payload = tensors_to_bytes(d)
                path = tmp_path / f"{i}.safetensors"
                path.write_bytes(payload)
                packed = feed(payload, seed=i).result(path)
                assert packed is not None
                d = FileDelta(packed, LAYOUT)
            s.accumulate(ClientUpdate(f"s{i}", 1, n, d))
        results.append(s.finalize())
    a, b = results
    assert a.state.keys() == b.state.keys() == glob.keys()
    for k in glob:
        assert torch.equal(a.state[k], b.state[k]), k
        assert a.state[k].dtype == glob[k].dtype and a.state[k].shape == glob[k].shape
    assert a.metrics == b.metrics


def test_the_new_state_does_not_share_memory_with_the_old_one_or_the_sums():
    glob = initial_state(LAYOUT, 0)
    s = FedAvg()
    s.setup(ctx())
    s.begin_round(1, glob)
    s.accumulate(ClientUpdate("a", 1, 2, delta(1)))
    new = s.finalize().state
    before = {k: v.clone() for k, v in new.items()}
    s.begin_round(2, new)
    s.accumulate(ClientUpdate("a", 2, 2, delta(2)))
    s.finalize()
    for k in new:   # round 2 left round 1's result alone
        assert torch.equal(new[k], before[k])


@pytest.mark.parametrize("strategy", [FedAvg, FedAvgM])
def test_a_global_held_as_its_file_gives_the_same_bits(tmp_path, strategy):
    """The engine holds the global adapter as its artefact file between commits (FileState):
    the averaging family reads shapes at the start and values at the close, with the same result."""
    glob = initial_state(LAYOUT, 0)
    glob = {k: v + 0.5 for k, v in glob.items()}   # B is zero at init: make every tensor count
    write_safetensors(tmp_path / "global", glob)
    results = []
    for held in (glob, FileState(tmp_path / "global")):
        s = strategy()
        s.setup(ctx())
        s.begin_round(1, held)
        for i, n in enumerate((3, 11)):
            s.accumulate(ClientUpdate(f"s{i}", 1, n, delta(20 + i)))
        results.append(s.finalize())
    a, b = results
    for k in glob:
        assert torch.equal(a.state[k], b.state[k]) and a.state[k].dtype == b.state[k].dtype, k
    assert a.metrics == b.metrics


@pytest.mark.parametrize("held", ["memory", "file"])
def test_the_new_state_is_the_global_plus_the_step_in_float64_bit_for_bit(tmp_path, held):
    """new_state adds in long runs over segments: the same bits as float32(float64(g) + d) per
    tensor, for steps in segments, steps that are separate tensors or float32, and tensors the
    step leaves out (frozen: the global's values as they are)."""
    from fedserver.strategy.fedavg import new_state, segmented_empty_like

    layout = {f"m.{i:02d}.lora_{'AB'[i % 2]}.weight": TensorSpec((3 + i, 70 + 3 * i)) for i in range(24)}
    g = {k: torch.randn(v.shape) for k, v in layout.items()}
    write_safetensors(tmp_path / "g", g)
    glob = FileState(tmp_path / "g") if held == "file" else g
    step = segmented_empty_like({k: g[k] for k in sorted(g)})
    for v in step.values():
        v.copy_(torch.randn(v.shape, dtype=torch.float64) * 1e-3)
    keys = sorted(g)
    step[keys[3]] = torch.randn(g[keys[3]].shape, dtype=torch.float64)    # a tensor of its own
    step[keys[7]] = torch.randn(g[keys[7]].shape)                          # float32
    del step[keys[10]], step[keys[11]]                                     # frozen: left out
    want = {k: (g[k].double() + step[k].double()).float() if k in step else g[k] for k in g}
    got = new_state(glob, dict(step))
    assert got.keys() == g.keys()
    for k in g:
        assert torch.equal(got[k], want[k]) and got[k].dtype == torch.float32, k
    with pytest.raises(ValueError, match="shape"):
        new_state(glob, {keys[0]: torch.zeros(2, 2, dtype=torch.float64)})


@pytest.mark.parametrize("held", ["memory", "file", "float64"])   # float64: no rounding hides a bit
@pytest.mark.parametrize("options", [{}, {"server_lr": 0.7}, {"weighting": "uniform"}, {"lora_a": "frozen"}])
def test_fedavgs_one_pass_close_gives_the_bits_of_mean_then_step_then_add(tmp_path, held, options):
    """FedAvg without mean hooks makes mean, step, norm and new state in one pass (MeanStep):
    the state is bit for bit that of the separate passes (which a mean hook still takes),
    the update norm the same to rounding, and the kept sums are left for the next round."""
    glob = {k: v + 0.25 for k, v in initial_state(LAYOUT, 0).items()}
    if held == "float64":
        glob = {k: v.double() for k, v in glob.items()}
    write_safetensors(tmp_path / "g", glob)
    results, sums = [], []
    for fused in (True, False):
        s = FedAvg(FedAvg.Options(**options))
        s.setup(ctx())
        if not fused:
            s.mean_hooks.append(lambda mean, count: {})   # a hook sees the mean: the separate passes
        for rnd in (1, 2):   # the second round folds into the first's kept sums
            s.begin_round(rnd, FileState(tmp_path / "g") if held == "file" else glob)
            for i, n in enumerate((3, 11, 7)):
                s.accumulate(ClientUpdate(f"s{i}", rnd, n, delta(30 + 3 * rnd + i)))
            if fused and rnd == 2:
                sums.append({k: v.clone() for k, v in s._sum.items()})
            results.append(s.finalize())
        if fused:
            assert all(torch.equal(s._kept[k], v) for k, v in sums[0].items())   # not divided in place
    for a, b in ((results[0], results[2]), (results[1], results[3])):
        assert a.state.keys() == b.state.keys() == glob.keys()
        for k in glob:
            assert torch.equal(a.state[k], b.state[k]) and a.state[k].dtype == b.state[k].dtype, k
        assert a.metrics["update_norm"] == pytest.approx(b.metrics["update_norm"], rel=1e-12)
        assert {k: v for k, v in a.metrics.items() if k != "update_norm"} == \
            {k: v for k, v in b.metrics.items() if k != "update_norm"}


@pytest.mark.parametrize("held_as", ["state", "tensor", "slice", "memoryview"])
def test_a_close_makes_its_state_in_the_last_ones_buffers_only_when_nothing_holds_them(tmp_path, held_as):
    """FedAvg keeps the buffers of the state it made (KeptBuffers): the next close makes its
    state in them when nothing holds the last one, or any view of it, any more; while anything
    does, the close makes its own, and what is held keeps its values."""
    glob = initial_state(LAYOUT, 0)
    write_safetensors(tmp_path / "g", glob)
    s = FedAvg()
    s.setup(ctx())

    def close(rnd: int) -> dict[str, torch.Tensor]:
        s.begin_round(rnd, FileState(tmp_path / "g"))
        for i, n in enumerate((3, 5)):
            s.accumulate(ClientUpdate(f"s{i}", rnd, n, delta(10 * rnd + i)))
        state = s.finalize().state
        for k, v in glob.items():   # the global plus this round's mean, whatever memory it is in
            mean = (3 * delta(10 * rnd)[k].double() + 5 * delta(10 * rnd + 1)[k].double()) / 8
            assert torch.equal(state[k], (v.double() + mean).float()), (rnd, k)
        return state

    k = "m.0.lora_B.weight"
    first = close(1)
    where = {name: t.data_ptr() for name, t in first.items()}
    want = first[k].clone()
    holder: object = {"state": first, "tensor": first[k], "slice": first[k][1:2],
                      "memoryview": first[k].numpy().data}[held_as]
    del first
    second = close(2)   # round 1's state is still held: a state of its own
    assert all(second[name].data_ptr() != at for name, at in where.items())
    assert torch.equal(first_k(holder, held_as, want), want)
    del holder, second
    third = close(3)    # nothing holds round 1's or round 2's state: the kept buffers again
    assert {name: t.data_ptr() for name, t in third.items()} == where


def first_k(holder: object, held_as: str, like: torch.Tensor) -> torch.Tensor:
    """The held tensor's values, whatever form it is held in."""
    if held_as == "state":
        return holder["m.0.lora_B.weight"]   # type: ignore[index]
    if held_as == "memoryview":
        return torch.frombuffer(bytearray(holder), dtype=like.dtype).view(like.shape)   # type: ignore[arg-type]
    if held_as == "slice":
        return like.clone().index_copy_(0, torch.tensor([1]), holder)   # type: ignore[arg-type]
    return holder   # type: ignore[return-value]


@pytest.mark.parametrize("fused", [True, False])
def test_the_new_state_goes_to_the_sink_in_pieces_as_it_is_made(tmp_path, monkeypatch, fused):
    """new_state hands what it has made to the sink a piece at a time (so that the writer is
    left one piece, not a segment, when the last element is made): the pieces follow each
    other in memory, cover the state (frozen tensors, left as the global's, too) and none is
    more than SINK_ELEMENTS and what was left before it; the state is the same as made without a sink."""
    from fedserver.strategy import fedavg as fa

    monkeypatch.setattr(fa, "SINK_ELEMENTS", 1 << 10)
    layout = {f"m.{i:02d}.lora_{'AB'[i % 2]}.weight": TensorSpec((40 + i, 70 + 3 * i)) for i in range(24)}
    g = {k: torch.randn(v.shape) for k, v in layout.items()}
    write_safetensors(tmp_path / "g", g)
    keys = sorted(g)

    def make(sink):
        step = fa.segmented_empty_like({k: g[k] for k in keys})
        for i, v in enumerate(step.values()):
            v.copy_(torch.full(v.shape, 1e-3 * (i + 1), dtype=torch.float64))
        del step[keys[5]]   # frozen
        mean = fa.MeanStep(3.0) if fused else None
        return fa.new_state(FileState(tmp_path / "g"), dict(step), sink, mean)

    pieces: list[tuple[int, int]] = []
    got = make(lambda buf: pieces.append((buf.data_ptr(), buf.numel() * buf.element_size())))
    want = make(None)
    for k in g:
        assert torch.equal(got[k], want[k]), k
    # at most a piece and what was left before it (a frozen tensor, the end of a run)
    assert len(pieces) > 24 and max(n for _, n in pieces) < 4 * (2 * 1024 + max(v.numel() for v in g.values()))
    joined = [list(pieces[0])]
    for at, n in pieces[1:]:
        if joined[-1][0] + joined[-1][1] == at:
            joined[-1][1] += n
        else:
            joined.append([at, n])
    spans = sorted((t.data_ptr(), t.numel() * 4) for t in got.values())
    assert sum(n for _, n in joined) == sum(n for _, n in spans) == sum(v.numel() * 4 for v in g.values())
    assert all(any(a <= at and at + n <= a + m for a, m in joined) for at, n in spans)


@pytest.mark.parametrize("story", ["stored", "not stored", "another file", "a close between", "a copy stored"])
def test_a_close_adds_to_the_kept_buffers_without_reading_the_global_only_when_they_hold_its_file(
        tmp_path, monkeypatch, story):
    """Once the engine has stored the state a close made as the file that is the next global
    (Strategy.stored), the next close adds its step to the kept buffers as they are, without
    reading that file. In every other case (nothing stored, another global, the buffers written
    by a close since, a state stored that is not the buffers) it reads the global; the states
    are the same either way."""
    reads: list[Path] = []
    real = FileState.read_into
    monkeypatch.setattr(FileState, "read_into", lambda self, out: (reads.append(self.path), real(self, out))[1])
    g0 = initial_state(LAYOUT, 0)
    write_safetensors(tmp_path / "g0", g0)
    s = FedAvg()
    s.setup(ctx())

    def close(rnd: int, glob_path: Path, glob: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s.begin_round(rnd, FileState(glob_path))
        for i, n in enumerate((3, 5)):
            s.accumulate(ClientUpdate(f"s{i}", rnd, n, delta(10 * rnd + i)))
        state = s.finalize().state
        for k, v in glob.items():
            mean = (3 * delta(10 * rnd)[k].double() + 5 * delta(10 * rnd + 1)[k].double()) / 8
            assert torch.equal(state[k], (v.double() + mean).float()), (story, rnd, k)
        return state

    state = close(1, tmp_path / "g0", g0)
    g1 = {k: v.clone() for k, v in state.items()}
    write_safetensors(tmp_path / "g1", g1)
    if story == "a copy stored":
        s.stored(g1, tmp_path / "g1")
    elif story != "not stored":
        s.stored(state, tmp_path / "g1")
    del state
    glob_path, glob = tmp_path / "g1", g1
    if story == "another file":
        write_safetensors(tmp_path / "g1b", g1)
        glob_path = tmp_path / "g1b"
    if story == "a close between":   # (its round failed after finalize: the global stays g1)
        close(2, glob_path, g1)
    reads.clear()
    close(3, glob_path, glob)
    assert (reads == []) == (story == "stored"), reads


def test_kept_buffers_of_other_sizes_or_dtype_are_made_anew():
    from fedserver.strategy.fedavg import KeptBuffers

    kept = KeptBuffers()
    a = kept.take([10, 20], torch.float32)
    assert a is not None and [t.numel() for t in a] == [10, 20]
    where = [t.data_ptr() for t in a]
    assert kept.take([10, 20], torch.float32) is None   # `a` is alive
    del a
    b = kept.take([10, 20], torch.float32)
    assert b is not None and [t.data_ptr() for t in b] == where
    del b
    c = kept.take([10, 21], torch.float64)
    assert c is not None and [(t.numel(), t.dtype) for t in c] == [(10, torch.float64), (21, torch.float64)]


def test_a_subclass_with_its_own_mean_is_not_bypassed_by_the_one_pass_close():
    """MeanStep stands in for FedAvg's own mean_delta() and step() only: a subclass that
    overrides mean_delta gets its own mean in the new state."""
    class HalfMean(FedAvg):
        def mean_delta(self) -> dict[str, torch.Tensor]:
            return {k: v.mul_(0.5) for k, v in super().mean_delta().items()}

    glob = initial_state(LAYOUT, 0)
    out = {}
    for cls in (FedAvg, HalfMean):
        s = cls()
        s.setup(ctx())
        s.begin_round(1, glob)
        s.accumulate(ClientUpdate("a", 1, 2, delta(1)))
        out[cls] = s.finalize().state
    k = "m.0.lora_B.weight"
    assert torch.equal(out[FedAvg][k], (glob[k].double() + delta(1)[k].double()).float())
    assert torch.equal(out[HalfMean][k], (glob[k].double() + delta(1)[k].double() * 0.5).float())


def test_a_half_precision_global_takes_the_separate_passes():
    """numpy rounds float64 to float16 once, torch through float32: MeanStep is not offered
    for such a global, and new_state refuses one."""
    from fedserver.strategy.fedavg import MeanStep, fusable, new_state

    glob = {k: v.half() for k, v in initial_state(LAYOUT, 0).items()}
    assert not fusable(glob) and fusable(initial_state(LAYOUT, 0))
    s = FedAvg()
    s.setup(ctx())
    s.begin_round(1, glob)
    s.accumulate(ClientUpdate("a", 1, 2, delta(1)))
    out = s.finalize()
    for k, v in glob.items():
        want = (v.double() + delta(1)[k].double()).to(torch.float16)
        assert out.state[k].dtype == torch.float16 and torch.equal(out.state[k], want), k
    with pytest.raises(ValueError, match="MeanStep"):
        new_state(glob, {}, None, MeanStep(1.0))


def test_a_global_of_mixed_dtypes_takes_the_separate_passes():
    """new_state adds a mixed global's step tensor by tensor, as it is: MeanStep is not offered
    for it, so the sums are divided first (they once reached the new state undivided)."""
    from fedserver.strategy.fedavg import MeanStep, fusable, new_state

    glob = initial_state(LAYOUT, 0)
    first = sorted(glob)[0]
    glob[first] = glob[first].double()
    assert not fusable(glob)
    s = FedAvg()
    s.setup(ctx())
    s.begin_round(1, glob)
    s.accumulate(ClientUpdate("a", 1, 3, delta(1)))
    s.accumulate(ClientUpdate("b", 1, 5, delta(2)))
    out = s.finalize().state
    for k, v in glob.items():
        mean = (3 * delta(1)[k].double() + 5 * delta(2)[k].double()) / 8
        assert out[k].dtype == v.dtype and torch.allclose(out[k].double(), v.double() + mean, atol=1e-6), k
    with pytest.raises(ValueError, match="MeanStep"):
        new_state(glob, {}, None, MeanStep(1.0))


def test_a_file_state_reads_what_was_written_and_names_shapes_without_reading(tmp_path):
    state = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.zeros(0, 4)}
    write_safetensors(tmp_path / "s", state)
    fs = FileState.open(tmp_path / "s")
    assert fs is not None and sorted(fs) == sorted(state) and len(fs) == 3
    for k, v in state.items():
        got = fs[k]
        assert torch.equal(got, v) and got.dtype == v.dtype and got.shape == v.shape
        assert not v.numel() or got.data_ptr() != fs[k].data_ptr()   # every access is a new tensor
        meta = fs.meta()[k]
        assert meta.device.type == "meta" and meta.shape == v.shape and meta.dtype == v.dtype
    # not a safetensors file of the dtypes read here: None, and the caller keeps its tensors
    (tmp_path / "junk").write_bytes(b"\xff" * 64)
    assert FileState.open(tmp_path / "junk") is None
    write_safetensors(tmp_path / "ints", {"i": torch.arange(4)})
    assert FileState.open(tmp_path / "ints") is None
    assert FileState.open(tmp_path / "missing") is None


def test_a_file_state_whose_file_changes_is_checked_again_before_it_is_read(tmp_path):
    good = {"a": torch.randn(3, 5), "b": torch.randn(4)}
    path = tmp_path / "g"
    write_safetensors(path, good)
    calls = []

    def restore():   # as the engine's recheck does: the damaged file replaced by an intact copy
        calls.append("recheck")
        write_safetensors(path.with_suffix(".tmp"), good)
        path.with_suffix(".tmp").replace(path)

    def rewrite(state):   # in place (same inode and size); its mtime moves on, as a later write's does
        before = path.stat().st_mtime_ns
        write_safetensors(path, state)
        os.utime(path, ns=(before + 10**9, before + 10**9))

    fs = FileState(path, restore)
    rewrite({"a": torch.zeros(3, 5), "b": torch.zeros(4)})   # damaged
    assert torch.equal(fs["a"], good["a"]) and calls == ["recheck"]
    assert torch.equal(fs["b"], good["b"]) and calls == ["recheck"]   # restored: one stat, no second check

    def refuse():
        raise CorruptFileError("artefact is damaged on the coordinator and there is no intact copy")
    fs = FileState(path, refuse)
    rewrite({"a": torch.ones(3, 5), "b": torch.ones(4)})
    with pytest.raises(CorruptFileError, match="no intact copy"):
        fs["a"]
    fs = FileState(path)   # no recheck given: a changed file is an error, never read as if it were the old one
    rewrite(good)
    with pytest.raises(OSError, match="changed on disk"):
        fs["a"]


# ---------------------------------------------------------------- Upload's chunk decoder


def test_chunks_decode_as_views_that_agree_with_protobuf():
    from common.pb import federation_pb2 as pb
    from common.framing import RawChunk, decode_upload_message

    rng = random.Random(0)
    for _ in range(200):
        data = rng.randbytes(rng.choice([0, 1, 127, 128, 300, 70000]))
        msg = pb.UploadMessage(chunk=pb.Chunk(offset=rng.choice([0, 1, 2**40, 2**64 - 1]), data=data,
                                              total_size=rng.choice([0, 5, 2**63])))
        raw = msg.SerializeToString()
        got = decode_upload_message(raw)
        assert isinstance(got, RawChunk)
        assert (got.offset, bytes(got.data), got.total_size) == (msg.chunk.offset, data, msg.chunk.total_size)
    # fields out of order, and unknown ones, are read as protobuf reads them
    inner = pb.Chunk(total_size=9).SerializeToString() + b"\x08\x05" + b"\x12\x03abc" + b"\xa0\x01\x07" + b"\x08\x06"
    raw = b"\x12" + bytes([len(inner)]) + inner
    ref, got = pb.UploadMessage.FromString(raw), decode_upload_message(raw)
    assert (got.offset, bytes(got.data), got.total_size) == (ref.chunk.offset, ref.chunk.data, ref.chunk.total_size) == (6, b"abc", 9)


def test_anything_but_a_plain_chunk_is_left_to_protobuf():
    from google.protobuf.message import DecodeError

    from common.pb import federation_pb2 as pb
    from common.framing import RawChunk, decode_upload_message

    header = pb.UploadMessage(header=pb.UploadHeader(round=3, upload_id="u"))
    assert not isinstance(decode_upload_message(header.SerializeToString()), RawChunk)
    assert decode_upload_message(header.SerializeToString()).header.round == 3
    raw = pb.UploadMessage(chunk=pb.Chunk(offset=1, data=b"xy")).SerializeToString()
    for bad in (raw[:-1], raw + b"\x12", b"\x12\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x12\x02\x0a\x05"):
        try:
            got = decode_upload_message(bad)
        except DecodeError:
            continue
        assert not isinstance(got, RawChunk) or bytes(got.data) in (b"xy",)   # what protobuf would read too
    rng = random.Random(1)
    for _ in range(2000):   # random bytes: never an exception other than protobuf's own
        blob = b"\x12" + rng.randbytes(rng.randint(0, 12))
        try:
            got = decode_upload_message(blob)
        except DecodeError:
            continue
        if isinstance(got, RawChunk):
            ref = pb.UploadMessage.FromString(blob)
            assert (got.offset, bytes(got.data), got.total_size) == (ref.chunk.offset, ref.chunk.data, ref.chunk.total_size)


def test_a_school_frames_and_decodes_chunks_byte_for_byte_as_protobuf():
    """The school's side (common/framing.py): upload chunks framed by hand are protobuf's own
    bytes; download chunks decode as views that agree with protobuf, odd ones by protobuf."""
    from google.protobuf.message import DecodeError

    from common.framing import RawChunk, decode_chunk, frame_upload_chunk
    from common.pb import federation_pb2 as pb

    rng = random.Random(2)
    for _ in range(300):
        data = rng.randbytes(rng.choice([0, 1, 127, 128, 300, 70000]))
        offset, total = rng.choice([0, 1, 2**40, 2**64 - 1]), rng.choice([0, 5, 2**63])
        msg = pb.UploadMessage()
        msg.chunk.SetInParent()
        msg.chunk.offset, msg.chunk.data, msg.chunk.total_size = offset, data, total
        assert frame_upload_chunk(offset, memoryview(data), total) == msg.SerializeToString()
        raw = pb.Chunk(offset=offset, data=data, total_size=total).SerializeToString()
        got = decode_chunk(raw)
        assert isinstance(got, RawChunk) and (got.offset, bytes(got.data), got.total_size) == (offset, data, total)
    for _ in range(2000):   # random bytes: a view only where protobuf reads the same chunk
        blob = rng.randbytes(rng.randint(0, 12))
        try:
            got = decode_chunk(blob)
        except DecodeError:
            continue
        ref = pb.Chunk.FromString(blob)
        assert (got.offset, bytes(got.data), got.total_size) == (ref.offset, ref.data, ref.total_size)


def test_a_file_delta_loads_whole_for_rules_that_hold_updates(tmp_path):
    d = delta(7)
    payload = tensors_to_bytes(d)
    (tmp_path / "u").write_bytes(payload)
    whole = FileDelta(feed(payload).result(tmp_path / "u"), LAYOUT).load()
    assert whole.keys() == d.keys() and all(torch.equal(whole[k], v) for k, v in d.items())
    (tmp_path / "u").write_bytes(payload[:-8])   # changed on disk since it was accepted
    with pytest.raises(OSError, match="changed on disk"):
        FileDelta(feed(payload).result(tmp_path / "u"), LAYOUT).load()
