"""Knowledge distillation over multiple-choice questions, shared by the teacher and the schools.

A model's answer to a question is its distribution over the options: softmax over options of
(mean per-token log-probability of the option's text after the question) / T, each model
with its own tokenizer. That makes teacher and student comparable across vocabularies,
exactly and cheaply (a KL over 2-5 values). The same functions label a pool slice, score a
school's answers and give the differentiable loss a student or the teacher trains on.

Wire forms (both content-addressed, both allow-listed):
- a pack (JSON): public pool questions, and for a labelled pack the teacher's distributions;
- an answer set (safetensors): exactly one float32 tensor `probs` [questions, max options],
  one row per pack question in pack order, zero past a question's last option, rows summing
  to one, no metadata. Only numbers: no field can carry a student's text.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common.data import Question, answer_text, prompt_text
from common.errors import ValidationError
from common.evaluation import option_logprobs
from common.training import TrainParams, answer_loss_sum, collate, encode, frozen, micro_batches
from common.wire import bytes_to_tensors, tensors_to_bytes

ANSWERS_TENSOR = "probs"
SUM_TOLERANCE = 1e-3


# ---------------------------------------------------------------- packs


@dataclass(frozen=True)
class Pack:
    """A slice of the public prompt pool; `probs` (teacher labels) only in a labelled pack."""

    questions: tuple[Question, ...]
    probs: tuple[tuple[float, ...], ...] = ()
    teacher: str = ""
    temperature: float = 1.0

    @property
    def kind(self) -> str:
        return "labelled-pack" if self.probs else "pool-pack"

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"kind": self.kind, "questions": [q.to_json() for q in self.questions]}
        if self.probs:
            body.update(probs=[list(p) for p in self.probs], teacher=self.teacher, temperature=self.temperature)
        return json.dumps(body, sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Pack:
        try:
            body = json.loads(data)
            questions = tuple(Question.from_json(q) for q in body["questions"])
            probs = tuple(tuple(float(x) for x in row) for row in body.get("probs", ()))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValidationError(f"not a prompt pack: {exc}") from exc
        if probs and len(probs) != len(questions):
            raise ValidationError(f"pack has {len(questions)} questions but {len(probs)} label rows")
        return cls(questions, probs, str(body.get("teacher", "")), float(body.get("temperature", 1.0)))


def pool_slice(pool: Sequence[Question], size: int, index: int, seed: int = 0) -> list[Question]:
    """The `index`-th slice of `size` questions from a seeded permutation of the pool; slices
    cycle through the whole pool before any question repeats."""
    if not pool:
        raise ValueError("the prompt pool is empty; set [distill] pool_file (fedserver prepare-data --pool N writes one)")
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    start = (index * size) % len(pool)
    picked = [(start + i) % len(pool) for i in range(min(size, len(pool)))]
    return [pool[order[i]] for i in picked]


# ---------------------------------------------------------------- option scores


def option_scores(model: Any, tok: Any, questions: Sequence[Question], chunk: int = 8) -> torch.Tensor:
    """[questions, max options] mean per-token log-probability of each option (-inf past a
    question's last option), `chunk` questions per forward. The evaluation's scorer: each
    prompt runs once and its KV cache is fanned out to its options (measured on SmolLM2 with
    gradients: 1.8x faster than one full row per option, the same gradients). Differentiable;
    call under torch.no_grad() to label."""
    width = max(len(q.choices) for q in questions)
    rows = []
    for start in range(0, len(questions), chunk):
        for options in option_logprobs(model, tok, questions[start:start + chunk]):
            pad = [torch.tensor(float("-inf"))] * (width - len(options))
            rows.append(torch.stack([o.mean() for o in options] + pad))
    return torch.stack(rows)


def distributions(scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Softmax over the options (rows of `option_scores`) at a temperature."""
    if temperature <= 0:
        raise ValueError("temperature must be > 0")
    return (scores / temperature).softmax(-1)


def kd_loss(student_scores: torch.Tensor, teacher_probs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over questions of KL(teacher ‖ student) over the options (forward KL: the student
    covers every option the teacher gives weight to)."""
    logq = (student_scores / temperature).log_softmax(-1)
    valid = teacher_probs > 0
    terms = torch.where(valid, teacher_probs * (teacher_probs.clamp(min=1e-12).log() - logq), torch.zeros_like(logq))
    return terms.sum(-1).mean()


@torch.no_grad()
def label(model: Any, tok: Any, questions: Sequence[Question], temperature: float = 1.0,
          batch_questions: int = 8, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """A model's option distributions for `questions`: [n, max options], zero-padded."""
    was_training = model.training
    model.eval()
    width = max(len(q.choices) for q in questions)
    out = torch.zeros((len(questions), width))
    for start in range(0, len(questions), batch_questions):
        chunk = questions[start:start + batch_questions]
        # The evaluation's scorer, so a label ranks options exactly as `evaluate_choices` does.
        p = distributions(option_scores(model, tok, chunk, len(chunk)), temperature).nan_to_num(0.0)
        out[start:start + len(chunk), : p.shape[1]] = p
        if progress is not None:
            progress(min(start + batch_questions, len(questions)), len(questions))
    if was_training:
        model.train()
    return out


# ---------------------------------------------------------------- training on distributions


@dataclass(frozen=True)
class DistillResult:
    steps: int
    kd_loss: float          # mean over steps of the KD term
    ce_loss: float          # mean over steps of the own-data term (nan if kd_weight = 1)
    seconds: float

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.kd_loss, "kd_loss": self.kd_loss, "steps": float(self.steps), "seconds": self.seconds}
        if not math.isnan(self.ce_loss):
            out["ce_loss"] = self.ce_loss
        return out


def train_distill(model: Any, tok: Any, questions: Sequence[Question], targets: torch.Tensor, params: TrainParams,
                  kd_weight: float = 1.0, temperature: float = 1.0, own: Sequence[Question] = (),
                  progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, max_batch_tokens: int = 1024) -> DistillResult:
    """`params.local_steps` AdamW steps on the trainable (LoRA) parameters: each step takes
    `params.batch_size` pool questions (loss: KL to `targets`, weight kd_weight) and, when
    kd_weight < 1, as many of the school's own questions (answer cross-entropy, weight
    1 − kd_weight). Blocking: run it on a worker thread."""
    if not questions or targets.shape[0] != len(questions):
        raise ValueError(f"{len(questions)} questions but {targets.shape[0]} target rows")
    if not 0 <= kd_weight <= 1:
        raise ValueError("kd_weight must be in [0, 1]")
    if kd_weight < 1 and not own:
        raise ValueError("kd_weight < 1 mixes in the school's own questions, but there are none")
    with frozen(model, params.freeze):
        return _train_distill(model, tok, questions, targets, params, kd_weight, temperature, own, progress,
                              should_stop, max_batch_tokens)


def _train_distill(model: Any, tok: Any, questions: Sequence[Question], targets: torch.Tensor, params: TrainParams,
                   kd_weight: float, temperature: float, own: Sequence[Question],
                   progress: Callable[[int, int, float], None] | None, should_stop: Callable[[], bool] | None,
                   max_batch_tokens: int) -> DistillResult:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters; wrap it with LoRA first")
    opt = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
    rng = random.Random(params.seed)
    order = list(range(len(questions)))
    own_order = list(range(len(own)))
    rng.shuffle(order)
    rng.shuffle(own_order)
    kd_losses, ce_losses, start = [], [], time.perf_counter()
    model.train()
    for step in range(params.local_steps):
        if should_stop is not None and should_stop():
            break
        idx = [order[(step * params.batch_size + i) % len(order)] for i in range(params.batch_size)]
        batch = [questions[i] for i in idx]
        scores = option_scores(model, tok, batch)
        kd = kd_loss(scores, targets[idx, : scores.shape[1]], temperature)
        if not torch.isfinite(kd):
            opt.zero_grad(set_to_none=True)
            raise FloatingPointError(f"distillation loss became {float(kd)} at step {step}; lower the learning rate")
        (kd_weight * kd).backward()
        kd_losses.append(float(kd.detach()))
        if kd_weight < 1:
            rows = [encode(tok, own[own_order[(step * params.batch_size + i) % len(own)]], params.max_seq_len)
                    for i in range(params.batch_size)]
            groups = [collate(g, tok.pad_token_id) for g in micro_batches(rows, max_batch_tokens)]
            count = sum(int((g["labels"][:, 1:] != -100).sum()) for g in groups)
            ce = 0.0
            for g in groups:
                part = answer_loss_sum(model, g) / count
                ((1 - kd_weight) * part).backward()
                ce += float(part.detach())
            ce_losses.append(ce)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, params.local_steps, kd_losses[-1])
    model.eval()
    return DistillResult(len(kd_losses), sum(kd_losses) / max(1, len(kd_losses)),
                         sum(ce_losses) / len(ce_losses) if ce_losses else float("nan"), time.perf_counter() - start)


