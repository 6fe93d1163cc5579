"""The README's scenario end to end on the real embedded SmolLM2-135M, at the defaults."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from serving import chat, make_server

from claas.models import LoadedModel

pytestmark = pytest.mark.heavy


@pytest.mark.real_model
def test_real_model_answers_shorter_after_feedback_at_the_defaults(
    smol: LoadedModel, tmp_path: Path, model_cache: Path
) -> None:
    """The README's scenario with the default training config: after ONE request the answer
    ends by itself, in at most 0.6x the tokens of the first (which was cut at max_tokens).

    The adapter is created as the README does (default rank and alpha), with a fixed LoRA
    init seed: without one the init is random, and how much shorter the answer gets varies
    from run to run. Only the direction is asserted, at #22's 0.6x."""
    own = LoadedModel(smol.name, copy.deepcopy(smol.model), smol.tokenizer, smol.device)
    live = make_server(tmp_path, model_cache, loaded=own)
    try:
        created = live.client.post("/v1/adapters", json={"lora_id": "alice/real", "seed": 1})
        assert created.status_code == 201, created.text
        question = [{"role": "user", "content": "Explain how a rainbow forms."}]
        answers = [chat(live, "alice/real", messages=question, max_tokens=64).json()]
        for _ in range(1):
            item = {
                "completion_id": answers[-1]["id"],
                "feedback": "Way too long. Answer in one short sentence.",
            }
            trained = live.client.post("/v1/feedback?wait=true", json={"items": [item]}).json()
            assert trained["status"] == "done", trained
            assert trained["metrics"]["learning_rate"] == pytest.approx(1e-4, rel=0.02)
            answers.append(chat(live, "alice/real", messages=question, max_tokens=64).json())
        texts = [a["choices"][0]["message"]["content"] for a in answers]
        lengths = [a["usage"]["completion_tokens"] for a in answers]
        assert texts[1] != texts[0], texts
        assert answers[0]["choices"][0]["finish_reason"] == "length"
        assert answers[-1]["choices"][0]["finish_reason"] == "stop", texts
        assert lengths[-1] <= 0.6 * lengths[0], (lengths, texts)
    finally:
        live.close()
