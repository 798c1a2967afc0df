"""The coordinator's own evaluation of each global adapter on public held-out questions.
Runs on one dedicated worker thread: the model loads once and the event loop never blocks."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from common.data import read_jsonl, spread
from common.evaluation import EvalResult, evaluate_choices
from common.lora import BaseMerge, LoraSettings, load_adapter_state, split_merge, wrap
from common.logs import get_logger
from common.models import load_model
from fedserver.config import CoordinatorConfig
from fedserver.store import Store


class ServerEvaluator:
    def __init__(self, cfg: CoordinatorConfig, store: Store) -> None:
        assert cfg.evaluation.eval_file is not None
        self.cfg = cfg
        self.store = store
        self.settings: LoraSettings = cfg.lora.settings()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="server-eval")
        self._model: Any = None
        self._merge = BaseMerge()
        self._tok: Any = None
        self._questions = spread(read_jsonl(cfg.evaluation.eval_file), cfg.evaluation.max_examples)
        self.log = get_logger("evaluator", eval_file=str(cfg.evaluation.eval_file), count=len(self._questions))

    def _run(self, state: dict[str, torch.Tensor] | None) -> EvalResult:
        if self.cfg.evaluation.threads:
            torch.set_num_threads(self.cfg.evaluation.threads)
        if self._model is None:
            base, self._tok = load_model(self.cfg.model.base, self.cfg.model.cache_dir)
            self._model = wrap(base, self.settings)
        if state is None:
            self._merge.sync(self._model, {})
            with self._model.disable_adapter():   # the untuned base model
                return evaluate_choices(self._model, self._tok, self._questions)
        lora, merged = split_merge(state)
        self._merge.sync(self._model, merged)
        load_adapter_state(self._model, lora)
        return evaluate_choices(self._model, self._tok, self._questions)

    async def __call__(self, round_: int, state: dict[str, torch.Tensor] | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._pool, self._run, state)
        except Exception as exc:  # an evaluation failure must not take the coordinator down
            self.log.error("evaluation failed", round=round_, error=repr(exc))
            return
        await asyncio.to_thread(self.store.add_eval, round_, "server", result.count, result.metrics())
        self.log.info("evaluated", round=round_, accuracy=round(result.accuracy, 4), loss=round(result.loss, 4))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
