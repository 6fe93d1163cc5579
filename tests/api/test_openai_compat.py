"""OpenAI's behaviour, checked with the official `openai` client (sync and async, streaming and
not) against a real server on 127.0.0.1 with the tiny random Llama.

Each test compares with something independent of the code under test: the same request without
the field, a reference decode loop, or the numbers OpenAI's own types require.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import torch
from openai.types.chat import ChatCompletionMessageParam
from serving import ALICE, BOB, LiveServer, create

from claas.models import LoadedModel
from claas.services.local.decoding import (
    SampleStream,
    SamplingRule,
    apply_logit_rules,
    generate,
    prefill,
)
from claas.services.protocol import HOSTED_TINKER

pytestmark = pytest.mark.heavy

PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me about the sea."}]


_CLIENTS: dict[tuple[str, str], openai.OpenAI] = {}


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    """Each test's OpenAI clients are closed after it, with their connections."""
    yield
    for opened in _CLIENTS.values():
        opened.close()
    _CLIENTS.clear()


def client(live: LiveServer, key: str = "sk-alice") -> openai.OpenAI:
    """The test's one OpenAI client for this server and key."""
    if (live.url, key) not in _CLIENTS:
        _CLIENTS[live.url, key] = openai.OpenAI(
            base_url=f"{live.url}/v1", api_key=key, max_retries=0
        )
    return _CLIENTS[live.url, key]


def greedy(live: LiveServer, model: str, **fields: Any) -> Any:
    return client(live).chat.completions.create(
        model=model,
        messages=PROMPT,
        temperature=0,
        max_tokens=fields.pop("max_tokens", 24),
        **fields,
    )


# -- streaming ------------------------------------------------------------------------------------
def test_a_stream_has_no_usage_chunk_unless_asked(keyed: LiveServer) -> None:
    create(keyed, "alice/s", ALICE)
    chunks = list(greedy(keyed, "alice/s", stream=True))
    # The common client loop: every chunk has a choice.
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert text == greedy(keyed, "alice/s").choices[0].message.content

    counted = list(greedy(keyed, "alice/s", stream=True, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage is not None
    assert all(chunk.choices and chunk.usage is None for chunk in counted[:-1])
    whole = greedy(keyed, "alice/s")
    assert counted[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_async_client_streams_and_answers(keyed: LiveServer) -> None:
    create(keyed, "alice/a", ALICE)

    async def run() -> tuple[str, str, str]:
        async with openai.AsyncOpenAI(
            base_url=f"{keyed.url}/v1", api_key="sk-alice", max_retries=0
        ) as aclient:
            whole = await aclient.chat.completions.create(
                model="alice/a", messages=PROMPT, temperature=0, max_tokens=20
            )
            stream = await aclient.chat.completions.create(
                model="alice/a", messages=PROMPT, temperature=0, max_tokens=20, stream=True
            )
            pieces = [chunk.choices[0].delta.content or "" async for chunk in stream]
            text = await aclient.completions.create(
                model="alice/a", prompt="The sea", temperature=0, max_tokens=8
            )
            return whole.choices[0].message.content or "", "".join(pieces), text.id

    whole, streamed, text_id = asyncio.run(run())
    assert whole and streamed == whole
    assert text_id.startswith("cmpl-")


# -- stop strings ------------------------------------------------------------------------------
def test_the_stop_string_is_left_out_of_the_text(keyed: LiveServer) -> None:
    create(keyed, "alice/stop", ALICE)
    free = greedy(keyed, "alice/stop", max_tokens=40).choices[0].message.content
    assert free is not None and len(free) > 12
    stop = free[8:11]  # three characters from inside the free answer
    expected = free[: free.find(stop)]

    stopped = greedy(keyed, "alice/stop", max_tokens=40, stop=[stop])
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"

    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in greedy(keyed, "alice/stop", max_tokens=40, stop=stop, stream=True)
    ]
    assert "".join(pieces) == expected
    assert not any(stop in piece for piece in pieces)

    # Feedback by text matches what the user saw, without the stop string.
    rollout = keyed.runtime.store.get_rollout(stopped.id)
    assert rollout.response_text == expected


# -- refused, never ignored ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("reasoning_effort", "high"),
    ],
)
def test_what_cannot_be_honoured_is_refused_with_400_naming_the_field(
    keyed: LiveServer, field: str, value: Any
) -> None:
    create(keyed, "alice/r", ALICE)
    with pytest.raises(openai.BadRequestError) as refused:
        greedy(keyed, "alice/r", **{field: value})
    assert refused.value.param == field
    assert field in refused.value.message


