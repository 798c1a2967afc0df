"""The school's model: loaded once, trained and evaluated on a worker thread (blocking code)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from common.data import Question, read_jsonl
from common.evaluation import EvalResult, evaluate_choices
from common.lora import LoraSettings, adapter_state, load_adapter_state, sub_states, wrap
from common.models import load_model
from common.training import TrainParams, TrainResult, train_lora
from common.wire import bytes_to_tensors, tensors_to_bytes


class SchoolModel:
    def __init__(self, base: str, cache_dir: Path | None, data_dir: Path, heldout_file: Path | None,
                 torch_threads: int = 0) -> None:
        self.base = base
        self.cache_dir = cache_dir
        self.train_questions: list[Question] = read_jsonl(data_dir)
        if not self.train_questions:
            raise ValueError(f"no questions under {data_dir}; put the school's *.jsonl files there")
        self.heldout: list[Question] = read_jsonl(heldout_file) if heldout_file and heldout_file.exists() else []
        self.torch_threads = torch_threads
        self._model: Any = None
        self._tok: Any = None
        self._settings: LoraSettings | None = None
        self.stop_flag = threading.Event()

    def ensure_loaded(self, settings: LoraSettings) -> None:
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if self._model is not None and settings == self._settings:
            return
        base, self._tok = load_model(self.base, self.cache_dir)
        self._model = wrap(base, settings)
        self._settings = settings

    def train(self, global_payload: bytes, params: TrainParams,
              progress: Callable[[int, int, float], None]) -> tuple[bytes, TrainResult]:
        """Start from the global adapter, train locally, return the delta as safetensors bytes."""
        start = bytes_to_tensors(global_payload)
        load_adapter_state(self._model, start)
        result = train_lora(self._model, self._tok, self.train_questions, params, progress, self.stop_flag.is_set)
        delta = sub_states(adapter_state(self._model), start)
        return tensors_to_bytes(delta), result

    def evaluate(self, global_payload: bytes, max_examples: int) -> EvalResult | None:
        if not self.heldout or max_examples <= 0:
            return None
        load_adapter_state(self._model, bytes_to_tensors(global_payload))
        return evaluate_choices(self._model, self._tok, self.heldout[:max_examples])
