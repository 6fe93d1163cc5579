"""CLaaS compatibility: CLaaS's own request bodies, as its docs, plugin and eval send them.

The bodies below are copied in shape from CLaaS (github.com/kfallah/CLaaS): the README's
quickstart, `plugins/claas-feedback/index.ts` (the OpenClaw plugin), `claas/eval/runner.py`
(the eval, which dumps `FeedbackBatchRequest` with a full `TrainingConfig`) and
`docker/scripts/init-stack.py` (the idempotent init). Each runs against a real server with the
tiny model. The scalar mode's advantage statistics are checked against a reference computed here
in torch from CLaaS's definitions (`claas/training/engine/tinker/engine.py`), on the untrained
adapter, whose weights are the base model's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok
from serving import (
    ADMIN,
    ALICE,
    BOB,
    LiveServer,
    chat,
    error_of,
    make_server,
)

from claas.models import tiny_llama
from claas.sdpo.prompts import rollout_teacher_prompt_tokens

FEEDBACK = "Way too long. Answer in one short sentence."
# The plugin's `orchestration`, verbatim (plugins/claas-feedback/index.ts).
PLUGIN_ORCHESTRATION = {
    "sleep_before": True,
    "wake_after": True,
    "wake_on_failure": True,
    "sleep_level": 1,
}
# What the eval sends: `FeedbackBatchRequest(requests=..., orchestration=FeedbackOrchestration(
# sleep_before=False, wake_after=False)).model_dump()`, with the training of its base.yaml.
EVAL_ORCHESTRATION = {
    "sleep_before": False,
    "wake_after": False,
    "wake_on_failure": True,
    "sleep_level": 1,
}
EVAL_TRAINING = {
    "learning_rate": 3e-5,
    "alpha": 0.5,
    "is_clip": 5.0,
    "max_grad_norm": 1.0,
    "kl_reg_weight": 0.0,
    "teacher_top_k": 100,
}
# The metadata keys CLaaS's eval reads with [] when it sees `adv_mean` (TinkerDistillMetrics).
TINKER_KEYS = {
    "adv_mean",
    "kl_mean",
    "effective_kl_coef",
    "kl_gain",
    "adv_abs_mean",
    "adv_abs_mean_raw",
    "completion_len",
    "batch_size",
}


@pytest.fixture
def open_server(tmp_path: Path, model_cache: Path) -> Iterator[LiveServer]:
    """No API keys, as CLaaS runs (its plugin and eval send none)."""
    live = make_server(tmp_path, model_cache, max_tokens_cap=256)
    yield live
    live.close()


def answer(live: LiveServer, model: str, question: str, **fields: Any) -> tuple[str, str]:
    """Chat as OpenClaw does (a system prompt, then the user); the completion id and the
    visible text the plugin would quote (trimmed). Sampled: the tiny model's greedy answer is
    blank lines, which the plugin would not quote."""
    headers = fields.pop("h", {})
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": question},
    ]
    sampling = {"temperature": 1.0, "seed": 1, **fields}
    response = chat(live, model, messages=messages, h=headers, **sampling)
    assert response.status_code == 200, response.text
    body = response.json()
    text = body["choices"][0]["message"]["content"].strip()
    assert text, "the tiny model's answer is blank; pick another question"
    return body["id"], text


def claas_item(lora_id: str, prompt: str, response: str, **fields: Any) -> dict[str, Any]:
    return {
        "lora_id": lora_id,
        "prompt": prompt,
        "response": response,
        "feedback": FEEDBACK,
        **fields,
    }


# ---------------------------------------------------------------------------------------------
# The OpenClaw plugin and the init container
# ---------------------------------------------------------------------------------------------


def test_the_openclaw_plugin_batch_trains_and_is_answered_in_claas_shape(
    open_server: LiveServer,
) -> None:
    live = open_server
    # init-stack.py (tinker profile): list with the name as prefix, init the -latest alias if
    # it is not listed; a second run finds it and skips.
    listed = live.client.get("/v1/lora", params={"prefix": "openclaw/assistant"}).json()
    assert "openclaw/assistant-latest" not in listed["loras"]
    init = live.client.post(
        "/v1/lora/init", json={"lora_id": "openclaw/assistant-latest", "base_model": "tiny-llama"}
    )
    assert init.status_code == 200, init.text
    assert init.json() == {"lora_id": "openclaw/assistant", "versions_removed": 0}
    listed = live.client.get("/v1/lora", params={"prefix": "openclaw/assistant"}).json()
    assert listed == {"loras": ["openclaw/assistant", "openclaw/assistant-latest"]}

    questions = ["Explain how a rainbow forms.", "Why is the sky blue?"]
    answers = [answer(live, "openclaw/assistant", q, max_tokens=12) for q in questions]
    # The plugin's batch, verbatim: its loraId default, `training: {}`, its orchestration.
    body = {
        "requests": [
            claas_item("openclaw/assistant-latest", q, text, training={})
            for q, (_, text) in zip(questions, answers, strict=True)
        ],
        "orchestration": PLUGIN_ORCHESTRATION,
    }
    response = live.client.post("/v1/feedback", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["status"] == "ok"
    assert result["lora_id"] == "openclaw/assistant" and result["batch_size"] == 2
    assert result["vllm"] == {"slept": False, "woke": False}
    assert "not needed" in result["orchestration_note"]
    timing = result["timing_ms"]
    assert set(timing) == {"sleep", "distill", "save", "wake", "logprobs", "total"}
    assert timing["sleep"] == timing["wake"] == 0
    assert timing["total"] >= timing["distill"] + timing["save"]  # the call holds the step

    # What the plugin reads: total_loss and tokens_processed, from distill_result.metadata.
    record = live.client.get(result["feedback_log_path"]).json()
    meta = result["distill_result"]["metadata"]
    tokens = [
        len(live.runtime.store.get_rollout(completion_id).response_tokens)
        for completion_id, _ in answers
    ]
    assert meta["tokens_processed"] == sum(tokens) and meta["batch_size"] == 2
    assert meta["total_loss"] == record["metrics"]["loss"] > 0
    assert meta["distill_loss"] == pytest.approx(meta["total_loss"])  # kl_reg_weight 0
    assert meta["grad_norm"] > 0 and meta["loss_fn"] == "cross_entropy"
    assert "adv_mean" not in meta  # CLaaS's eval takes adv_mean as its Tinker engine's metrics
    assert len(meta["teacher_scored_texts"]) == 2 and FEEDBACK in meta["teacher_scored_texts"][0]

    # One CLaaS call is one optimizer step; the next chat is served by the new version.
    assert record["status"] == "done" and record["version"] == meta["version"] == 2
    assert record["training"]["steps_per_batch"] == 1
    assert record["metrics"]["steps_per_batch_applied"] == 1
    adapter = live.client.get("/v1/adapters/openclaw/assistant").json()
    assert adapter["current_version"] == 2

    # A second init-stack run finds the alias listed and does not init again.
    listed = live.client.get("/v1/lora", params={"prefix": "openclaw/assistant"}).json()
    assert "openclaw/assistant-latest" in listed["loras"]


def test_the_readme_quickstart_body_and_claas_bodies_share_the_route(
    open_server: LiveServer,
) -> None:
    live = open_server
    init = live.client.post("/v1/lora/init", json={"lora_id": "user/my-lora"})
    assert init.json()["lora_id"] == "user/my-lora"
    question = "Write a function to calculate factorial"
    completion_id, text = answer(live, "user/my-lora", question)
    quickstart = {"requests": [claas_item("user/my-lora", question, text)]}  # no training
    result = live.client.post("/v1/feedback", json=quickstart).json()
    assert result["status"] == "ok" and result["distill_result"]["metadata"]["version"] == 2

    # claas's own body on the same path: queued (202) in claas's shape, with claas's errors.
    item = {"completion_id": completion_id, "feedback": FEEDBACK}
    queued = live.client.post("/v1/feedback", json={"items": [item]})
    assert queued.status_code == 202 and set(queued.json()) == {"feedback_id", "status", "lora_id"}
    status, message = error_of(live.client.post("/v1/feedback", json={"items": []}))
    assert status == 422 and message.startswith("invalid request: items: ")
    # A CLaaS body's errors name CLaaS's fields, as the client sent them.
    status, message = error_of(
        live.client.post("/v1/feedback", json={"requests": [{"lora_id": "user/my-lora"}]})
    )
    assert status == 422 and "requests.0.prompt: Field required" in message
    assert "items" not in message
    both = {"items": [item], "requests": quickstart["requests"]}
    assert error_of(live.client.post("/v1/feedback", json=both))[0] == 422

    # wait=false is honoured for a CLaaS body: queued, in CLaaS's shape, nothing trained yet.
    later = live.client.post("/v1/feedback?wait=false", json=quickstart)
    assert later.status_code == 202
    assert later.json()["status"] in ("queued", "running")
    assert later.json()["distill_result"] is None


# ---------------------------------------------------------------------------------------------
# The eval
# ---------------------------------------------------------------------------------------------


def test_the_eval_loop_inits_afresh_and_repeats_its_batch(open_server: LiveServer) -> None:
    live = open_server
    init = {"lora_id": "eval/concise", "base_model": "tiny-llama"}
    lora_id = live.client.post("/v1/lora/init", json=init).json()["lora_id"]
    question = "Tell me about the sea."
    _, text = answer(live, lora_id, question)
    body = {
        "requests": [claas_item(lora_id, question, text, training=EVAL_TRAINING)],
        "orchestration": EVAL_ORCHESTRATION,
    }
    # runner.py sends the same batch steps_per_batch times, one optimizer step each.
    versions = []
    for _ in range(2):
        response = live.client.post("/v1/feedback", json=body)
        assert response.status_code == 200, response.text
        meta = response.json()["distill_result"]["metadata"]
        assert {"distill_loss", "kl_reg", "mean_is_ratio", "clip_fraction"} <= set(meta)
        assert meta["lr"] == EVAL_TRAINING["learning_rate"]
        versions.append(meta["version"])
    assert versions == [2, 3]

    # A new eval run inits the same id: CLaaS's init starts it afresh.
    again = live.client.post("/v1/lora/init", json=init).json()
    assert again == {"lora_id": "eval/concise", "versions_removed": 3}
    versions_now = live.client.get("/v1/adapters/eval/concise").json()["versions"]
    assert [v["version"] for v in versions_now] == [1]
    # ... but never with another spec: that would remove versions for an init that may fail.
    status, message = error_of(live.client.post("/v1/lora/init", json={**init, "lora_r": 8}))
    assert status == 409 and "DELETE /v1/lora?lora_id=eval/concise" in message


def test_distill_loss_is_the_loss_without_the_pull_to_the_base(open_server: LiveServer) -> None:
    """CLaaS: total_loss = distill_loss + kl_reg_weight·kl_reg. A first call moves the adapter
    far from the base, so the second one's k3 term is large enough to tell them apart."""
    live = open_server
    live.client.post("/v1/lora/init", json={"lora_id": "eval/pull"})
    question = "Tell me about the sea."
    _, text = answer(live, "eval/pull", question)
    for training in ({"learning_rate": 0.05}, {**EVAL_TRAINING, "kl_reg_weight": 0.5}):
        body = {"requests": [claas_item("eval/pull", question, text, training=training)]}
        response = live.client.post("/v1/feedback", json=body)
        assert response.status_code == 200, response.text
    meta = response.json()["distill_result"]["metadata"]
    assert meta["kl_reg"] > 1e-4
    assert meta["total_loss"] - meta["distill_loss"] == pytest.approx(0.5 * meta["kl_reg"])


