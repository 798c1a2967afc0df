"""benchmarks/round_bench.py and its no-op school: the school's protocol path imports no torch,
and the benchmark runs end to end on a tiny layout (K=2, 2 rounds) against a real coordinator
process. No timing thresholds: the numbers only have to be there and be sane."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

NO_TORCH = """
import sys
for name in ("torch", "safetensors.torch", "transformers", "peft"):
    sys.modules[name] = None   # `import torch` now raises ImportError

import json, struct
import numpy as np

from benchmarks.noop_school import NoopSchool, add_constant, channel_options
from common.messages import ArtifactRef, TrainCommand, TrainParams, UploadHeader
from common.serde import command_from_pb, command_to_pb, header_from_pb, header_to_pb
from common.wire import iter_chunks, sha256_hex
from fedclient.transfer import download, upload

# the wire dataclasses and their protobuf converters work without torch
cmd = TrainCommand(3, 0.0, ArtifactRef("ab" * 32, 10), TrainParams(local_steps=2, freeze=("lora_A",)))
assert command_from_pb(command_to_pb(cmd)) == cmd
h = UploadHeader(3, "r3-x", 5, "cd" * 32, 10, 0, "ab" * 32, {"loss": 1.0})
assert header_from_pb(header_to_pb(h)) == h
assert [len(c) for _, c in iter_chunks(b"x" * 10, 0, 4)] == [4, 4, 2]

# a safetensors payload written by hand: the school adds its constant to every element
a = np.arange(6, dtype="<f4").reshape(2, 3)
b = np.full((4,), -1.5, dtype="<f4")
head = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]}}
hj = json.dumps(head).encode()
hj += b" " * (-len(hj) % 8)
data = struct.pack("<Q", len(hj)) + hj + a.tobytes() + b.tobytes()
out = add_constant(data, 0.25)
assert len(out) == len(data) and out[: 8 + len(hj)] == data[: 8 + len(hj)]
vals = np.frombuffer(out, dtype="<f4", offset=8 + len(hj))
assert np.array_equal(vals, np.concatenate([a.ravel(), b]) + np.float32(0.25))
assert sha256_hex(out) != sha256_hex(data)
NoopSchool("127.0.0.1:1", "token", name="s")   # constructible
assert ("grpc.use_local_subchannel_pool", 1) in channel_options()

loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft") and sys.modules[m] is not None)
assert not loaded, loaded
print("ok")
"""


def test_noop_school_needs_no_torch() -> None:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"


def test_round_bench_quick(tmp_path: Path) -> None:
    """The whole benchmark: a real `fedserver serve` process, 2 no-op schools in a process of
    their own (torch unimportable there), the plain-gRPC server and client, 2 measured rounds."""
    out = tmp_path / "round.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.round_bench", "--quick", "--json", str(out),
                           "--workdir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for key in ("date", "command", "machine", "parameters", "payload", "definitions"):
        assert key in result
    assert result["parameters"]["ks"] == [2] and result["parameters"]["quick"] is True
    assert "--quick" in result["command"]
    r = result["2"]
    for key in ("project_s", "raw_s", "ratio", "close_s", "coordinator_round_s", "overhead_s"):
        assert isinstance(r[key], float) and math.isfinite(r[key]), key
    assert r["project_s"] > 0 and r["raw_s"] > 0 and r["ratio"] > 0 and r["close_s"] > 0
    assert r["coordinator_round_s"] > 0
    assert len(r["project_rounds"]) == 2 and len(r["raw_rounds"]) == 2 and r["measured_rounds"] == [2, 3]
    assert all(x["wall_s"] > 0 and not x["final"] and x["resent"] == 0 for x in r["project_rounds"])
    assert set(r["cpu_s_per_round"]) >= {"coordinator", "schools", "raw_server", "raw_client"}
    assert all(v >= 0 for v in r["cpu_s_per_round"].values()) and r["cpu_s_per_round"]["coordinator"] > 0
    assert set(r["peak_rss_mib"]) == {"coordinator", "schools", "raw_server", "raw_client"}
    assert all(v > 0 for v in r["peak_rss_mib"].values())
    # the tiny layout: r=16 on the seven projections of 2 layers (hidden 64, intermediate 128, k/v 32)
    assert r["tensors"] == 28 and r["parameters"] == 2 * 16 * (128 + 96 + 96 + 128 + 3 * 192)
    assert r["download_bytes"] == r["upload_bytes"] > r["parameters"] * 4
    # every round committed with both schools' uploads; the coordinator exited by itself
    assert r["rounds_total"] == 4 and all(c["accepted"] == 2 for c in r["coordinator_rounds"])
    assert all(c["bytes_up"] == 2 * r["upload_bytes"] for c in r["coordinator_rounds"])
    assert r["exit_codes"] == {"coordinator": 0, "schools": 0}
    assert r["other_commands"] == {}   # no evaluate, idle or non-final shutdown commands
    f = r["floor"]   # the parts no round can skip, timed alone in their own process
    assert set(f["parts"]) == {"school_hash", "receive_work", "fold"}
    assert all(part["cpu_s"] > 0 and part["wall_s"] > 0 for part in f["parts"].values())
    assert f["per_school_cpu_s"] > 0 and f["cpu_s_per_round"] > r["cpu_s_per_round"]["raw_total"]
    if r["cpu_s_per_round"]["raw_total"] >= 0.05:   # tiny rounds' CPU may be under /proc's resolution
        assert 1.0 < f["floor"] < f["floor_with_close"]
    else:
        assert f["floor"] is None and f["floor_with_close"] is None
    assert "project s" in proc.stdout and "wrote" in proc.stdout and "floor" in proc.stdout


def test_the_round_floor_adds_k_schools_work_to_the_raw_rounds_cpu() -> None:
    """(raw CPU + K x (2 digests + receive + fold)) / raw CPU, and the close on top."""
    from benchmarks.round_bench import round_floor

    parts = {"school_hash": {"cpu_s": 0.005}, "receive_work": {"cpu_s": 0.015}, "fold": {"cpu_s": 0.010}}
    f = round_floor(parts, 8, 0.75, 0.05)
    assert f["per_school_cpu_s"] == pytest.approx(0.035) and f["cpu_s_per_round"] == pytest.approx(1.03)
    assert f["floor"] == pytest.approx(1.03 / 0.75) and f["floor_with_close"] == pytest.approx(1.08 / 0.75)
    assert round_floor(parts, 8, 0.75, None)["floor_with_close"] == pytest.approx(f["floor"])   # no close measured
    assert round_floor(parts, 8, 0.0, 0.05)["floor"] is None   # no raw CPU measured: no ratio, no division by 0


def test_memory_bench_runs_rounds_and_reports_rss(tmp_path, tiny_model):
    """benchmarks/memory_bench.py on the tiny model: a real coordinator process, 2 no-op schools
    uploading a constant delta (scale 0), 3 rounds; RSS figures present and ordered."""
    from benchmarks import memory_bench

    r = memory_bench.run(rounds=3, schools=2, model=tiny_model, workdir=tmp_path / "mem", quiet=True)
    assert r["rounds"] == 3 and r["schools"] == 2
    assert 0 < r["start_mib"] <= r["peak_mib"] and r["budget_mib"] > r["start_mib"]
    assert len(r["per_decile_mib"]) == 3 and r["adapter_bytes"] > 0
    assert "RSS after start-up" in memory_bench.format_result(r)


def test_noop_school_constant_delta():
    import numpy as np

    from benchmarks.noop_school import add_constant

    head = json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}}).encode()
    head += b" " * (-len(head) % 8)
    data = len(head).to_bytes(8, "little") + head + np.array([1.0, 2.0, 3.0], dtype="<f4").tobytes()
    out = add_constant(data, 0.5, scale=0.0)
    assert np.frombuffer(out, dtype="<f4", offset=8 + len(head)).tolist() == [0.5, 0.5, 0.5]
    assert np.frombuffer(add_constant(data, 0.5), dtype="<f4", offset=8 + len(head)).tolist() == [1.5, 2.5, 3.5]
