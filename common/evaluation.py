"""Multiple-choice evaluation by answer likelihood (cloze scoring), shared by every party."""

from __future__ import annotations

import inspect
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



def _cache_kwarg(model: Any) -> str:
    """The forward() keyword for a KV cache: `cache` in newer transformers, `past_key_values`
    before (still accepted there, with a deprecation warning per call)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

def option_logprobs(model: Any, tok: Any, questions: Sequence[Question]) -> list[list[torch.Tensor]]:
    """Per-token log-probs of every option's text after its question: [question][option] ->
    (n_tokens,). Each prompt runs once; its KV cache is fanned out to its options, so the
    cost is ~one prompt pass plus the (short) options, not one prompt pass per option."""
    prompts = [tok(prompt_text(q), add_special_tokens=False).input_ids for q in questions]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):   # left padding: every prompt ends at the last column
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].float().log_softmax(-1)          # (questions, vocab): predicts answer token 1
    owner, answers = [], []
    for qi, q in enumerate(questions):
        for i in range(len(q.choices)):
            owner.append(qi)
            answers.append(tok(answer_text(q, i), add_special_tokens=False).input_ids)
    idx = torch.tensor(owner)
    cache = out.cache if "cache" in out else out.past_key_values   # the newer name, without its warning
    cache.reorder_cache(idx)                                    # one cache row per option
    span = max(len(a) for a in answers)
    a_ids = torch.full((len(answers), span), tok.pad_token_id, dtype=torch.long)
    a_mask = torch.zeros_like(a_ids)
    for r, a in enumerate(answers):   # right padding after the answer: causal attention never sees it
        a_ids[r, : len(a)] = torch.tensor(a)
        a_mask[r, : len(a)] = 1
    positions = mask.sum(-1)[idx, None] + torch.arange(span)[None, :]
    rest = model(input_ids=a_ids, attention_mask=torch.cat([mask[idx], a_mask], dim=1), position_ids=positions,
                 use_cache=True, **{_cache_kwarg(model): cache}).logits.float().log_softmax(-1)   # (options, span, vocab)
    result: list[list[torch.Tensor]] = [[] for _ in questions]
    for r, a in enumerate(answers):
        target = torch.tensor(a)
        lp = torch.empty(len(a))
        lp[0] = first[owner[r], target[0]]
        if len(a) > 1:   # logits at answer position j predict answer token j+1
            lp[1:] = rest[r, : len(a) - 1].gather(1, target[1:, None]).squeeze(1)
        result[owner[r]].append(lp)
    return result


@torch.no_grad()
def evaluate_choices(
    model: Any,
    tok: Any,
    questions: Sequence[Question],
    questions_per_batch: int = 8,
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
        for q, options in zip(chunk, option_logprobs(model, tok, chunk)):
            best = max(range(len(options)), key=lambda j: float(options[j].mean()))
            correct += int(best == q.answer_index)
            nll -= float(options[q.answer_index].sum())
            ntok += len(options[q.answer_index])
        if progress is not None:
            progress(min(start + questions_per_batch, len(questions)), len(questions))
    if was_training:
        model.train()
    return EvalResult(accuracy=correct / len(questions), loss=nll / max(1, ntok), count=len(questions))
