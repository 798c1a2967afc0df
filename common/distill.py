"""Knowledge distillation over multiple-choice questions, shared by the teacher and the schools.

A model's answer to a question is its distribution over the options: softmax over options of
(mean per-token log-probability of the option's text after the question) / T, each model
with its own tokenizer. That makes teacher and student comparable across vocabularies,
exactly and cheaply (a KL over 2-5 values). The same functions label a pool slice, score a
school's answers and give the differentiable loss a student or the teacher trains on.

Open-ended pool prompts (no options) take the sequence-level route: the teacher generates an
answer in its own tokenizer and the pack carries the text, which any student tokenizes its
own way and trains on with cross-entropy (Kim & Rush's sequence-level KD, as in MiniLLM's
setting), so it too works across vocabularies.

Wire forms (both content-addressed, both allow-listed):
- a pack (JSON): public pool questions and open prompts, and for a labelled pack the
  teacher's distributions (multiple choice) and generated answers (open prompts);
- an answer set (safetensors): exactly one float32 tensor `probs` [questions, max options],
  one row per pack question in pack order, zero past a question's last option, rows summing
  to one, no metadata. Only numbers: no field can carry a student's text.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.data import OpenPrompt, Question, normalize_text, open_answer, prompt_text
from common.errors import ValidationError
from common.evaluation import option_logprobs
from common.training import TrainParams, answer_loss_sum, collate, encode, encode_pair, fit_pair, frozen, micro_batches
from common.wire import bytes_to_tensors, tensors_to_bytes

ANSWERS_TENSOR = "probs"
TEXTS_TENSOR = "texts"            # open prompts: the answers' UTF-8 bytes, concatenated
OFFSETS_TENSOR = "text_offsets"   # ... and where each starts (one more than there are prompts)
MAX_ANSWER_CHARS = 400            # a school's answer to an open prompt: one short line
LEAK_NGRAM = 8                    # an answer repeating this many words of the school's own data is withheld
SUM_TOLERANCE = 1e-3
MAX_TEXT_CHARS = 2000   # one generated answer in a labelled pack


# ---------------------------------------------------------------- packs


@dataclass(frozen=True)
class Pack:
    """A slice of the public prompt pool: multiple-choice `questions` and open `prompts`; a
    labelled pack adds the teacher's `probs` (one row per question) and `texts` (its answer
    to each prompt)."""

    questions: tuple[Question, ...]
    probs: tuple[tuple[float, ...], ...] = ()
    teacher: str = ""
    temperature: float = 1.0
    prompts: tuple[OpenPrompt, ...] = ()
    texts: tuple[str, ...] = ()
    # Same vocabulary only: the teacher's generated token ids for each prompt and, per token,
    # its k most likely (token id, log p); `vocab` fingerprints the teacher's tokenizer.
    token_ids: tuple[tuple[int, ...], ...] = ()
    topk: tuple[tuple[tuple[tuple[int, float], ...], ...], ...] = ()
    vocab: str = ""
    max_new_tokens: int = 0   # a pool pack with open prompts: how long the schools' answers may be

    @property
    def kind(self) -> str:
        return "labelled-pack" if self.probs or self.texts else "pool-pack"

    def to_bytes(self) -> bytes:
        body: dict[str, Any] = {"kind": self.kind, "questions": [q.to_json() for q in self.questions]}
        if self.prompts:   # absent otherwise, so a multiple-choice pack keeps its address
            body["prompts"] = [p.to_json() for p in self.prompts]
            if self.max_new_tokens:
                body["max_new_tokens"] = self.max_new_tokens
        if self.kind == "labelled-pack":
            body.update(probs=[list(p) for p in self.probs], teacher=self.teacher, temperature=self.temperature)
            if self.prompts:
                body["texts"] = list(self.texts)
            if self.topk:
                body.update(token_ids=[list(t) for t in self.token_ids], vocab=self.vocab,
                            topk=[[[[i, lp] for i, lp in pos] for pos in seq] for seq in self.topk])
        return json.dumps(body, sort_keys=True, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Pack:
        try:
            body = json.loads(data)
            questions = tuple(Question.from_json(q) for q in body["questions"])
            prompts = tuple(OpenPrompt.from_json(p) for p in body.get("prompts", ()))
            probs = tuple(tuple(float(x) for x in row) for row in body.get("probs", ()))
            texts = body.get("texts", [])
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise ValueError("field 'texts' must be a list of strings")
            token_ids = tuple(tuple(_int_id(i) for i in seq) for seq in body.get("token_ids", ()))
            topk = tuple(tuple(tuple((_int_id(i), float(lp)) for i, lp in pos) for pos in seq)
                         for seq in body.get("topk", ()))
            vocab = str(body.get("vocab", ""))
            max_new = int(body.get("max_new_tokens", 0))
            if not 0 <= max_new <= 512:
                raise ValueError(f"max_new_tokens {max_new} is not in [0, 512]")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValidationError(f"not a prompt pack: {exc}") from exc
        if topk and (len(topk) != len(prompts) or len(token_ids) != len(prompts)
                     or any(len(a) != len(b) for a, b in zip(topk, token_ids)) or not vocab):
            raise ValidationError("pack's top-k log-probabilities do not match its prompts' generated tokens")
        if any(not math.isfinite(lp) or lp > 0 for seq in topk for pos in seq for _, lp in pos):
            raise ValidationError("pack's top-k log-probabilities must be finite and <= 0")
        if probs and len(probs) != len(questions):
            raise ValidationError(f"pack has {len(questions)} questions but {len(probs)} label rows")
        if texts and len(texts) != len(prompts):
            raise ValidationError(f"pack has {len(prompts)} open prompts but {len(texts)} answers")
        if any(len(t) > MAX_TEXT_CHARS for t in texts):
            raise ValidationError(f"a generated answer in the pack is longer than {MAX_TEXT_CHARS} characters")
        return cls(questions, probs, str(body.get("teacher", "")), float(body.get("temperature", 1.0)),
                   prompts, tuple(texts), token_ids, topk, vocab, max_new)

    def open_items(self) -> list[tuple[OpenPrompt, str]]:
        """(prompt, teacher's answer) pairs worth training on (an empty answer teaches nothing)."""
        return [(p, t) for p, t in zip(self.prompts, self.texts) if t.strip()]

    def topk_items(self, vocab: str) -> list[TopkItem]:
        """The teacher's per-token top-k for each prompt, when `vocab` (the student's tokenizer
        fingerprint) is the teacher's; else none (the student learns from the text)."""
        if not self.topk or vocab != self.vocab:
            return []
        return [TopkItem(p, ids, top) for p, ids, top in zip(self.prompts, self.token_ids, self.topk) if ids]


@dataclass(frozen=True)
class TopkItem:
    prompt: OpenPrompt
    token_ids: tuple[int, ...]                            # the teacher's answer, in the shared vocabulary
    topk: tuple[tuple[tuple[int, float], ...], ...]       # per answer token: the teacher's k best (id, log p)


def _int_id(x: Any) -> int:
    if type(x) is not int or x < 0:
        raise ValueError(f"token ids must be non-negative integers, got {x!r}")
    return x


def vocab_fingerprint(tok: Any) -> str:
    """sha256 of a tokenizer's vocabulary (token -> id): equal only when ids mean the same."""
    items = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def cut_first_line(tok: Any, ids: Sequence[int], eos: int | None = None) -> list[int]:
    """The teacher's generated ids up to its answer's first line break (kept whole, so the
    student sees exactly the context the teacher's top-k was computed in)."""
    out: list[int] = []
    for i in ids:
        if i == eos:
            break
        piece = tok.decode([i])
        if "\n" in piece and tok.decode(out).strip():
            break
        out.append(i)
    return out


def pool_slice(pool: Sequence[Any], size: int, index: int, seed: int = 0) -> list[Any]:
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
    seq_kd_loss: float = float("nan")   # mean over steps of the open prompts' term (nan without them)
    topk: bool = False                  # that term was token-level (shared vocabulary), not the text's

    def metrics(self) -> dict[str, float]:
        out = {"loss": self.kd_loss, "kd_loss": self.kd_loss, "steps": float(self.steps), "seconds": self.seconds}
        if not math.isnan(self.ce_loss):
            out["ce_loss"] = self.ce_loss
        if not math.isnan(self.seq_kd_loss):
            out["seq_kd_loss"] = self.seq_kd_loss
            out["topk_kd"] = float(self.topk)
        return out


def train_distill(model: Any, tok: Any, questions: Sequence[Question], targets: torch.Tensor, params: TrainParams,
                  kd_weight: float = 1.0, temperature: float = 1.0, own: Sequence[Question] = (),
                  progress: Callable[[int, int, float], None] | None = None,
                  should_stop: Callable[[], bool] | None = None, max_batch_tokens: int = 1024,
                  open_items: Sequence[tuple[OpenPrompt, str]] = (), topk_items: Sequence[TopkItem] = ()) -> DistillResult:
    """`params.local_steps` AdamW steps on the trainable (LoRA) parameters: each step takes
    `params.batch_size` pool questions (loss: KL to `targets`), as many open prompts with the
    teacher's answers (sequence-level KD: the answer's cross-entropy), their mean weighted
    kd_weight, and, when kd_weight < 1, as many of the school's own questions (answer
    cross-entropy, weight 1 − kd_weight). With `topk_items` (student and teacher share a
    vocabulary) the open prompts' term is token-level instead: cross-entropy of the student's
    next-token distribution against the teacher's renormalised top-k at each of the teacher's
    answer tokens. Blocking: run it on a worker thread."""
    if topk_items:
        open_items = ()   # the same prompts, learned the finer way
    if targets.shape[0] != len(questions) or not (questions or open_items or topk_items):
        raise ValueError(f"{len(questions)} questions, {targets.shape[0]} target rows, {len(open_items)} open prompts: "
                         "need one target row per question and something to learn from")
    if not 0 <= kd_weight <= 1:
        raise ValueError("kd_weight must be in [0, 1]")
    if kd_weight < 1 and not own:
        raise ValueError("kd_weight < 1 mixes in the school's own questions, but there are none")
    with frozen(model, params.freeze):
        return _train_distill(model, tok, questions, targets, params, kd_weight, temperature, own, progress,
                              should_stop, max_batch_tokens, open_items, topk_items)


def _topk_ce(model: Any, tok: Any, items: Sequence[TopkItem], weight: float, max_len: int) -> float:
    """Backward of `weight` · the token-mean cross-entropy of the student against the teacher's
    renormalised top-k at each teacher answer token; returns the mean."""
    # at most max_len - 1 answer tokens: at least one prompt token predicts the first of them
    rows = [fit_pair(tok(prompt_text(it.prompt), add_special_tokens=False).input_ids, list(it.token_ids)[: max_len - 1],
                     max_len) for it in items]
    batch = collate(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"]).logits
    width = logits.shape[1]
    terms = []
    for b, (it, (_, labels)) in enumerate(zip(items, rows)):
        n = sum(1 for y in labels if y != -100)
        logq = logits[b, width - n - 1: width - 1].float().log_softmax(-1)                  # [n, vocab]
        ids = torch.tensor([[i for i, _ in pos] for pos in it.topk[:n]])
        p = torch.tensor([[lp for _, lp in pos] for pos in it.topk[:n]]).softmax(-1)         # renormalised top-k
        terms.append(-(p * logq.gather(1, ids)).sum(-1))
    loss = torch.cat(terms).mean()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"top-k distillation loss became {float(loss)}; lower the learning rate")
    (weight * loss).backward()
    return float(loss.detach())


def _ce(model: Any, tok: Any, rows: list[tuple[list[int], list[int]]], weight: float, max_batch_tokens: int) -> float:
    """Backward of `weight` · the token-mean answer cross-entropy of `rows`; returns the mean."""
    groups = [collate(g, tok.pad_token_id) for g in micro_batches(rows, max_batch_tokens)]
    count = sum(int((g["labels"][:, 1:] != -100).sum()) for g in groups)
    total = 0.0
    for g in groups:
        part = answer_loss_sum(model, g) / count
        if not torch.isfinite(part):
            raise FloatingPointError(f"answer loss became {float(part)}; lower the learning rate")
        (weight * part).backward()
        total += float(part.detach())
    return total


def _train_distill(model: Any, tok: Any, questions: Sequence[Question], targets: torch.Tensor, params: TrainParams,
                   kd_weight: float, temperature: float, own: Sequence[Question],
                   progress: Callable[[int, int, float], None] | None, should_stop: Callable[[], bool] | None,
                   max_batch_tokens: int, open_items: Sequence[tuple[OpenPrompt, str]] = (),
                   topk_items: Sequence[TopkItem] = ()) -> DistillResult:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters; wrap it with LoRA first")
    opt = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
    rng = random.Random(params.seed)
    order = list(range(len(questions)))
    own_order = list(range(len(own)))
    open_order = list(range(len(topk_items) or len(open_items)))
    rng.shuffle(order)
    rng.shuffle(own_order)
    rng.shuffle(open_order)
    parts = int(bool(questions)) + int(bool(open_items or topk_items))   # the KD term is the mean of its parts
    kd_losses, ce_losses, seq_losses, start = [], [], [], time.perf_counter()
    model.train()
    for step in range(params.local_steps):
        if should_stop is not None and should_stop():
            break
        kd_total = 0.0
        try:
            if questions:
                idx = [order[(step * params.batch_size + i) % len(order)] for i in range(params.batch_size)]
                scores = option_scores(model, tok, [questions[i] for i in idx])
                kd = kd_loss(scores, targets[idx, : scores.shape[1]], temperature)
                if not torch.isfinite(kd):
                    raise FloatingPointError(f"distillation loss became {float(kd)} at step {step}; lower the learning rate")
                (kd_weight / parts * kd).backward()
                kd_total += float(kd.detach())
            if topk_items:
                chosen = [topk_items[open_order[(step * params.batch_size + i) % len(topk_items)]]
                          for i in range(params.batch_size)]
                seq = _topk_ce(model, tok, chosen, kd_weight / parts, params.max_seq_len)
                seq_losses.append(seq)
                kd_total += seq
            elif open_items:
                picked = [open_items[open_order[(step * params.batch_size + i) % len(open_items)]]
                          for i in range(params.batch_size)]
                rows = [encode_pair(tok, prompt_text(p), " " + text, params.max_seq_len) for p, text in picked]
                seq = _ce(model, tok, rows, kd_weight / parts, max_batch_tokens)
                seq_losses.append(seq)
                kd_total += seq
            if kd_weight < 1:
                rows = [encode(tok, own[own_order[(step * params.batch_size + i) % len(own)]], params.max_seq_len)
                        for i in range(params.batch_size)]
                ce_losses.append(_ce(model, tok, rows, 1 - kd_weight, max_batch_tokens))
        except FloatingPointError:
            opt.zero_grad(set_to_none=True)
            raise
        kd_losses.append(kd_total / parts)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, params.local_steps, kd_losses[-1])
    model.eval()
    return DistillResult(len(kd_losses), sum(kd_losses) / max(1, len(kd_losses)),
                         sum(ce_losses) / len(ce_losses) if ce_losses else float("nan"), time.perf_counter() - start,
                         sum(seq_losses) / len(seq_losses) if seq_losses else float("nan"), bool(topk_items))


