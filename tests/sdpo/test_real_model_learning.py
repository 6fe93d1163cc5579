"""The learning signal on the real embedded model: one feedback request at the default
training config makes the rollout's end of turn likelier, in both divergence modes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
from model_copies import private_copy
from sdpo_harness import Harness, metric
from tinker import types

from claas.adapters import AdapterSpec
from claas.models import LoadedModel
from claas.sdpo.engine import FeedbackSample, TrainingConfig

pytestmark = pytest.mark.heavy

MODES = {"topk_gjs": True, "scalar_kl": False}  # mode → use_topk_divergence


def lora_of(mode: str) -> str:
    return f"alice/{mode}"


def end_of_turn_logprob(h: Harness, sample: FeedbackSample, model_path: str | None) -> float:
    """The student's mean log-prob of <|im_end|> over the response positions."""
    sampler = h.service.create_sampling_client(
        model_path=model_path, base_model=None if model_path else h.service.base_model
    ).result()
    eot = h.tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = sample.prompt_tokens + sample.response_tokens
    ids = np.full((len(tokens) - 1, 1), -1, dtype=np.int64)
    ids[len(sample.prompt_tokens) - 1 :] = eot
    out = sampler.sample(
        types.ModelInput.from_ints(tokens),
        1,
        types.SamplingParams(max_tokens=1),
        target_prompt_logprobs=types.TensorData.from_numpy(ids),
    ).result()
    assert out.target_prompt_logprobs is not None
    values = out.target_prompt_logprobs.to_numpy()[len(sample.prompt_tokens) - 1 :, 0]
    return float(values.mean())


@dataclass(frozen=True)
class Rainbow:
    """One harness on the real model with an adapter per divergence mode, and the greedy
    rollout every test trains on."""

    harness: Harness
    rollout: FeedbackSample


@pytest.fixture(scope="module")
def rainbow(smol: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rainbow]:
    """The adapters are made alike (the same seed; B = 0, so version 1 of each is the base
    model), so one greedy rollout, sampled once, is each adapter's own rollout of its version
    1, with its own behaviour log-probs: the two tests need not sample it twice."""
    h = Harness(private_copy(smol), tmp_path_factory.mktemp("learning"))
    try:
        for mode in MODES:
            h.run(h.adapters.init(lora_of(mode), AdapterSpec(seed=0)))
        first = lora_of(next(iter(MODES)))
        rollout = h.sample_for(
            "Explain how a rainbow forms.", max_tokens=64, temperature=0.0, lora_id=first
        )
        yield Rainbow(h, rollout)
    finally:
        h.close()


@pytest.mark.real_model
@pytest.mark.parametrize("mode", list(MODES))
def test_real_model_learns_from_feedback(rainbow: Rainbow, mode: str) -> None:
    h, lora_id = rainbow.harness, lora_of(mode)
    sample = rainbow.rollout.model_copy(update={"lora_id": lora_id})
    before = h.store.latest_version(lora_id)
    assert before is not None and before.version == 1
    eot_before = end_of_turn_logprob(h, sample, before.sampler_path)
    config = TrainingConfig(use_topk_divergence=MODES[mode])  # the defaults
    result = h.distill([sample], config)
    after = h.store.latest_version(lora_id)
    assert after is not None and after.version == h.version == 2
    assert result.divergence_mode == mode
    eot_after = end_of_turn_logprob(h, sample, after.sampler_path)
    assert eot_after > eot_before, (eot_before, eot_after)
    if mode == "topk_gjs":
        assert metric(result, "gjs_mean_after") < metric(result, "gjs_mean")