# ---------------------------------------------------------------- answer sets


def answers_to_bytes(probs: torch.Tensor) -> bytes:
    return tensors_to_bytes({ANSWERS_TENSOR: probs.to(torch.float32)})


def validate_answers(payload: bytes, questions: Sequence[Question]) -> torch.Tensor:
    """Parse and check a school's answer set for a pool pack: the allow-listed schema (one
    float32 tensor, no metadata), the pack's shape, finite probabilities in [0, 1], zero past
    each question's options, rows summing to one. Raises ValidationError saying what is wrong."""
    if len(payload) < 8:
        raise ValidationError("answer set is not safetensors (too short)")
    header_len = int.from_bytes(payload[:8], "little")
    if header_len > 4096 or 8 + header_len > len(payload):   # one tensor's header is ~100 bytes
        raise ValidationError(f"answer set header of {header_len} bytes; an answer set holds exactly one tensor {ANSWERS_TENSOR!r}")
    try:
        header = json.loads(payload[8:8 + header_len])
    except ValueError as exc:
        raise ValidationError(f"answer set header is not JSON: {exc}") from exc
    if header.get("__metadata__"):
        raise ValidationError("answer sets carry no metadata (only the probabilities); remove it")
    names = sorted(k for k in header if k != "__metadata__")
    if names != [ANSWERS_TENSOR]:
        raise ValidationError(f"answer set must hold exactly one tensor {ANSWERS_TENSOR!r}, got {names[:5]}")
    probs = bytes_to_tensors(payload)[ANSWERS_TENSOR]
    width = max(len(q.choices) for q in questions)
    if probs.dtype != torch.float32:
        raise ValidationError(f"answer set dtype {probs.dtype}, expected float32")
    if tuple(probs.shape) != (len(questions), width):
        raise ValidationError(f"answer set shape {tuple(probs.shape)}, expected ({len(questions)}, {width}): "
                              "one row per pack question, one column per option")
    if not bool(torch.isfinite(probs).all()):
        raise ValidationError("answer set contains NaN or Inf")
    if bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValidationError("answer set probabilities must lie in [0, 1]")
    for i, q in enumerate(questions):
        if bool((probs[i, len(q.choices):] != 0).any()):
            raise ValidationError(f"row {i} gives weight past question {q.id!r}'s {len(q.choices)} options")
    sums = probs.sum(-1)
    bad = (sums - 1).abs() > SUM_TOLERANCE
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValidationError(f"row {i} sums to {float(sums[i]):.4f}, not 1 (tolerance {SUM_TOLERANCE})")
    return probs
