"""Multiple-choice evaluation by answer likelihood (cloze scoring), shared by every party."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from common.data import Question, answer_text, prompt_text


@dataclass(frozen=True)
class EvalResult:
    accuracy: float   # share of questions whose right option has the highest mean token log-prob
    loss: float       # mean negative log-likelihood per token of the right answer (nats)
    count: int

    def metrics(self) -> dict[str, float]:
        return {"accuracy": self.accuracy, "loss": self.loss, "count": float(self.count)}


@torch.no_grad()
def evaluate_choices(
    model: Any,
    tok: Any,
    questions: Sequence[Question],
    questions_per_batch: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Score every option's text after the question. Length-normalised (mean per token)
    scoring, because a 135M model prefers short options otherwise."""
    if not questions:
        raise ValueError("no evaluation questions")
    was_training = model.training
    model.eval()
    correct, nll, ntok = 0, 0.0, 0
    for start in range(0, len(questions), questions_per_batch):
        chunk = questions[start : start + questions_per_batch]
        rows: list[tuple[list[int], int]] = []  # (ids, number of answer tokens)
        for q in chunk:
            prompt = tok(prompt_text(q), add_special_tokens=False).input_ids
            for i in range(len(q.choices)):
                ans = tok(answer_text(q, i), add_special_tokens=False).input_ids
                rows.append((prompt + ans, len(ans)))
        width = max(len(r) for r, _ in rows)
        keep = max(n for _, n in rows) + 1
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (r, _) in enumerate(rows):  # left padding: every answer ends at the last column
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Only the last `keep` positions' logits are needed: saves the 49k-wide head elsewhere.
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep).logits
        logp = logits.float().log_softmax(-1)  # (rows, keep, vocab)
        scores: list[float] = []
        sums: list[float] = []
        for i, (r, n) in enumerate(rows):
            targets = torch.tensor(r[-n:])
            # logits at column j predict token at column j+1; answers occupy the last n columns.
            lp = logp[i, keep - n - 1 : keep - 1].gather(1, targets[:, None]).squeeze(1)
            sums.append(float(lp.sum()))
            scores.append(float(lp.mean()))
        row = 0
        for q in chunk:
            k = len(q.choices)
            best = max(range(k), key=lambda j: scores[row + j])
            correct += int(best == q.answer_index)
            nll -= sums[row + q.answer_index]
            ntok += rows[row + q.answer_index][1]
            row += k
        if progress is not None:
            progress(min(start + questions_per_batch, len(questions)), len(questions))
    if was_training:
        model.train()
    return EvalResult(accuracy=correct / len(questions), loss=nll / max(1, ntok), count=len(questions))