def test_neutral_values_of_openai_fields_are_accepted(keyed: LiveServer) -> None:
    create(keyed, "alice/n", ALICE)
    answer = greedy(
        keyed,
        "alice/n",
        response_format={"type": "text"},
        tool_choice="none",
        user="u-1",
        metadata={"k": "v"},
        store=True,
    )
    assert answer.choices[0].message.content == greedy(keyed, "alice/n").choices[0].message.content


def test_unknown_fields_and_bad_values_name_the_param(keyed: LiveServer) -> None:
    create(keyed, "alice/u", ALICE)
    with pytest.raises(openai.UnprocessableEntityError) as unknown:
        greedy(keyed, "alice/u", extra_body={"temprature": 0.5})
    assert unknown.value.param == "temprature"
    with pytest.raises(openai.UnprocessableEntityError) as too_many:
        greedy(keyed, "alice/u", logprobs=True, top_logprobs=21)
    assert too_many.value.param == "top_logprobs"
    with pytest.raises(openai.UnprocessableEntityError) as capped:
        greedy(keyed, "alice/u", max_tokens=10**6)
    assert capped.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        greedy(keyed, "alice/nope")
    assert missing.value.param == "model"


# -- logit rules ----------------------------------------------------------------------------------
def test_logit_bias_forces_a_token_and_log_probs_stay_the_models(keyed: LiveServer) -> None:
    create(keyed, "alice/b", ALICE)
    plain = greedy(keyed, "alice/b", max_tokens=4, logprobs=True, top_logprobs=5)
    first = plain.choices[0].logprobs.content[0]
    runner_up = first.top_logprobs[1]
    runner_up_id = tokenizer_id(keyed, runner_up.bytes)

    biased = greedy(
        keyed, "alice/b", max_tokens=4, logprobs=True, logit_bias={str(runner_up_id): 100}
    )
    content = biased.choices[0].logprobs.content
    assert all(tokenizer_id(keyed, c.bytes) == runner_up_id for c in content)  # every step
    # The reported log-prob is the model's own, not the biased distribution's (which is ~0).
    assert content[0].logprob == pytest.approx(runner_up.logprob, abs=1e-5)

    banned = greedy(
        keyed,
        "alice/b",
        max_tokens=4,
        logprobs=True,
        logit_bias={str(tokenizer_id(keyed, first.bytes)): -100},
    )
    assert tokenizer_id(keyed, banned.choices[0].logprobs.content[0].bytes) == runner_up_id


def tokenizer_id(live: LiveServer, raw: list[int] | None) -> int:
    assert raw is not None
    ids = live.runtime.tokenizer.encode(bytes(raw).decode(), add_special_tokens=False)
    assert len(ids) == 1, ids
    return int(ids[0])


def test_penalties_match_a_reference_decode_loop(tiny: LoadedModel) -> None:
    """`generate` with OpenAI's penalties and bias against a plain loop that runs the whole
    sequence each step and applies the rules by counting tokens in Python."""
    model, prompt = tiny.model, torch.tensor([1, 17, 230, 94, 5, 61], dtype=torch.long)
    rule = SamplingRule(
        temperature=0.0,
        top_k=-1,
        top_p=1.0,
        presence_penalty=0.7,
        frequency_penalty=0.9,
        logit_bias=((37, 3.0), (51, -2.0)),
    )
    with torch.inference_mode():
        logits, cache = prefill(model, prompt, keep=1)
        stream = SampleStream(1, 24, rule, [], None, torch.Generator())
        ours = generate(model, logits[-1], cache, stream)[0]
        sequence = prompt.tolist()
        expected: list[int] = []
        for _ in range(24):
            raw = model(input_ids=torch.tensor([sequence])).logits[0, -1]
            counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=len(raw))
            ruled = apply_logit_rules(raw[None], rule, counts[None].float() if expected else None)
            step = raw.double()
            raw_logprobs = step.log_softmax(-1)
            step[37] += 3.0
            step[51] -= 2.0
            for token in set(expected):
                step[token] -= 0.9 * expected.count(token) + 0.7
            assert torch.allclose(ruled[0].double(), step, atol=1e-4)  # the rules, value by value
            chosen = int(step.argmax())
            expected.append(chosen)
            sequence.append(chosen)
            assert ours.logprobs[len(expected) - 1] == pytest.approx(
                float(raw_logprobs[chosen]), abs=1e-4
            )
    assert ours.tokens == expected
    plain = SamplingRule(temperature=0.0, top_k=-1, top_p=1.0)
    with torch.inference_mode():
        logits, cache = prefill(model, prompt, keep=1)
        stream = SampleStream(1, 24, plain, [], None, torch.Generator())
        unpenalised = generate(model, logits[-1], cache, stream)
    assert unpenalised[0].tokens != expected  # the rules changed the answer


