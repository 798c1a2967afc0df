"""Self-reported numbers are taken only within bounds: an update's example count and metrics,
and evaluation reports (only for a round the school was asked to evaluate, once, with at most
the questions asked for, and an accuracy in [0, 1]). Over real gRPC, state left intact."""

from __future__ import annotations

import asyncio
import math

import grpc
import pytest

from common.messages import EvalReport
from common.pb import federation_pb2 as pb
from common.serde import header_to_pb
from common.wire import tensors_to_bytes
from fedserver.validation import MAX_REPORTED_EXAMPLES, eval_report_problem, header_numbers_problem
from tests.test_rpc_errors import expect_status, good_delta, header_for, open_round, snapshot  # noqa: F401 (fixture)


def test_bounds():
    assert header_numbers_problem(10, {"loss": 1.0}) is None
    assert "num_examples" in header_numbers_problem(2 ** 62, {})
    assert "num_examples" in header_numbers_problem(-1, {})
    assert "at most" in header_numbers_problem(1, {f"m{i}": 1.0 for i in range(60_000)})
    assert "finite" in header_numbers_problem(1, {"loss": math.inf})
    assert "metric name" in header_numbers_problem(1, {"../../etc": 1.0})
    assert eval_report_problem(16, {"accuracy": 0.5, "loss": 1.2}, 16) is None
    assert eval_report_problem(0, {}, 16) is None   # nothing held out at this school
    assert "at most 16" in eval_report_problem(10 ** 12, {"accuracy": 1.0}, 16)
    assert "accuracy" in eval_report_problem(8, {"loss": 1.0}, 16)
    assert "accuracy" in eval_report_problem(8, {"accuracy": 3.0}, 16)
    assert "loss" in eval_report_problem(8, {"accuracy": 0.5, "loss": -1.0}, 16)


@pytest.mark.parametrize("fields, text", [
    (dict(num_examples=MAX_REPORTED_EXAMPLES + 1), "num_examples"),
    (dict(metrics={f"m{i}": 1.0 for i in range(100)}), "metrics"),
    (dict(metrics={"loss": math.nan}), "finite"),
])
async def test_upload_headers_with_untrusted_numbers_are_refused(open_round, fields, text):
    rc, stub, sessions = open_round
    payload = tensors_to_bytes(good_delta(rc))
    before = snapshot(rc)
    h = header_for(rc, payload, **fields)
    await expect_status(stub.UploadStatus(pb.UploadStatusRequest(upload_id=h.upload_id, header=header_to_pb(h)),
                                          metadata=sessions["school-1"]), grpc.StatusCode.INVALID_ARGUMENT, text)
    assert snapshot(rc) == before


async def test_evaluation_reports_are_taken_only_when_asked(open_round):
    rc, _, _ = open_round
    eng = rc.engine
    n = rc.cfg.evaluation.school_max_examples
    await eng.report_eval("school-1", EvalReport(1, 8, {"accuracy": 1.0, "loss": 0.1}))   # round 1 was never asked
    assert eng.store.evals(1) == []
    eng._evals_due[1] = {"school-1", "school-2"}   # as after round 1's commit
    await eng.report_eval("school-1", EvalReport(1, 10 ** 12, {"accuracy": 1.0}))   # more questions than asked
    await eng.report_eval("school-2", EvalReport(1, n, {"loss": 0.5}))              # no accuracy
    assert eng.store.evals(1) == []
    assert eng._evals_due[1] == set()   # both answered (refused): the final shutdown does not wait for them
    eng._evals_due[1] = {"school-1"}
    await eng.report_eval("school-1", EvalReport(1, n, {"accuracy": 0.5, "loss": 1.0}))
    await eng.report_eval("school-1", EvalReport(1, n, {"accuracy": 1.0, "loss": 0.0}))   # a replay
    await asyncio.sleep(0)
    rows = eng.store.evals(1)
    assert [(r["source"], r["metrics"]["accuracy"]) for r in rows] == [("school-1", 0.5)]
    refused = eng.metrics.rpc_refused.labels("EvalReport", "INVALID_ARGUMENT")._value.get()
    assert refused == 4
