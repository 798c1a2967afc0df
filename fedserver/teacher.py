"""The teacher host: the coordinator's large model, off the event loop, behind one interface.

A backend answers in batches: option distributions for multiple-choice prompts (what distill
rounds send to the schools), log-probabilities of given continuations, generation with
per-token log-probabilities and top-k, held-out evaluation, and (local backend only) learning
its own LoRA adapter from option distributions (teach rounds: QLoRA on the quantized base).

- `LocalTeacher` loads any model spec in nf4 / int8 (bitsandbytes) or unquantized. On CPU, a
  bitsandbytes 4-bit layer repacks its weights in place at its first no-grad forward in eval
  mode (any scoring or generation), and that instance then trains wrongly (silently no
  gradients, or an in-place error) and scores wrongly once its LoRA adapter has changed
  (measured with bitsandbytes 0.50.2). The repacking is switched off on every instance.
  `trainer = "separate"` still trains a second instance of the base and copies the adapter
  across (inference and training never share weights); `trainer = "shared"` (default) uses one
  instance: half the memory. Tests compare both with fresh instances.
- `OpenAITeacher` talks to an OpenAI-compatible completions server (vLLM, llama.cpp's server)
  for a model too large for this process: scoring through `echo` + `logprobs`.

`TeacherHost` runs every call on one dedicated worker thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

import torch

from common.data import OpenPrompt, Question, answer_text, prompt_text
from common.distill import DistillResult, cut_first_line, distributions, label, train_distill, vocab_fingerprint
from common.errors import ConfigError, ModelUnavailableError
from common.evaluation import EvalResult, evaluate_choices
from common.logs import get_logger
from common.lora import adapter_state, load_adapter_state
from common.models import BUILD_LOCK, load_tokenizer, resolve
from common.training import TrainParams, release_memory
from fedserver.config import TeacherSection

T = TypeVar("T")


@dataclass(frozen=True)
class Generation:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]                       # log p of each generated token
    top: tuple[tuple[tuple[int, float], ...], ...]    # per position: the k most likely (token id, log p)


class TeacherBackend(Protocol):
    name: str

    def label(self, questions: Sequence[Question], temperature: float) -> torch.Tensor: ...
    def count_tokens(self, questions: Sequence[Question]) -> int: ...
    def evaluate(self, questions: Sequence[Question]) -> EvalResult: ...
    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]: ...
    def generate(self, prompts: Sequence[str], max_new_tokens: int, top_k: int = 0) -> list[Generation]: ...


def bnb_config(quantization: str) -> Any:
    """transformers' BitsAndBytesConfig for nf4 / int8; None for no quantization."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise ModelUnavailableError(f"quantization = {quantization!r} needs bitsandbytes: pip install bitsandbytes ({exc})") from None
    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                  bnb_4bit_use_double_quant=False)
    return BitsAndBytesConfig(load_in_8bit=True)