def _sampled_logprobs(model: Any, prompt: list[int], response: list[int]) -> np.ndarray:
    """log p(y_t | prefix) of each response token, in float64, by a plain forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logp[rows, torch.tensor(response)].numpy()


def test_scalar_mode_reports_claas_advantages_per_token(
    open_server: LiveServer, model_cache: Path
) -> None:
    """CLaaS's Tinker engine: per sample, Δ_t = teacher − student log-prob of y_t,
    gain = clamp(0.03 / mean|Δ|, 1, 4), A_t = kl_coef·gain·Δ_t; adv_abs_mean = mean_t |A_t|,
    averaged over samples. Where the gain is not clamped, adv_abs_mean is the gain's target
    0.03·kl_coef per token (the 1 / (B·T) scale the datum carries made it B·T times smaller);
    two answers of different lengths make the per-sample means differ from token-weighted
    ones."""
    live = open_server
    live.client.post("/v1/lora/init", json={"lora_id": "eval/scalar"})
    questions = ["Tell me about the sea.", "Name three colours."]
    answers = [
        answer(live, "eval/scalar", q, max_tokens=n)
        for q, n in zip(questions, [4, 11], strict=True)
    ]
    kl_coef = 0.7
    training = {**EVAL_TRAINING, "use_topk_divergence": False, "kl_coef": kl_coef}
    body = {
        "requests": [
            claas_item("eval/scalar", q, text, training=training)
            for q, (_, text) in zip(questions, answers, strict=True)
        ],
        "orchestration": EVAL_ORCHESTRATION,
    }
    response = live.client.post("/v1/feedback", json=body)
    assert response.status_code == 200, response.text
    meta = response.json()["distill_result"]["metadata"]
    assert set(meta) >= TINKER_KEYS and meta["loss_fn"] == "importance_sampling"

    base = tiny_llama(model_cache, seed=0)  # the server's weights; the new adapter adds zero
    deltas, gains, lengths = [], [], []
    for completion_id, _ in answers:
        rollout = live.runtime.store.get_rollout(completion_id)
        response_tokens = rollout.response_tokens
        student = _sampled_logprobs(base.model, rollout.prompt_tokens, response_tokens)
        # The reference is sound only if the served version is the base model: it sampled
        # these very log-probs.
        np.testing.assert_allclose(rollout.behavior_logprobs, student, atol=1e-4)
        teacher_prompt = rollout_teacher_prompt_tokens(
            base.tokenizer, rollout.messages, "chat", FEEDBACK
        )
        teacher = _sampled_logprobs(base.model, teacher_prompt, response_tokens)
        delta = teacher - student
        deltas.append(delta)
        gains.append(min(max(0.03 / np.abs(delta).mean(), 1.0), 4.0))
        lengths.append(len(response_tokens))
    assert lengths[0] != lengths[1]
    advantages = [kl_coef * g * d for g, d in zip(gains, deltas, strict=True)]
    expected = {
        "adv_abs_mean": np.mean([np.abs(a).mean() for a in advantages]),
        "adv_mean": np.mean([a.mean() for a in advantages]),
        "adv_abs_mean_raw": np.mean([np.abs(d).mean() for d in deltas]),
        "kl_mean": np.mean([d.mean() for d in deltas]),
        "kl_gain": np.mean(gains),
        "effective_kl_coef": kl_coef * np.mean(gains),
    }
    for key, value in expected.items():
        assert meta[key] == pytest.approx(value, rel=1e-3, abs=1e-7), key
    assert meta["completion_len"] == sum(lengths) and meta["batch_size"] == 2


# ---------------------------------------------------------------------------------------------
# Keys, and what is refused
# ---------------------------------------------------------------------------------------------


def test_one_owner_cannot_reach_anothers_lora_through_claas_routes(keyed: LiveServer) -> None:
    live = keyed
    init = live.client.post("/v1/lora/init", json={"lora_id": "alice/a"}, headers=ALICE)
    assert init.status_code == 200, init.text
    _, text = answer(live, "alice/a", "Hello there!", h=ALICE)
    assert live.client.post("/v1/lora/init", json={"lora_id": "alice/b"}).status_code == 401

    foreign = [
        live.client.post("/v1/lora/init", json={"lora_id": "alice/a"}, headers=BOB),
        live.client.delete("/v1/lora", params={"lora_id": "alice/a"}, headers=BOB),
        live.client.delete("/v1/lora", params={"lora_id": "alice/none"}, headers=BOB),
        live.client.get("/v1/lora/export", params={"lora_id": "alice/a-latest"}, headers=BOB),
        live.client.post(
            "/v1/feedback",
            json={"requests": [claas_item("alice/a-latest", "Hello there!", text)]},
            headers=BOB,
        ),
    ]
    for response in foreign:
        assert response.status_code == 403, (response.request.url, response.status_code)
        assert "cannot reach" in error_of(response)[1]
    assert live.client.get("/v1/lora", headers=BOB).json() == {"loras": []}
    assert live.client.get("/v1/lora", headers=ADMIN).json() == {
        "loras": ["alice/a", "alice/a-latest"]
    }
    versions = live.client.get("/v1/adapters/alice/a", headers=ALICE).json()["versions"]
    assert len(versions) == 1  # nothing bob sent trained, reset or deleted it

    exported = live.client.get(
        "/v1/lora/export", params={"lora_id": "alice/a-latest"}, headers=ALICE
    )
    assert exported.status_code == 200 and exported.content[:2] == b"PK"
    assert 'filename="alice__a-latest.zip"' in exported.headers["content-disposition"]
    deleted = live.client.delete("/v1/lora", params={"lora_id": "alice/a"}, headers=ALICE)
    assert deleted.json() == {"deleted": True}
    again = live.client.delete("/v1/lora", params={"lora_id": "alice/a"}, headers=ALICE)
    assert again.json() == {"deleted": False}  # idempotent, as in CLaaS


def test_what_claas_cannot_honour_is_refused_with_what_to_do(open_server: LiveServer) -> None:
    live = open_server
    live.client.post("/v1/lora/init", json={"lora_id": "user/x"})
    _, text = answer(live, "user/x", "Hello there!")
    live.client.post("/v1/lora/init", json={"lora_id": "user/y"})
    _, other = answer(live, "user/y", "Hello there!")
    cases = [
        # CLaaS's default base model is not served here.
        (
            "post",
            "/v1/lora/init",
            {"lora_id": "user/q", "base_model": "Qwen/Qwen3-8B"},
            422,
            "not allowed here",
        ),
        ("post", "/v1/lora/init", {"lora_id": "user/q", "lora_r": 512}, 422, "lora_r"),
        ("post", "/v1/lora/init", {"lora_id": "user/q", "lora_dropout": 0.1}, 422, "lora_dropout"),
        ("post", "/v1/lora/init", {"lora_id": "a/b/c"}, 422, "owner/name"),
        (
            "post",
            "/v1/lora/init",
            {"lora_id": "user/q", "target_modules": ["conv"]},
            422,
            "target_modules",
        ),
        # Deleting an alias in CLaaS removed the alias only; claas has none to remove.
        ("delete", "/v1/lora?lora_id=user/x-latest", None, 422, "lora_id=user/x"),
        ("get", "/v1/lora/export?lora_id=user/none", None, 404, "POST /v1/lora/init"),
        (
            "post",
            "/v1/feedback",
            {"requests": [claas_item("user/x", "Hello there!", text, training={"alpha": 2})]},
            422,
            "alpha",
        ),
        (
            "post",
            "/v1/feedback",
            {"requests": [claas_item("user/x", "Hello there!", "words never said")]},
            404,
            "chat again",
        ),
        (
            "post",
            "/v1/feedback",
            {
                "requests": [
                    claas_item("user/x", "Hello there!", text),
                    claas_item("user/y", "Hello there!", other),
                ]
            },
            422,
            "different adapters",
        ),
        (
            "post",
            "/v1/feedback",
            {
                "requests": [claas_item("user/x", "Hello there!", text)],
                "orchestration": {"sleep_level": 3},
            },
            422,
            "sleep_level",
        ),
    ]
    for method, path, body, status, fragment in cases:
        response = live.client.request(method, path, json=body)
        got, message = error_of(response)
        assert (got, fragment in message) == (status, True), (path, body, message)


def test_a_failed_step_is_an_error_the_plugin_retries(
    open_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = open_server
    live.client.post("/v1/lora/init", json={"lora_id": "user/x"})
    _, text = answer(live, "user/x", "Hello there!")

    async def broken(*args: Any, **kwargs: Any) -> Any:  # one injected training failure
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(live.runtime.engine, "distill", broken)
    body = {"requests": [claas_item("user/x", "Hello there!", text)]}
    status, message = error_of(live.client.post("/v1/feedback", json=body))
    assert status == 500 and "out of memory (injected)" in message
    assert "last good version" in message
    assert live.client.get("/v1/adapters/user/x").json()["current_version"] == 1


def test_fuzzed_claas_requests_never_get_a_5xx(open_server: LiveServer) -> None:
    """schemathesis on the CLaaS routes and the shared feedback route: documented statuses
    and bodies only, never a 5xx."""
    live = open_server
    live.client.post("/v1/lora/init", json={"lora_id": "fuzz/target"})
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    every = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the schema of each operation is valid
        every.append(result.ok())
    operations = [op for op in every if "/v1/lora" in op.path or op.path == "/v1/feedback"]
    assert len(operations) == 6  # 4 CLaaS routes, claas's feedback submit and log
    checks = [
        schemathesis.checks.not_a_server_error,
        schemathesis.checks.status_code_conformance,
        schemathesis.checks.content_type_conformance,
        schemathesis.checks.response_schema_conformance,
    ]
    calls: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=12,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def conforms(case: Any) -> None:
            response = case.call(base_url=live.url, timeout=120)
            calls.append(response.status_code)
            case.validate_response(response, checks=checks)

        conforms()
    assert len(calls) >= 5 * len(operations)
    assert any(code < 300 for code in calls) and any(400 <= code < 500 for code in calls)


def test_claas_clients_chat_and_score_under_their_own_model_names(keyed: LiveServer) -> None:
    """The OpenClaw config chats as `openclaw-assistant-latest` and the eval as `eval-concise`
    (`derive_model_name`, the flat names CLaaS gave vLLM); `owner/name-latest` is the init's
    alias. All reach the adapter's current version, and only the owner's; `/v1/score` answers
    with the `logprob_sum` the eval reads."""
    for lora_id in ("alice/assistant-latest", "alice/concise"):
        init = keyed.client.post("/v1/lora/init", json={"lora_id": lora_id}, headers=ALICE)
        assert init.status_code == 200, init.text
    for model, lora_id in [
        ("alice-assistant-latest", "alice/assistant"),
        ("alice/assistant-latest", "alice/assistant"),
        ("alice-concise", "alice/concise"),
    ]:
        completion_id, _ = answer(keyed, model, "What is the sea?", h=ALICE, max_tokens=8)
        rollout = keyed.runtime.store.get_rollout(completion_id)
        assert (rollout.lora_id, rollout.adapter_version) == (lora_id, 1), model
    refused = chat(keyed, "alice-concise", h=BOB, max_tokens=4)
    assert refused.status_code == 404, refused.text  # bob's names never reach alice's adapters

    messages = [{"role": "user", "content": "What is the sea?"}]
    score = keyed.client.post(
        "/v1/score",
        json={"model": "alice-concise", "messages": messages, "completion": "A body of water."},
        headers=ALICE,
    )
    assert score.status_code == 200, score.text
    body = score.json()
    assert body["logprob_sum"] == pytest.approx(sum(body["logprobs"]))
    assert body["completion_tokens"] == len(body["logprobs"]) and body["prompt_tokens"] > 0