# ---------------------------------------------------------------- answer sets


def answers_to_bytes(probs: torch.Tensor, texts: Sequence[str] | None = None) -> bytes:
    """An answer set: the option distributions and, for a pack with open prompts, one answer
    text each (UTF-8 bytes and their offsets: numbers only on the wire, checked on arrival)."""
    tensors = {ANSWERS_TENSOR: probs.to(torch.float32)}
    if texts is not None:
        encoded = [t.encode() for t in texts]
        offsets = [0]
        for e in encoded:
            offsets.append(offsets[-1] + len(e))
        tensors[TEXTS_TENSOR] = torch.tensor(list(b"".join(encoded)), dtype=torch.uint8)
        tensors[OFFSETS_TENSOR] = torch.tensor(offsets, dtype=torch.int64)
    return tensors_to_bytes(tensors)


def answer_texts(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The answer texts of an answer set's tensors ([] without open prompts)."""
    if TEXTS_TENSOR not in tensors:
        return []
    raw = bytes(tensors[TEXTS_TENSOR].tolist())
    offs = tensors[OFFSETS_TENSOR].tolist()
    return [raw[a:b].decode() for a, b in zip(offs, offs[1:])]


def validate_answers(payload: bytes, questions: Sequence[Question]) -> torch.Tensor:
    """`validate_answer_set` for a pack without open prompts: the probabilities."""
    return validate_answer_set(payload, questions)[0]


def validate_answer_set(payload: bytes, questions: Sequence[Question],
                        prompts: Sequence[OpenPrompt] = ()) -> tuple[torch.Tensor, list[str]]:
    """Parse and check a school's answer set for a pool pack: the allow-listed schema (float32
    `probs`; with open prompts also uint8 `texts` and int64 `text_offsets`; no metadata), the
    pack's shape, finite probabilities in [0, 1], zero past each question's options, rows
    summing to one, one short single-line UTF-8 answer per prompt. Raises ValidationError
    saying what is wrong."""
    if len(payload) < 8:
        raise ValidationError("answer set is not safetensors (too short)")
    header_len = int.from_bytes(payload[:8], "little")
    if header_len > 4096 or 8 + header_len > len(payload):   # three tensors' header is ~300 bytes
        raise ValidationError(f"answer set header of {header_len} bytes; an answer set holds only {ANSWERS_TENSOR!r}"
                              + (f", {TEXTS_TENSOR!r} and {OFFSETS_TENSOR!r}" if prompts else ""))
    try:
        header = json.loads(payload[8:8 + header_len])
    except ValueError as exc:
        raise ValidationError(f"answer set header is not JSON: {exc}") from exc
    if header.get("__metadata__"):
        raise ValidationError("answer sets carry no metadata (only the answers); remove it")
    names = sorted(k for k in header if k != "__metadata__")
    want = sorted([ANSWERS_TENSOR, TEXTS_TENSOR, OFFSETS_TENSOR] if prompts else [ANSWERS_TENSOR])
    if names != want:
        raise ValidationError(f"answer set must hold exactly the tensors {want} for this pack, got {names[:5]}")
    tensors = bytes_to_tensors(payload)
    texts = _check_texts(tensors, prompts) if prompts else []
    probs = tensors[ANSWERS_TENSOR]
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
    return probs, texts


def _check_texts(tensors: dict[str, torch.Tensor], prompts: Sequence[OpenPrompt]) -> list[str]:
    raw, offs = tensors[TEXTS_TENSOR], tensors[OFFSETS_TENSOR]
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValidationError(f"{TEXTS_TENSOR!r} must be a 1-D uint8 tensor (UTF-8 bytes), got {raw.dtype} {tuple(raw.shape)}")
    if offs.dtype != torch.int64 or tuple(offs.shape) != (len(prompts) + 1,):
        raise ValidationError(f"{OFFSETS_TENSOR!r} must be int64 of shape ({len(prompts) + 1},): one answer per open prompt")
    o = offs.tolist()
    if o[0] != 0 or o[-1] != raw.numel() or any(b < a for a, b in zip(o, o[1:])):
        raise ValidationError(f"{OFFSETS_TENSOR!r} must rise from 0 to the length of {TEXTS_TENSOR!r}")
    data = bytes(raw.tolist())
    texts = []
    for i, (a, b) in enumerate(zip(o, o[1:])):
        try:
            text = data[a:b].decode()
        except UnicodeDecodeError as exc:
            raise ValidationError(f"answer {i} is not UTF-8: {exc.reason}") from None
        if len(text) > MAX_ANSWER_CHARS:
            raise ValidationError(f"answer {i} has {len(text)} characters; at most {MAX_ANSWER_CHARS} (one short line)")
        if any(unicodedata.category(c) in _CONTROL for c in text):
            raise ValidationError(f"answer {i} contains control characters; an answer is one line of text")
        texts.append(text)
    return texts


# ---------------------------------------------------------------- open answers from the schools


def generate_answers(model: Any, tok: Any, prompts: Sequence[OpenPrompt], max_new_tokens: int) -> list[str]:
    """Greedy answers of a (student) model to open prompts, first line each, batched with left
    padding."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok([prompt_text(p) for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        new = out[:, enc.input_ids.shape[1]:]
        return [_one_line(tok.decode(row, skip_special_tokens=True)) for row in new]
    finally:
        tok.padding_side = side
        if was_training:
            model.train()


def _one_line(text: str) -> str:
    """A generated answer as the answer-set check wants it: its first line, control
    characters (tabs, zero-width marks) made spaces, at most MAX_ANSWER_CHARS."""
    line = open_answer(text, 10 * MAX_ANSWER_CHARS)
    clean = "".join(" " if unicodedata.category(c) in _CONTROL else c for c in line)
    return " ".join(clean.split())[:MAX_ANSWER_CHARS]


_CONTROL = ("Cc", "Cf", "Cs", "Co")


def _words(text: str) -> list[str]:
    return normalize_text(text).split()


def _ngrams(words: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def own_ngrams(own: Sequence[Question], n: int = LEAK_NGRAM) -> frozenset[tuple[str, ...]]:
    """Every run of `n` consecutive words in a school's own questions and options (built once
    per school; `leaks_own_data` checks answers against it)."""
    grams: set[tuple[str, ...]] = set()
    for q in own:
        for part in (q.question, *q.choices):
            grams |= _ngrams(_words(part), n)
    return frozenset(grams)


def leaks_own_data(text: str, own: frozenset[tuple[str, ...]]) -> bool:
    """True when `text` repeats a run of words of the school's own data (`own_ngrams`): such an
    answer is not sent (a model can recite what it trained on)."""
    n = len(next(iter(own))) if own else LEAK_NGRAM
    return not own.isdisjoint(_ngrams(_words(text), n))


def vote_texts(answers: Sequence[Sequence[str]], prompts: int) -> list[str]:
    """Per prompt, the answer (compared case-, punctuation- and space-insensitively) that more
    than half of the schools gave; "" where there is no such majority. The text analogue of a
    robust ensemble: one poisoned school cannot put words in the teacher's mouth."""
    out = []
    for i in range(prompts):
        given = [a[i] for a in answers if i < len(a) and a[i].strip()]
        counts: dict[str, list[str]] = {}
        for t in given:
            counts.setdefault(normalize_text(t), []).append(t)
        best = max(counts.values(), key=len, default=[])
        out.append(best[0] if len(best) * 2 > len(answers) else "")
    return out
