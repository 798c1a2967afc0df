"""The teacher host: a 4-bit (bitsandbytes nf4) teacher on CPU labels, evaluates and learns;
its training instance gets the same gradients as a fresh model even after the inference
instance ran (bitsandbytes repacks 4-bit weights in place at the first no-grad forward, after
which that instance no longer trains correctly); calls run off the event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from common.data import answer_text, prompt_text, read_jsonl
from fedserver.config import TeacherSection
from fedserver.teacher import LocalTeacher, OpenAITeacher, TeacherHost


def teacher_cfg(model: str, quantization: str = "nf4", **kw) -> TeacherSection:
    return TeacherSection(model=model, quantization=quantization, threads=1, lora_rank=4, lora_alpha=8.0,
                          learn_steps=2, learn_batch=4, **kw)


@pytest.mark.parametrize("trainer", ["separate", "shared"])
def test_nf4_teacher_labels_and_learns_like_a_fresh_instance(tiny_teacher, fed_data, trainer):
    import bitsandbytes as bnb

    qs = read_jsonl(fed_data / "eval" / "eval.jsonl")[:8]
    used = LocalTeacher(teacher_cfg(tiny_teacher, trainer=trainer), None)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in used.infer.modules())   # really 4-bit
    probs = used.label(qs, 1.0)
    assert probs.shape[0] == len(qs) and torch.allclose(probs.sum(-1), torch.ones(len(qs)), atol=1e-5)
    assert used.evaluate(qs).count == len(qs)
    assert used.count_tokens(qs) > 0
    target = torch.zeros_like(probs)
    target[torch.arange(len(qs)), torch.tensor([q.answer_index for q in qs])] = 1.0
    before = used.adapter()
    result = used.learn(qs, target, 1.0, round_=1)     # after inference (on its other instance, or on itself)
    fresh = LocalTeacher(teacher_cfg(tiny_teacher), None)
    fresh.learn(qs, target, 1.0, round_=1)              # a model that never ran inference
    after, reference = used.adapter(), fresh.adapter()
    assert result.steps == 2 and set(after) == set(reference)
    for k in after:
        torch.testing.assert_close(after[k], reference[k])
    assert any(not torch.equal(after[k], before[k]) for k in after)   # it learned something
    # the inference instance now carries the learned adapter, and scores with it exactly as a
    # model that got the adapter before its first forward does (a repacked 4-bit layer under
    # a changed LoRA adapter scored wrongly: the 1.5B teacher's answer loss went 3.2 -> 13)
    after_probs = used.label(qs, 1.0)
    assert not torch.equal(after_probs, probs)
    reference = LocalTeacher(teacher_cfg(tiny_teacher, trainer=trainer), None)
    reference.load_adapter(after)
    torch.testing.assert_close(after_probs, reference.label(qs, 1.0), atol=1e-5, rtol=1e-4)


async def test_teacher_host_keeps_the_event_loop_free(tiny_teacher, fed_data):
    qs = read_jsonl(fed_data / "eval" / "eval.jsonl")[:8]
    host = TeacherHost(teacher_cfg(tiny_teacher, "none"), None)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    try:
        probs = await host.call(lambda b: b.label(qs, 2.0))
    finally:
        t.cancel()
        host.close()
    assert probs.shape[0] == 8 and ticks > 3   # the loop kept running while the model loaded and scored


class _Completions(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible /v1/completions with echo + logprobs, backed by a real
    local model (the teacher's own scorer), to check the client's request and offset logic."""

    teacher: LocalTeacher
    one_prompt_only = False   # as llama-cpp-python's server: a list of several prompts is an HTTP 500
    requests: list[int]       # prompts per request, as received

    def do_POST(self) -> None:   # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append(len(body["prompt"]))
        if self.one_prompt_only and len(body["prompt"]) > 1:
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        tok = self.teacher.tok
        choices = []
        for i, text in enumerate(body["prompt"]):
            ids = tok(text, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = self.teacher.infer(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            if body.get("max_tokens", 16) > 0:   # echo, then the tokens it generates (the client must drop them)
                nxt = int(logp[-1].argmax())
                ids, text = ids + [nxt], text + tok.decode([nxt])
                with torch.no_grad():
                    logp = self.teacher.infer(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
            pieces = [tok.decode([t]) for t in ids]
            offsets, pos = [], 0
            for p in pieces:
                offsets.append(pos)
                pos += len(p)
            lps = [None] + [float(logp[j - 1, ids[j]]) for j in range(1, len(ids))]
            choices.append({"index": i, "text": text, "logprobs": {"tokens": pieces, "token_logprobs": lps,
                                                                     "text_offset": offsets, "top_logprobs": None}})
        data = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.parametrize("one_prompt_only", [False, True], ids=["batched", "one-prompt-a-request"])
def test_openai_backend_scores_continuations_like_the_local_model(tiny_teacher, fed_data, one_prompt_only):
    local = LocalTeacher(teacher_cfg(tiny_teacher, "none"), None)
    requests: list[int] = []
    handler = type("H", (_Completions,), {"teacher": local, "one_prompt_only": one_prompt_only, "requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = dataclasses.replace(teacher_cfg(tiny_teacher, "none"), backend="openai",
                                  url=f"http://127.0.0.1:{server.server_address[1]}/v1", served_model="tiny")
        remote = OpenAITeacher(cfg)
        qs = read_jsonl(fed_data / "eval" / "eval.jsonl")[:3]
        prompts = [prompt_text(q) for q in qs]
        conts = [answer_text(q, 0) for q in qs]
        got = remote.continuation_logprobs(prompts, conts)
        want = local.continuation_logprobs(prompts, conts)
        for g, w in zip(got, want):
            assert len(g) == len(w)
            assert g == pytest.approx(w, abs=1e-4)
        probs = remote.label(qs, 1.0)
        assert torch.allclose(probs.sum(-1), torch.ones(len(qs)))
        # a server that takes one prompt a request gets one a request after its first refusal
        assert requests[0] == 3 and (set(requests[1:]) == {1} if one_prompt_only else all(n > 1 for n in requests))
    finally:
        server.shutdown()
