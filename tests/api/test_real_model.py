"""The real embedded SmolLM2-135M, trained through the API at the default config: the README's
scenario end to end, and the learning signal of one request in both divergence modes.

One server trains two adapters, made alike, one per divergence mode: each gets one greedy
answer to the README's question and one feedback request on it. The README scenario's
assertions read the top-K adapter's answers; the learning signal is read for both adapters,
from the versions before and after their request. One server and one answer per adapter, not a
server per test: a training at the defaults is most of a real-model test's time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from model_copies import private_copy
from serving import LiveServer, chat, make_server
from tinker import types

from claas.models import LoadedModel
from claas.records import AdapterVersion, Rollout
from claas.services.local import LocalServiceClient

pytestmark = pytest.mark.heavy

QUESTION = [{"role": "user", "content": "Explain how a rainbow forms."}]
FEEDBACK = "Way too long. Answer in one short sentence."
# mode → the request's training overrides; top-K GJS is the default.
MODES: dict[str, dict[str, Any]] = {"topk_gjs": {}, "scalar_kl": {"use_topk_divergence": False}}


@dataclass(frozen=True)
class Taught:
    """One adapter's answer, the feedback request trained on it, and the versions either side."""

    answers: list[dict[str, Any]]  # before the request, and (top-K only) after it
    trained: dict[str, Any]  # the finished request's status
    rollout: Rollout  # the first answer, as the server recorded it
    before: AdapterVersion
    after: AdapterVersion


@pytest.fixture(scope="module")
def served(
    smol: LoadedModel, tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[tuple[LiveServer, dict[str, Taught]]]:
    """The adapters are created as the README does (default rank and alpha), with a fixed LoRA
    init seed: without one the init is random, and how much shorter the answer gets varies
    from run to run. The same seed makes them alike (B = 0: version 1 is the base model)."""
    live = make_server(tmp_path_factory.mktemp("real"), model_cache, loaded=private_copy(smol))
    try:
        store = live.runtime.store
        answers: dict[str, list[dict[str, Any]]] = {}
        for mode in MODES:
            created = live.client.post("/v1/adapters", json={"lora_id": lora_of(mode), "seed": 1})
            assert created.status_code == 201, created.text
            answers[mode] = [chat(live, lora_of(mode), messages=QUESTION, max_tokens=64).json()]
        taught = {}
        for mode, training in MODES.items():
            before = store.latest_version(lora_of(mode))
            item = {"completion_id": answers[mode][0]["id"], "feedback": FEEDBACK}
            if training:
                item["training"] = training
            trained = live.client.post("/v1/feedback?wait=true", json={"items": [item]}).json()
            assert trained["status"] == "done", trained
            if mode == "topk_gjs":  # the README scenario's next answer
                answers[mode].append(
                    chat(live, lora_of(mode), messages=QUESTION, max_tokens=64).json()
                )
            after = store.latest_version(lora_of(mode))
            assert before is not None and after is not None
            rollout = store.get_rollout(answers[mode][0]["id"])
            taught[mode] = Taught(answers[mode], trained, rollout, before, after)
        yield live, taught
    finally:
        live.close()


def lora_of(mode: str) -> str:
    return f"alice/{mode}"


@pytest.mark.real_model
def test_real_model_answers_shorter_after_feedback_at_the_defaults(
    served: tuple[LiveServer, dict[str, Taught]],
) -> None:
    """The README's scenario with the default training config: after ONE request the answer
    ends by itself, in at most 0.6x the tokens of the first (which was cut at max_tokens).
    Only the direction is asserted, at #22's 0.6x."""
    taught = served[1]["topk_gjs"]
    assert taught.trained["metrics"]["learning_rate"] == pytest.approx(1e-4, rel=0.02)
    texts = [a["choices"][0]["message"]["content"] for a in taught.answers]
    lengths = [a["usage"]["completion_tokens"] for a in taught.answers]
    assert texts[1] != texts[0], texts
    assert taught.answers[0]["choices"][0]["finish_reason"] == "length"
    assert taught.answers[-1]["choices"][0]["finish_reason"] == "stop", texts
    assert lengths[-1] <= 0.6 * lengths[0], (lengths, texts)


def end_of_turn_logprob(live: LiveServer, rollout: Rollout, version: AdapterVersion) -> float:
    """The student's mean log-prob of <|im_end|> over the answer's positions, at `version`."""
    service, tokenizer = live.runtime.service, live.runtime.tokenizer
    assert isinstance(service, LocalServiceClient)  # the server trains on this machine
    sampler = service.create_sampling_client(model_path=version.sampler_path).result()
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokens = rollout.prompt_tokens + rollout.response_tokens
    ids = np.full((len(tokens) - 1, 1), -1, dtype=np.int64)
    ids[len(rollout.prompt_tokens) - 1 :] = eot
    out = sampler.sample(
        types.ModelInput.from_ints(tokens),
        1,
        types.SamplingParams(max_tokens=1),
        target_prompt_logprobs=types.TensorData.from_numpy(ids),
    ).result()
    assert out.target_prompt_logprobs is not None
    values = out.target_prompt_logprobs.to_numpy()[len(rollout.prompt_tokens) - 1 :, 0]
    return float(values.mean())


@pytest.mark.real_model
@pytest.mark.parametrize("mode", list(MODES))
def test_real_model_learns_from_feedback(
    served: tuple[LiveServer, dict[str, Taught]], mode: str
) -> None:
    """One request at the defaults (bar the mode) makes the answer's end of turn likelier under
    the new version than under the one it was trained from; top-K GJS also ends the request
    with a smaller divergence than it began with."""
    live, taught = served[0], served[1][mode]
    assert (taught.before.version, taught.after.version) == (1, 2)
    assert taught.rollout.lora_id == lora_of(mode) and taught.rollout.adapter_version == 1
    metrics = taught.trained["metrics"]
    assert metrics["divergence_mode"] == mode
    eot_before = end_of_turn_logprob(live, taught.rollout, taught.before)
    eot_after = end_of_turn_logprob(live, taught.rollout, taught.after)
    assert eot_after > eot_before, (eot_before, eot_after)
    if mode == "topk_gjs":
        assert metrics["gjs_mean_after"] < metrics["gjs_mean"]
