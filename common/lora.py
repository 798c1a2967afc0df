"""LoRA helpers: the federation's adapter config, state dicts keyed by PEFT's saved names,
the expected tensor layout (from the model config alone), and atomic PEFT directories."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.models import BUILD_LOCK
from common.wire import tensors_to_bytes

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS

    def peft_config(self) -> Any:
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), task_type="CAUSAL_LM", bias="none")

    def to_json(self) -> str:
        return json.dumps({"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                           "target_modules": list(self.target_modules)})

    @classmethod
    def from_json(cls, text: str) -> LoraSettings:
        d = json.loads(text)
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]),
                   target_modules=tuple(d["target_modules"]))


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype = field(default=torch.float32)


def wrap(model: Any, settings: LoraSettings) -> Any:
    """A PeftModel around `model` with freshly initialised LoRA factors (B = 0)."""
    from peft import get_peft_model

    with BUILD_LOCK:
        return get_peft_model(model, settings.peft_config())


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """Trainable LoRA tensors under PEFT's saved names (what adapter_model.safetensors holds)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to(torch.float32).clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter_state(peft_model: Any, state: Mapping[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, dict(state))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter has tensors this model does not: {unexpected[:3]}...")


def expected_layout(model_config: Any, settings: LoraSettings) -> dict[str, TensorSpec]:
    """Names and shapes of the adapter tensors, built on the meta device (no weights read)."""
    from transformers import AutoModelForCausalLM

    with BUILD_LOCK, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
        peft_model = wrap(model, settings)
    from peft import get_peft_model_state_dict

    return {k: TensorSpec(tuple(v.shape), torch.float32) for k, v in get_peft_model_state_dict(peft_model).items()}


def initial_state(layout: Mapping[str, TensorSpec], seed: int) -> dict[str, torch.Tensor]:
    """Round-0 adapter: A as PEFT initialises it (Kaiming-uniform, a=sqrt(5)), B = 0, from a
    seed every party can reproduce."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name in sorted(layout):
        spec = layout[name]
        t = torch.zeros(spec.shape, dtype=spec.dtype)
        if ".lora_A." in name:
            fan_in = spec.shape[1]
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) bound for Linear
            t.uniform_(-bound, bound, generator=gen)
        out[name] = t
    return out


def add_states(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {k: base[k] + scale * delta[k] for k in base}


def sub_states(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: a[k] - b[k] for k in a}


def at_rank(settings: LoraSettings, rank: int) -> LoraSettings:
    """The settings a school of a smaller rank trains with (HetLoRA). alpha scales with the
    rank so s = alpha/r, and with it every factor's meaning, is the same for all schools."""
    if rank <= 0 or rank == settings.rank:
        return settings
    if rank > settings.rank:
        raise ValueError(f"rank {rank} is above the federation's rank {settings.rank}")
    return dataclasses.replace(settings, rank=rank, alpha=settings.alpha * rank / settings.rank)


def truncate_rank(state: Mapping[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    """Keep the first `rank` components: rows of each A (r x in), columns of each B (out x r)."""
    out = {}
    for k, v in state.items():
        if "lora_A" in k:
            out[k] = v[:rank].clone()
        elif "lora_B" in k:
            out[k] = v[:, :rank].clone()
        else:
            out[k] = v.clone()
    return out


def pad_rank(state: Mapping[str, torch.Tensor], like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Zero-pad a lower-rank state to the shapes of `like` (the inverse of truncate_rank)."""
    out = {}
    for k, v in state.items():
        full = torch.zeros_like(like[k])
        full[tuple(slice(0, n) for n in v.shape)] = v
        out[k] = full
    return out


def write_peft_dir(path: Path, state: Mapping[str, torch.Tensor], settings: LoraSettings,
                   base_model: str, extra: Mapping[str, Any] | None = None,
                   weights_file: Path | None = None) -> None:
    """Write a directory `PeftModel.from_pretrained(base, path)` loads, atomically: a temp
    directory beside it is renamed into place, so readers never see half an adapter.
    `weights_file`: a durable file that already holds exactly `tensors_to_bytes(state)` (the
    round's content-addressed artefact); it is hard-linked instead of serialised again.
    adapter_config.json names the base as transformers resolves it (a packaged model: the hub id
    it mirrors); federation.json keeps our own spec under "base_model"."""
    from common.models import peft_base_name

    cfg = settings.peft_config()
    cfg.base_model_name_or_path = peft_base_name(base_model)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg.save_pretrained(str(tmp))
    weights = tmp / "adapter_model.safetensors"
    linked = False
    if weights_file is not None:   # the same bytes already lie, durable, in an immutable file: share them
        try:
            os.link(weights_file, weights)
            linked = True
        except OSError:   # another file system, or no hard links there: write them
            pass
    if not linked:
        data = tensors_to_bytes(state)
        with open(weights, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    info = {**dict(extra or {}), "base_model": base_model}
    (tmp / "federation.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


# ---------------------------------------------------------------- merged base deltas (FLoRA, FedEx-LoRA)
# Some strategies fold part of the federation's learning into the frozen base weights:
# W ← W₀ + B_m A_m per adapted module. The global artifact carries B_m, A_m under these names
# next to the LoRA tensors; every party applies the difference to what it applied before.
MERGED_A, MERGED_B = ".merged_A.", ".merged_B."
MERGED_FILE = "merged_base_delta.safetensors"   # beside a checkpoint's PEFT directory: B_m, A_m of the base


def is_merge_key(key: str) -> bool:
    return MERGED_A in key or MERGED_B in key


def merge_keys(lora_a_key: str) -> tuple[str, str]:
    """(A_m, B_m) names for the module of a lora_A tensor."""
    return lora_a_key.replace(".lora_A.", MERGED_A), lora_a_key.replace(".lora_A.", MERGED_B)


def split_merge(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(LoRA tensors, merged-base tensors) of a global artifact."""
    lora = {k: v for k, v in state.items() if not is_merge_key(k)}
    return lora, {k: v for k, v in state.items() if is_merge_key(k)}


class BaseMerge:
    """What a PeftModel's base weights hold beyond W₀, kept in step with the global artifact.
    sync() adds B_new A_new − B_old A_old to each base weight, so a model loaded once follows
    the federation round after round; a freshly loaded model starts from nothing applied."""

    def __init__(self) -> None:
        self.applied: dict[str, torch.Tensor] = {}

    def sync(self, model: Any, merge: Mapping[str, torch.Tensor]) -> None:
        if set(merge) == set(self.applied) and all(torch.equal(merge[k], self.applied[k]) for k in merge):
            return
        modules = {k.split(MERGED_A)[0] for k in [*merge, *self.applied] if MERGED_A in k}
        for path in sorted(modules):
            a_key, b_key = f"{path}{MERGED_A}weight", f"{path}{MERGED_B}weight"
            layer = model.get_submodule(path)
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            weight = base.weight
            if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
                raise ValueError(f"{path}: merging into a {weight.dtype} (quantized) base weight is not supported; "
                                 "run FLoRA / FedEx-LoRA with an unquantized base model")
            delta = torch.zeros(weight.shape, dtype=torch.float32)
            if a_key in merge:
                delta += merge[b_key].float() @ merge[a_key].float()
            if a_key in self.applied:
                delta -= self.applied[b_key].float() @ self.applied[a_key].float()
            with torch.no_grad():
                weight.add_(delta.to(weight.dtype))
        self.applied = {k: v.clone() for k, v in merge.items()}