def test_penalties_are_refused_where_the_service_cannot_apply_them(keyed: LiveServer) -> None:
    """The local service declares itself as hosted Tinker (a stand-in: Tinker cannot run here),
    which has no penalties: the request is refused, not sampled without them."""
    create(keyed, "alice/t", ALICE)
    keyed.runtime.chat.service.capabilities = HOSTED_TINKER  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as refused:
        greedy(keyed, "alice/t", frequency_penalty=0.5)
    assert refused.value.param == "frequency_penalty"
    assert greedy(keyed, "alice/t").choices[0].message.content  # without it, it answers


# -- log-probs ------------------------------------------------------------------------------------
def test_top_logprobs_are_the_likeliest_tokens_as_text_and_bytes(keyed: LiveServer) -> None:
    create(keyed, "alice/l", ALICE)
    answer = greedy(keyed, "alice/l", max_tokens=16, logprobs=True, top_logprobs=20)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens or (
        answer.choices[0].finish_reason == "stop"
        and len(content) == answer.usage.completion_tokens - 1
    )
    joined = b"".join(bytes(c.bytes or []) for c in content)
    assert joined.decode() == answer.choices[0].message.content  # the bytes make up the text
    for item in content:
        tops = item.top_logprobs
        assert len(tops) == 20
        values = [t.logprob for t in tops]
        assert values == sorted(values, reverse=True)
        assert sum(math.exp(v) for v in values) <= 1 + 1e-5
        assert (item.token, item.logprob) == (tops[0].token, tops[0].logprob)  # greedy: the top
        assert all("Ġ" not in t.token for t in tops)  # text, not byte-level BPE pieces
        for t in tops:
            if not t.token.startswith("bytes:"):
                assert bytes(t.bytes or []).decode() == t.token

    streamed = list(greedy(keyed, "alice/l", max_tokens=16, logprobs=True, stream=True))
    last = next(chunk for chunk in streamed if chunk.choices and chunk.choices[0].finish_reason)
    assert [c.logprob for c in last.choices[0].logprobs.content] == pytest.approx(
        [c.logprob for c in content], abs=1e-6
    )


def test_completions_have_cmpl_ids_and_integer_logprobs(keyed: LiveServer) -> None:
    create(keyed, "alice/c", ALICE)
    answer = client(keyed).completions.create(
        model="alice/c", prompt="The sea is", temperature=0, max_tokens=10, logprobs=3
    )
    assert answer.id.startswith("cmpl-")
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == answer.choices[0].text
    assert logprobs.text_offset == [
        sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))
    ]
    for token, value, top in zip(
        logprobs.tokens, logprobs.token_logprobs or [], logprobs.top_logprobs, strict=True
    ):
        assert len(top) <= 3 and top[token] == pytest.approx(value)  # greedy: in its own top 3
    stream = client(keyed).completions.create(
        model="alice/c", prompt="The sea is", temperature=0, max_tokens=10, stream=True
    )
    chunks = list(stream)
    assert all(chunk.id.startswith("cmpl-") for chunk in chunks)
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    assert keyed.runtime.store.get_rollout(chunks[0].id).prompt_format == "text"
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client(keyed).completions.create(model="alice/c", prompt="x", logprobs=6)
    assert refused.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as echo:
        client(keyed).completions.create(model="alice/c", prompt="x", echo=True)
    assert echo.value.param == "echo"


