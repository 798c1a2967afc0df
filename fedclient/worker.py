"""The school's model: loaded once, trained and evaluated on a worker thread (blocking code)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from common.data import OpenPrompt, Question, read_jsonl, without_heldout
from common.distill import (
    DistillResult, Pack, generate_answers, label, leaks_own_data, own_ngrams, train_distill, vocab_fingerprint,
)
from common.evaluation import EvalResult, evaluate_choices
from common.files import atomic_write_bytes
from common.logs import get_logger
from common.lora import (BaseMerge, LoraSettings, adapter_state, at_rank, load_adapter_state, pad_rank, split_merge,
                         sub_states, truncate_rank, wrap)
from common.models import load_model
from common.training import TrainParams, TrainResult, enable_checkpointing, release_memory, train_lora
from common.wire import bytes_to_tensors, tensors_to_bytes


class SchoolModel:
    def __init__(self, base: str, cache_dir: Path | None, data_dir: Path, heldout_file: Path | None,
                 torch_threads: int = 0, state_dir: Path | None = None, max_batch_tokens: int = 0,
                 gradient_checkpointing: bool = False) -> None:
        self.base = base
        self.cache_dir = cache_dir
        self.train_questions: list[Question] = read_jsonl(data_dir)
        if not self.train_questions:
            raise ValueError(f"no questions under {data_dir}; put the school's *.jsonl files there")
        self.heldout: list[Question] = read_jsonl(heldout_file) if heldout_file and heldout_file.exists() else []
        kept = without_heldout(self.train_questions, self.heldout)
        if len(kept) < len(self.train_questions):   # e.g. data_dir's folder holds the held-out file too
            get_logger("school").warning("held-out questions found in the training data; not training on them",
                                         data_dir=str(data_dir), heldout_file=str(heldout_file),
                                         excluded=len(self.train_questions) - len(kept))
            self.train_questions = kept
            if not kept:
                raise ValueError(f"every question under {data_dir} is also in the held-out file {heldout_file}")
        self._own_ngrams: frozenset[tuple[str, ...]] | None = None   # built at the first teach round
        self._vocab_sha: str | None = None
        self.torch_threads = torch_threads
        self.max_batch_tokens = max_batch_tokens
        self.gradient_checkpointing = gradient_checkpointing
        self._model: Any = None
        self._tok: Any = None
        self._settings: LoraSettings | None = None
        self.stop_flag = threading.Event()
        self._load_lock = threading.Lock()
        self._federation: LoraSettings | None = None
        self._merge = BaseMerge()
        # Tensors this school keeps for itself (FedSA-LoRA's B), kept on disk across restarts.
        self.personal_file = state_dir / "personal.safetensors" if state_dir is not None else None

    def ensure_loaded(self, settings: LoraSettings) -> None:
        """Load the base model and wrap it with the federation's LoRA settings (once)."""
        self._federation = settings
        self._load(settings)

    def _load(self, settings: LoraSettings) -> None:
        with self._load_lock:   # the daemon preloads after its first Join while a command may load too
            self._load_locked(settings)

    def _load_locked(self, settings: LoraSettings) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if self._model is not None and settings == self._settings:
            return
        base, self._tok = load_model(self.base, self.cache_dir)
        if self.gradient_checkpointing:
            enable_checkpointing(base)
        self._model = wrap(base, settings)
        self._settings = settings
        self._merge = BaseMerge()   # a fresh base has nothing merged into it

    def _start_state(self, global_payload: bytes, params: TrainParams) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(global adapter, this school's starting point): the global adapter cut to the
        school's rank, with the school's personal tensors in place of the shared ones."""
        assert self._federation is not None, "ensure_loaded() first"
        glob, merged = split_merge(bytes_to_tensors(global_payload))
        self._load(at_rank(self._federation, params.rank))
        self._merge.sync(self._model, merged)    # FLoRA / FedEx-LoRA: W₀ + what the federation merged
        start = truncate_rank(glob, params.rank) if params.rank and params.rank != self._federation.rank else dict(glob)
        if params.personal:
            for k, v in self._personal().items():
                if k in start and any(p in k for p in params.personal) and v.shape == start[k].shape:
                    start[k] = v
        return glob, start

    def _personal(self) -> dict[str, torch.Tensor]:
        if self.personal_file is None or not self.personal_file.exists():
            return {}
        return bytes_to_tensors(self.personal_file.read_bytes())

    def train(self, global_payload: bytes, params: TrainParams,
              progress: Callable[[int, int, float], None]) -> tuple[dict[str, torch.Tensor], TrainResult]:
        """Start from the global adapter, train locally, return the delta (in the global
        adapter's shapes, leaving out the tensors it kept frozen) against where this school started."""
        glob, start = self._start_state(global_payload, params)
        load_adapter_state(self._model, start)
        try:
            result = train_lora(self._model, self._tok, self.train_questions, params, progress, self.stop_flag.is_set,
                                self.max_batch_tokens)
        finally:
            release_memory()   # do not sit at the training peak until the next round
        return self._delta(glob, start, params), result

    def _delta(self, glob: dict[str, torch.Tensor], start: dict[str, torch.Tensor], params: TrainParams) -> dict[str, torch.Tensor]:
        """The trained adapter minus where this school started, in the global adapter's shapes,
        leaving out the tensors it kept frozen; personal tensors are kept on disk."""
        final = adapter_state(self._model)
        if params.personal and self.personal_file is not None:
            mine = {k: v for k, v in final.items() if any(p in k for p in params.personal)}
            atomic_write_bytes(self.personal_file, tensors_to_bytes(mine))
        delta = sub_states(final, start)
        if params.rank and self._federation is not None and params.rank != self._federation.rank:
            delta = pad_rank(delta, glob)
        if params.freeze:   # frozen tensors did not move: their zero deltas are not sent (FFA-LoRA: half the upload)
            delta = {k: v for k, v in delta.items() if not any(f in k for f in params.freeze)}
        return delta

    def distill(self, global_payload: bytes, pack: Pack, params: TrainParams, kd_weight: float, temperature: float,
                progress: Callable[[int, int, float], None]) -> tuple[dict[str, torch.Tensor], DistillResult]:
        """Start from the global adapter, fit the teacher's option distributions and generated
        answers on the pack (mixed with this school's own questions when kd_weight < 1),
        return the delta."""
        glob, start = self._start_state(global_payload, params)
        load_adapter_state(self._model, start)
        targets = torch.tensor([list(row) for row in pack.probs], dtype=torch.float32)
        try:
            result = train_distill(self._model, self._tok, pack.questions, targets, params, kd_weight, temperature,
                                   self.train_questions, progress, self.stop_flag.is_set, self.max_batch_tokens or 1024,
                                   pack.open_items(), pack.topk_items(self._vocab()))
        finally:
            release_memory()
        return self._delta(glob, start, params), result

    def _vocab(self) -> str:
        """This school's tokenizer fingerprint (a pack's top-k is used only when it matches)."""
        if self._vocab_sha is None:
            self._vocab_sha = vocab_fingerprint(self._tok)
        return self._vocab_sha

    def answer(self, global_payload: bytes, questions: Sequence[Question], temperature: float,
               params: TrainParams | None = None, prompts: Sequence[OpenPrompt] = (),
               max_new_tokens: int = 24) -> tuple[torch.Tensor, list[str], int]:
        """This school's answers to a pool pack, with the model it would evaluate (global
        adapter + its personal tensors): option distributions for the questions, and a greedy
        one-line answer to each open prompt, except that an answer repeating words of this
        school's own data is withheld (sent empty). Returns (probs, texts, withheld)."""
        _, start = self._start_state(global_payload, params or TrainParams())
        load_adapter_state(self._model, start)
        try:
            probs = label(self._model, self._tok, questions, temperature)
            texts = generate_answers(self._model, self._tok, prompts, max_new_tokens or 24)
        finally:
            release_memory()
        if self._own_ngrams is None:   # this school's data does not change while it runs
            self._own_ngrams = own_ngrams([*self.train_questions, *self.heldout])
        kept = ["" if leaks_own_data(t, self._own_ngrams) else t for t in texts]
        return probs, kept, sum(1 for a, b in zip(texts, kept) if a != b)

    def evaluate(self, global_payload: bytes, max_examples: int, params: TrainParams | None = None) -> EvalResult | None:
        if not self.heldout or max_examples <= 0:
            return None
        _, start = self._start_state(global_payload, params or TrainParams())
        load_adapter_state(self._model, start)
        try:
            return evaluate_choices(self._model, self._tok, self.heldout[:max_examples])
        finally:
            release_memory()