class LocalTeacher:
    """A Hugging Face causal LM in this process, with its own LoRA adapter."""

    def __init__(self, cfg: TeacherSection, cache_dir: Path | None) -> None:
        self.cfg = cfg
        self.name = cfg.model
        self.cache_dir = cfg.cache_dir or cache_dir
        self._path = resolve(cfg.model, self.cache_dir)
        self.tok = load_tokenizer(cfg.model, self.cache_dir)
        self.infer = self._build()        # scores, generates, evaluates
        self._trainer: Any = None         # a second instance ("separate"), built on the first teach round
        self.log = get_logger("teacher", model=cfg.model, quantization=cfg.quantization)

    def _build(self) -> Any:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        quant = bnb_config(self.cfg.quantization)
        kwargs: dict[str, Any] = {"dtype": torch.float32}
        if quant is not None:
            kwargs.update(quantization_config=quant, device_map="cpu")
        with BUILD_LOCK:
            base = AutoModelForCausalLM.from_pretrained(self._path, **kwargs)
            cfg = LoraConfig(r=self.cfg.lora_rank, lora_alpha=self.cfg.lora_alpha, lora_dropout=0.0,
                             target_modules=list(self.cfg.target_modules), init_lora_weights=True)
            torch.manual_seed(self.cfg.seed)   # the same adapter init on both instances
            model = get_peft_model(base, cfg)
        # Always: a 4-bit layer repacked for CPU inference trains wrongly (no backward) and also
        # scores wrongly once its LoRA adapter changes (measured: the 1.5B teacher's held-out
        # answer loss 3.2 -> 13 after a teach round, while a fresh model with the same adapter
        # scored 4.0 on the 0.5B). Without the repack both are right; tests compare both.
        no_cpu_repack(model)
        model.eval()
        release_memory()   # loading then quantizing leaves the float32 copy's pages on the heap
        return model

    @property
    def quantized(self) -> bool:
        return self.cfg.quantization != "none"

    def _threads(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)

    def vocab(self) -> str:
        """The tokenizer's fingerprint: top-k labels are usable by students whose matches."""
        if not hasattr(self, "_vocab_sha"):
            self._vocab_sha = vocab_fingerprint(self.tok)
        return self._vocab_sha

    def answer_ids(self, ids: Sequence[int]) -> list[int]:
        """A generated answer's ids cut at its first line break, as its text is."""
        return cut_first_line(self.tok, ids, self.tok.eos_token_id)

    def count_tokens(self, questions: Sequence[Question]) -> int:
        """Tokens the teacher scores for `questions` (each prompt once, every option)."""
        n = 0
        for q in questions:
            n += len(self.tok(prompt_text(q), add_special_tokens=False).input_ids)
            n += sum(len(self.tok(answer_text(q, i), add_special_tokens=False).input_ids) for i in range(len(q.choices)))
        return n

    # ---- inference
    def label(self, questions: Sequence[Question], temperature: float) -> torch.Tensor:
        self._threads()
        try:
            return label(self.infer, self.tok, questions, temperature, self.cfg.batch_questions)
        finally:
            release_memory()

    def evaluate(self, questions: Sequence[Question]) -> EvalResult:
        self._threads()
        try:
            return evaluate_choices(self.infer, self.tok, questions, self.cfg.batch_questions)
        finally:
            release_memory()

    @torch.no_grad()
    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        """Per-token log p of each continuation after its prompt (teacher-forced), in the
        teacher's own tokenisation."""
        self._threads()
        out = []
        for p, c in zip(prompts, continuations, strict=True):
            pi = self.tok(p, add_special_tokens=False).input_ids
            ci = self.tok(c, add_special_tokens=False).input_ids
            ids = torch.tensor([pi + ci])
            logp = self.infer(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            tgt = ids[0, 1:]
            lp = logp.gather(1, tgt[:, None]).squeeze(1)[len(pi) - 1:]
            out.append([float(x) for x in lp])
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int, top_k: int = 0) -> list[Generation]:
        """Greedy generation, batched with left padding, with each token's log p and top-k."""
        self._threads()
        self.tok.padding_side = "left"
        enc = self.tok(list(prompts), return_tensors="pt", padding=True, add_special_tokens=False)
        res = self.infer.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True, pad_token_id=self.tok.pad_token_id)
        new = res.sequences[:, enc.input_ids.shape[1]:]
        # the model's own distribution (raw logits), not the one the generation config's
        # processors (repetition penalty) reshaped to pick the token
        steps = torch.stack(res.logits, 1).float().log_softmax(-1)      # [batch, new tokens, vocab]
        gens = []
        for b in range(len(prompts)):
            ids: list[int] = []
            lps, tops = [], []
            for t in range(new.shape[1]):
                tid = int(new[b, t])
                if tid == self.tok.pad_token_id and t > 0 and ids and ids[-1] == self.tok.eos_token_id:
                    break
                ids.append(tid)
                lps.append(float(steps[b, t, tid]))
                if top_k:
                    v, i = steps[b, t].topk(top_k)
                    tops.append(tuple((int(a), float(x)) for a, x in zip(i, v)))
                if tid == self.tok.eos_token_id:
                    break
            gens.append(Generation(self.tok.decode(ids, skip_special_tokens=True), tuple(ids), tuple(lps), tuple(tops)))
        return gens

    # ---- learning (teach rounds)
    def learn(self, questions: Sequence[Question], targets: torch.Tensor, temperature: float, round_: int,
              open_items: Sequence[tuple[OpenPrompt, str]] = ()) -> DistillResult:
        """Train the teacher's adapter toward the schools' ensemble, on the training instance;
        then the inference instance takes the new adapter. The loss is `learn_kd_weight` ·
        KL(ensemble ‖ teacher) over the options plus the rest · the answer cross-entropy of the
        ensemble's top option (sequence-level KD on the ensemble's answer). The KL alone only
        sees differences between options, and the teacher learns them by pushing every
        option's text down (measured: held-out answer loss 3.19 -> 13.0 after 4 steps); the
        cross-entropy term keeps its likelihoods anchored. `open_items`: open prompts with the
        answer most schools agreed on, learned as sequence-level KD (part of the KD term)."""
        self._threads()
        if self._trainer is None:
            separate = self.quantized and self.cfg.trainer == "separate"
            self._trainer = self._build() if separate else self.infer
            load_adapter_state(self._trainer, adapter_state(self.infer))
        params = TrainParams(local_steps=self.cfg.learn_steps, batch_size=self.cfg.learn_batch,
                             learning_rate=self.cfg.learn_rate, max_seq_len=256, seed=self.cfg.seed + round_)
        try:
            top = targets.argmax(-1).tolist()
            answered = [dataclasses.replace(q, answer_index=i, answer=q.choices[i]) for q, i in zip(questions, top)]
            result = train_distill(self._trainer, self.tok, questions, targets, params, self.cfg.learn_kd_weight,
                                   temperature, answered if self.cfg.learn_kd_weight < 1 else (),
                                   max_batch_tokens=self.cfg.max_batch_tokens, open_items=open_items)
        finally:
            release_memory()
        if self._trainer is not self.infer:
            load_adapter_state(self.infer, adapter_state(self._trainer))
        self.infer.eval()
        return result

    def adapter(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.infer)

    def load_adapter(self, state: Mapping[str, torch.Tensor]) -> None:
        load_adapter_state(self.infer, state)
        if self._trainer is not None and self._trainer is not self.infer:
            load_adapter_state(self._trainer, state)

    def save_adapter(self, path: Path) -> None:
        """A PEFT directory: `PeftModel.from_pretrained(teacher_base, path)` loads it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        self.infer.save_pretrained(str(tmp))
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)


def no_cpu_repack(model: Any) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for CPU inference (the repacked layout has
    no backward), so one instance can score and train."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


class TeacherServerError(RuntimeError):
    """The OpenAI-compatible teacher server answered with an HTTP error."""


class OpenAITeacher:
    """An OpenAI-compatible completions server (vLLM, llama.cpp's server) as the teacher. It
    scores through `echo` + `logprobs` and cannot learn (teach rounds need the local backend)."""

    def __init__(self, cfg: TeacherSection, timeout_s: float = 300.0) -> None:
        self.cfg = cfg
        self.name = cfg.served_model or cfg.model
        self.url = cfg.url.rstrip("/")
        self.timeout_s = timeout_s
        self._one_at_a_time = False
        self.log = get_logger("teacher", model=self.name, backend="openai")

    def vocab(self) -> str:
        """No token ids over this API (top-k comes keyed by token text): text-only labels."""
        return ""

    def answer_ids(self, ids: Sequence[int]) -> list[int]:
        return []

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(f"{self.url}/completions", data=json.dumps({"model": self.name, **body}).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise TeacherServerError(f"teacher server {self.url} refused the request: HTTP {exc.code} {detail}") from None
        except OSError as exc:
            raise ModelUnavailableError(f"teacher server {self.url} did not answer: {exc}; is it running?") from None

    def _choices(self, prompts: Sequence[str], body: dict[str, Any]) -> list[dict[str, Any]]:
        """One completion per prompt, in order: batched when the server takes a list of prompts,
        else one request each (llama-cpp-python's server takes one prompt a request)."""
        if len(prompts) > 1 and not self._one_at_a_time:
            try:
                res = self._post({**body, "prompt": list(prompts)})
                return sorted(res["choices"], key=lambda c: c["index"])
            except TeacherServerError as exc:
                self._one_at_a_time = True
                self.log.warning("teacher server refused a batch of prompts; sending one a request", error=str(exc))
        return [self._post({**body, "prompt": [p]})["choices"][0] for p in prompts]

    def continuation_logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[list[float]]:
        texts = [p + c for p, c in zip(prompts, continuations, strict=True)]
        # max_tokens 1, not 0: some servers read 0 as "no limit"; the generated token is dropped below.
        choices = self._choices(texts, {"max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0})
        out: list[list[float]] = []
        for i, choice in enumerate(choices):
            lp = choice["logprobs"]
            start, end = len(prompts[i]), len(texts[i])
            # Tokens that begin inside the continuation (a token straddling the boundary
            # belongs to the continuation: its text ends there), and none past the echoed text.
            out.append([float(v) for v, off, tok in zip(lp["token_logprobs"], lp["text_offset"], lp["tokens"])
                        if v is not None and off + len(tok) > start and off < end])
        return out

    def count_tokens(self, questions: Sequence[Question]) -> int:
        """Not known without the server's tokenizer."""
        return 0

    def label(self, questions: Sequence[Question], temperature: float) -> torch.Tensor:
        prompts, conts, owner = [], [], []
        for qi, q in enumerate(questions):
            for oi in range(len(q.choices)):
                prompts.append(prompt_text(q))
                conts.append(answer_text(q, oi))
                owner.append((qi, oi))
        lps = self.continuation_logprobs(prompts, conts)
        width = max(len(q.choices) for q in questions)
        scores = torch.full((len(questions), width), float("-inf"))
        for (qi, oi), lp in zip(owner, lps):
            scores[qi, oi] = sum(lp) / max(1, len(lp))
        return distributions(scores, temperature)

    def evaluate(self, questions: Sequence[Question]) -> EvalResult:
        probs = self.label(questions, 1.0)
        correct = sum(int(int(probs[i].argmax()) == q.answer_index) for i, q in enumerate(questions))
        nll = -sum(float(probs[i, q.answer_index].clamp(min=1e-12).log()) for i, q in enumerate(questions))
        return EvalResult(correct / len(questions), nll / len(questions), len(questions))

    def generate(self, prompts: Sequence[str], max_new_tokens: int, top_k: int = 0) -> list[Generation]:
        choices = self._choices(prompts, {"max_tokens": max_new_tokens, "temperature": 0, "logprobs": max(1, top_k)})
        out: list[Generation] = []
        for choice in choices:
            lp = choice.get("logprobs") or {}
            # The API keys alternatives by token text, not id: no ids here, so no top-k packs.
            out.append(Generation(choice["text"], (), tuple(float(v) for v in lp.get("token_logprobs") or []), ()))
        return out


def build_backend(cfg: TeacherSection, cache_dir: Path | None) -> LocalTeacher | OpenAITeacher:
    if not cfg.model and cfg.backend == "local":
        raise ConfigError("no teacher configured; set [teacher] model")
    if cfg.backend == "openai":
        return OpenAITeacher(cfg)
    return LocalTeacher(cfg, cache_dir)


class TeacherHost:
    """Async facade: every call runs on one dedicated thread (the model is not thread-safe and
    the event loop must keep serving schools while the teacher works). The model loads on
    that thread at the first call, so the coordinator starts serving at once."""

    def __init__(self, cfg: TeacherSection, cache_dir: Path | None,
                 factory: Callable[[TeacherSection, Path | None], Any] = build_backend) -> None:
        self.cfg = cfg
        self._factory = factory
        self._cache_dir = cache_dir
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher")
        self.backend: Any = None
        self.restore_from: Path | None = None   # a saved PEFT adapter to apply when the model loads
        self.log = get_logger("teacher", model=cfg.model, quantization=cfg.quantization, backend=cfg.backend)

    def _loaded(self) -> Any:
        if self.backend is None:
            t0 = time.perf_counter()
            backend = self._factory(self.cfg, self._cache_dir)
            if self.restore_from is not None:   # the adapter the last committed teach round recorded
                from safetensors.torch import load_file

                backend.load_adapter(load_file(str(self.restore_from / "adapter_model.safetensors")))
                self.log.info("teacher adapter restored", path=str(self.restore_from))
            self.backend = backend
            self.log.info("teacher loaded", seconds=round(time.perf_counter() - t0, 1))
        return self.backend

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(backend, *args)` on the teacher's thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._loaded(), *args))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
