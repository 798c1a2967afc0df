"""Local LoRA training on a school's own questions: answer-only loss, optional FedProx term."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from common.data import Question, answer_text, prompt_text
# Defined with the wire messages (which import no torch) and re-exported here, so
# `from common.training import TrainParams` keeps working everywhere.
from common.messages import TrainParams as TrainParams
# glibc malloc_trim (common/memory.py), re-exported: the daemon and the teacher call it after every round.
from common.memory import release_memory as release_memory


@dataclass(frozen=True)
class TrainResult:
    steps: int
    examples: int       # examples consumed (with repetition)
    tokens: int         # answer tokens that carried loss
    mean_loss: float
    final_loss: float
    seconds: float


def encode(tok: Any, q: Question, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels: loss only on the answer (and the end-of-turn token)."""
    return encode_pair(tok, prompt_text(q), answer_text(q, q.answer_index), max_len)


def encode_pair(tok: Any, prompt_str: str, answer_str: str, max_len: int) -> tuple[list[int], list[int]]:
    """`encode` for any prompt and continuation (a teacher's generated answer, say)."""
    prompt = tok(prompt_str, add_special_tokens=False).input_ids
    answer = tok(answer_str, add_special_tokens=False).input_ids + [tok.eos_token_id]
    return fit_pair(prompt, answer, max_len)


def fit_pair(prompt: list[int], answer: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of a prompt and its answer in at most `max_len` tokens: the answer
    kept from its start, the prompt from its end; loss only on the answer."""
    answer = answer[:max_len]
    prompt = prompt[-(max_len - len(answer)) :] if max_len > len(answer) else []
    return prompt + answer, [-100] * len(prompt) + answer


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padding: every row's answer ends at the last column, so the logits that carry loss
    are the last few columns and the vocabulary projection can skip the prompts. Positions
    count real tokens only, so a padded row sees the same positions as an unpadded one."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, width - len(x):] = torch.tensor(x)
        labels[i, width - len(y):] = torch.tensor(y)
        mask[i, width - len(x):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": positions}


def micro_batches(rows: Sequence[tuple[list[int], list[int]]], max_tokens: int) -> list[list[tuple[list[int], list[int]]]]:
    """Split a batch, in order, into groups whose padded size (rows × longest row) stays within
    `max_tokens` (0 = one group). A row longer than the budget is a group of its own."""
    groups: list[list[tuple[list[int], list[int]]]] = []
    width = 0
    for row in rows:
        w = max(width, len(row[0]))
        if groups and (max_tokens <= 0 or (len(groups[-1]) + 1) * w <= max_tokens):
            groups[-1].append(row)
            width = w
        else:
            groups.append([row])
            width = len(row[0])
    return groups


def targets(inputs: dict[str, torch.Tensor]) -> int:
    """Answer tokens that carry loss (a label in column 0 has no logit before it)."""
    return int((inputs["labels"][:, 1:] != -100).sum())


def answer_loss_sum(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy over the answer tokens of a left-padded batch. Only the last k
    positions (k = longest answer + 1) go through the vocabulary projection: for SmolLM2
    that is the largest activation of the step (49,152 logits a position)."""
    labels = inputs["labels"]
    width = labels.shape[1]
    k = min(width, int((labels != -100).sum(1).max()) + 1)
    args = {n: inputs[n] for n in ("input_ids", "attention_mask", "position_ids")}
    try:
        logits = model(**args, logits_to_keep=k, use_cache=False).logits
    except TypeError:   # an architecture without logits_to_keep: project everything, keep the tail
        logits = model(**args, use_cache=False).logits
    logits = logits[:, -k:][:, :-1].float()            # column j predicts token j + 1
    tgt = labels[:, width - k + 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum")


def enable_checkpointing(model: Any) -> None:
    """Activation checkpointing on a transformers model (before or after PEFT wraps it): each
    decoder layer's activations are recomputed in the backward pass instead of kept. Same
    gradients; less memory, more time (see benchmarks/train_memory.py)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def train_lora(
    model: Any,
    tok: Any,
    questions: Sequence[Question],
    params: TrainParams,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_batch_tokens: int = 0,
) -> TrainResult:
    """Run `params.local_steps` AdamW steps on the trainable (LoRA) parameters of `model`.
    Each step's batch is split into micro-batches of at most `max_batch_tokens` padded tokens
    (0 = no split) whose gradients add up to the whole batch's: the result does not depend on
    it, the peak memory does (activations grow with the tokens in flight).
    Blocking and CPU-heavy: callers on an event loop run it in a worker thread."""
    if not questions:
        raise ValueError("no training questions: the school's data folder is empty")
    if params.local_steps < 1 or params.batch_size < 1:
        raise ValueError("local_steps and batch_size must be >= 1")
    if max_batch_tokens < 0:
        raise ValueError("max_batch_tokens must be >= 0 (0 = no micro-batches)")
    with frozen(model, params.freeze):
        return _train(model, tok, questions, params, progress, should_stop, max_batch_tokens)


@contextlib.contextmanager
def frozen(model: Any, patterns: Sequence[str]) -> Iterator[None]:
    """Trainable parameters whose name contains one of `patterns` stay fixed inside the block
    (FFA-LoRA: A stays at the shared init for this run)."""
    held = [p for n, p in model.named_parameters() if p.requires_grad and any(f in n for f in patterns)]
    for p in held:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in held:
            p.requires_grad_(True)


def _train(model: Any, tok: Any, questions: Sequence[Question], params: TrainParams,
           progress: Callable[[int, int, float], None] | None, should_stop: Callable[[], bool] | None,
           max_batch_tokens: int) -> TrainResult:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no trainable parameters; wrap it with common.lora.wrap first "
                         f"(or TrainParams.freeze={params.freeze!r} froze all of them)")
    anchor = [p.detach().clone() for p in trainable] if params.proximal_mu > 0 else None
    opt = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
    order = list(range(len(questions)))
    rng = random.Random(params.seed)
    rng.shuffle(order)
    cursor, losses, tokens, start = 0, [], 0, time.perf_counter()
    model.train()
    for step in range(params.local_steps):
        if should_stop is not None and should_stop():
            break
        batch = []
        for _ in range(params.batch_size):
            if cursor == len(order):
                rng.shuffle(order)
                cursor = 0
            batch.append(encode(tok, questions[order[cursor]], params.max_seq_len))
            cursor += 1
        groups = [collate(g, tok.pad_token_id) for g in micro_batches(batch, max_batch_tokens)]
        count = sum(targets(g) for g in groups)
        loss = 0.0
        for inputs in groups:   # gradient accumulation: Σ_g (summed CE of g) / (targets in the batch)
            part = answer_loss_sum(model, inputs) / count
            if not torch.isfinite(part):
                opt.zero_grad(set_to_none=True)
                raise FloatingPointError(f"training loss became {float(part)} at step {step}; lower the learning rate")
            part.backward()
            loss += float(part.detach())
        if anchor is not None:
            prox = 0.5 * params.proximal_mu * sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor))
            prox.backward()
            loss += float(prox.detach())
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
        tokens += count
        if progress is not None:
            progress(step + 1, params.local_steps, losses[-1])
    model.eval()
    return TrainResult(
        steps=len(losses), examples=len(losses) * params.batch_size, tokens=tokens,
        mean_loss=sum(losses) / max(1, len(losses)), final_loss=losses[-1] if losses else float("nan"),
        seconds=time.perf_counter() - start,
    )
