"""Local LoRA training on a school's own questions: answer-only loss, optional FedProx term."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.data import Question, answer_text, prompt_text


@dataclass(frozen=True)
class TrainParams:
    local_steps: int = 16
    batch_size: int = 8
    learning_rate: float = 3e-4
    max_seq_len: int = 256      # tokens; longer examples are cut from the left of the prompt
    seed: int = 0
    proximal_mu: float = 0.0    # FedProx: (mu/2)·||w - w_global||² over the LoRA tensors
    freeze: tuple[str, ...] = ()    # adapter tensors whose name contains one of these stay fixed (FFA: "lora_A")
    personal: tuple[str, ...] = ()  # tensors the school keeps for itself across rounds (FedSA: "lora_B")
    rank: int = 0                   # LoRA rank this school trains at; 0 = the federation's (HetLoRA)
    compression: str = ""           # JSON CompressionSpec for the upload; "" = dense float32


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
    prompt = tok(prompt_text(q), add_special_tokens=False).input_ids
    answer = tok(answer_text(q, q.answer_index), add_special_tokens=False).input_ids + [tok.eos_token_id]
    answer = answer[:max_len]
    prompt = prompt[-(max_len - len(answer)) :] if max_len > len(answer) else []
    return prompt + answer, [-100] * len(prompt) + answer


def collate(rows: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (x, y) in enumerate(rows):  # right padding: causal attention never sees the pads
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_lora(
    model: Any,
    tok: Any,
    questions: Sequence[Question],
    params: TrainParams,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Run `params.local_steps` AdamW steps on the trainable (LoRA) parameters of `model`.
    Blocking and CPU-heavy: callers on an event loop run it in a worker thread."""
    if not questions:
        raise ValueError("no training questions: the school's data folder is empty")
    if params.local_steps < 1 or params.batch_size < 1:
        raise ValueError("local_steps and batch_size must be >= 1")
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and any(f in n for f in params.freeze)]
    for p in frozen:   # FFA-LoRA: A stays at the shared init for this run
        p.requires_grad_(False)
    try:
        return _train(model, tok, questions, params, progress, should_stop)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _train(model: Any, tok: Any, questions: Sequence[Question], params: TrainParams,
           progress: Callable[[int, int, float], None] | None, should_stop: Callable[[], bool] | None) -> TrainResult:
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
        inputs = collate(batch, tok.pad_token_id)
        loss = model(**inputs).loss
        if anchor is not None:
            prox = sum(((p - a) ** 2).sum() for p, a in zip(trainable, anchor))
            loss = loss + 0.5 * params.proximal_mu * prox
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {float(loss)} at step {step}; lower the learning rate")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        tokens += int((inputs["labels"] != -100).sum())
        if progress is not None:
            progress(step + 1, params.local_steps, losses[-1])
    model.eval()
    return TrainResult(
        steps=len(losses), examples=len(losses) * params.batch_size, tokens=tokens,
        mean_loss=sum(losses) / max(1, len(losses)), final_loss=losses[-1] if losses else float("nan"),
        seconds=time.perf_counter() - start,
    )