# -- models ---------------------------------------------------------------------------------------
def test_models_carry_created_and_owner_and_can_be_retrieved(keyed: LiveServer) -> None:
    create(keyed, "alice/m", ALICE)
    create(keyed, "bob/m", BOB)
    alice = client(keyed)
    listed = {m.id: m for m in alice.models.list()}
    assert set(listed) == {keyed.runtime.base_model, "alice/m"}
    assert listed["alice/m"].owned_by == "alice" and listed["alice/m"].created > 0
    assert listed[keyed.runtime.base_model].owned_by == "claas"
    one = alice.models.retrieve("alice/m")
    assert (one.id, one.owned_by, one.created) == ("alice/m", "alice", listed["alice/m"].created)
    assert alice.models.retrieve(keyed.runtime.base_model).id == keyed.runtime.base_model
    with pytest.raises(openai.PermissionDeniedError):
        alice.models.retrieve("bob/m")  # another owner's name, refused as chat refuses it
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve("alice/none")


def test_a_stream_sends_what_it_held_back_and_equals_the_plain_answer(keyed: LiveServer) -> None:
    """A stop string whose start matches the answer's end is held back while streaming; when it
    never completes, the held-back text is still sent before the finish chunk."""
    create(keyed, "alice/tail", ALICE)
    free = greedy(keyed, "alice/tail", max_tokens=10).choices[0].message.content
    assert free
    stop = free[-1] + "☃ZZ"  # begins with the answer's last character, never completes
    plain = greedy(keyed, "alice/tail", max_tokens=10, stop=[stop]).choices[0].message.content
    assert plain == free
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in greedy(keyed, "alice/tail", max_tokens=10, stop=[stop], stream=True)
    ]
    assert "".join(pieces) == free


def test_log_probs_cover_exactly_the_text_when_a_stop_string_cuts_it(keyed: LiveServer) -> None:
    create(keyed, "alice/cut", ALICE)
    free = greedy(keyed, "alice/cut", max_tokens=40).choices[0].message.content
    assert free is not None and len(free) > 12
    stop = free[8:11]
    cut = greedy(keyed, "alice/cut", max_tokens=40, stop=[stop], logprobs=True)
    text = cut.choices[0].message.content
    content = cut.choices[0].logprobs.content
    joined = b"".join(bytes(c.bytes or []) for c in content)
    assert joined.startswith(text.encode()) and len(joined) - len(text.encode()) < 8
    assert len(content) < cut.usage.completion_tokens  # the stop string's tokens are left out
    # sampled, for a varied text
    sampled: dict[str, Any] = {"temperature": 1.0, "seed": 5, "max_tokens": 30, "logprobs": 1}
    legacy = client(keyed).completions.create(model="alice/cut", prompt="The sea is", **sampled)
    whole = legacy.choices[0].text
    stop = next(whole[i : i + 2] for i in range(3, len(whole)) if whole.find(whole[i : i + 2]) == i)
    legacy = client(keyed).completions.create(
        model="alice/cut", prompt="The sea is", stop=stop, **sampled
    )
    tokens = legacy.choices[0].logprobs.tokens
    assert legacy.choices[0].text and "".join(tokens).startswith(legacy.choices[0].text)
    assert legacy.choices[0].logprobs.text_offset[-1] < len(legacy.choices[0].text)


def test_bad_input_to_a_stream_is_a_4xx_before_any_event(keyed: LiveServer) -> None:
    create(keyed, "alice/bad", ALICE)
    with pytest.raises(openai.UnprocessableEntityError) as bias:
        greedy(keyed, "alice/bad", stream=True, logit_bias={"99999999": 5})
    assert bias.value.param == "logit_bias"
    too_long = keyed.runtime.max_context  # with the prompt, over the context
    with pytest.raises(openai.UnprocessableEntityError) as context:
        greedy(keyed, "alice/bad", stream=True, max_tokens=min(too_long, 2048))
    assert context.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as options:
        greedy(keyed, "alice/bad", stream_options={"include_usage": True})
    assert options.value.param == "stream_options"
    assert greedy(keyed, "alice/bad", safety_identifier="u-1", prompt_cache_key="k").choices
