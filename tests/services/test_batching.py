"""Continuous batching across adapters: chats that run together give what they give alone.

The local service on the tiny random Llama, with adapters whose LoRA B matrices are drawn at
random (a fresh adapter's B is zero, which would make every adapter the base model and hide a
wrong row-to-adapter mapping). Each request runs alone first, then all run at once; tokens must
match exactly and log-probs to the dtype's tolerance. In float64, with strong adapters, the two
agree to 1e-6: the batched algorithm is exact, and a 2% error in one row's LoRA scaling fails.
In float32 (what serves), rounding differs between a batch of one and of five rows, and grows
along a sequence, so the adapters are milder and the tolerance is 2e-4. Float32 decoding runs
the base linears on oneDNN-packed weights (`PackedLinears`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_copies import private_copy
from serving import LiveServer, make_server
from tinker import types

from claas.errors import ServiceClosed
from claas.models import LoadedModel, tiny_llama
from claas.services.local import AdapterHost, LocalServiceClient, scheduler
from claas.services.local.decoding import SampleStream, SamplingRule
from claas.services.local.packed import PackedLinears
from claas.services.local.running_batch import DecodeJob
from claas.services.protocol import StopGeneration

PRECISIONS = {torch.float64: (1.5, 1e-6), torch.float32: (0.5, 2e-4)}  # B scale, tolerance


@pytest.fixture(scope="module")
def pristine(model_cache: Path) -> LoadedModel:
    """The tiny model, built once; each test's service gets a copy of it."""
    return tiny_llama(model_cache, seed=0)


@pytest.fixture(params=["float64", "float32"])
def service(
    request: pytest.FixtureRequest, pristine: LoadedModel, tmp_path: Path
) -> Iterator[LocalServiceClient]:
    loaded = private_copy(pristine)
    loaded.model.to(torch.float64 if request.param == "float64" else torch.float32)
    svc = LocalServiceClient(loaded, tmp_path / "checkpoints")
    yield svc
    svc.close()


def precision(service: LocalServiceClient) -> tuple[float, float]:
    return PRECISIONS[service.host.loaded.model.dtype]


def adapter_sampler(
    service: LocalServiceClient, seed: int, rank: int, alpha: float = 32, mlp: bool = True
) -> Any:
    """A snapshot sampler of an adapter with random A and B."""
    trainer = service.create_lora_training_client(
        service.base_model, rank=rank, seed=seed, lora_alpha=alpha, train_mlp=mlp
    ).result()
    scale, _ = precision(service)

    def randomise() -> None:
        generator = torch.Generator().manual_seed(seed)
        for name, param in service.host.adapter_parameters(trainer.adapter).items():
            if "lora_B" in name:
                drawn = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.data.copy_(drawn * scale)

    service.host.submit(randomise).result()
    return trainer.save_weights_and_get_sampling_client(kind="snapshot").result()


REQUESTS = [  # (prompt, n, max_tokens, temperature, seed)
    ([1, 17, 230, 94, 5], 1, 12, 0.0, None),
    ([1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], 1, 7, 0.0, None),
    ([1, 300], 2, 10, 1.0, 7),
    ([1, 17, 230, 94, 5, 61, 62], 1, 16, 1.0, 3),
    ([1, 9, 8, 7], 1, 9, 0.0, None),
    ([1, 250, 251], 1, 11, 1.0, 5),
]


def run(sampler: Any, prompt: list[int], n: int, max_tokens: int, temp: float, seed: Any) -> Any:
    params = types.SamplingParams(max_tokens=max_tokens, temperature=temp, seed=seed, stop=[])
    return sampler.sample(types.ModelInput.from_ints(prompt), n, params)


def greedy_job(
    prompt: list[int],
    adapter: str | None,
    max_tokens: int,
    on_token: Any = None,
) -> tuple[DecodeJob, Future[Any]]:
    """A greedy chat request handed to the decoder directly, and the future of its result
    (the adapter, if any, is already loaded)."""
    result: Future[Any] = Future()
    rule = SamplingRule(0.0, 0, 1.0)
    stream = SampleStream(1, max_tokens, rule, [], None, torch.Generator(), on_token)
    job = DecodeJob(
        torch.tensor(prompt), stream, adapter, lambda: None, result.set_result, result.set_exception
    )
    return job, result


def test_batched_decoding_matches_each_request_alone(service: LocalServiceClient) -> None:
    """Rows on the base model, on adapters of two ranks, two rank-4 adapters with different
    scalings (one with two rows, one with one: padded), and one adapter without MLP layers."""
    base = service.create_sampling_client(base_model=service.base_model).result()
    first = adapter_sampler(service, seed=1, rank=4)
    samplers = [
        base,
        first,
        adapter_sampler(service, seed=2, rank=8),
        adapter_sampler(service, seed=3, rank=4, alpha=12),
        first,
        adapter_sampler(service, seed=4, rank=4, mlp=False),
    ]
    alone = [run(s, *request).result() for s, request in zip(samplers, REQUESTS, strict=True)]

    async def together() -> list[types.SampleResponse]:
        futures = [run(s, *request) for s, request in zip(samplers, REQUESTS, strict=True)]
        return list(await asyncio.gather(*futures))

    batched = asyncio.run(together())
    _, tolerance = precision(service)
    assert service.host.decoder.widest_batch >= 7  # they did share a batch (6 requests, 7 rows)
    for one, many in zip(alone, batched, strict=True):
        assert len(one.sequences) == len(many.sequences)
        for a, b in zip(one.sequences, many.sequences, strict=True):
            assert a.tokens == b.tokens
            assert a.logprobs == pytest.approx(b.logprobs, abs=tolerance)
            assert a.stop_reason == b.stop_reason
    # The adapters really differ from the base and from each other (the mapping is tested).
    first_tokens = {tuple(r.sequences[0].tokens) for r in alone[:2]}
    assert len(first_tokens) == 2 or alone[0].sequences[0].logprobs != pytest.approx(
        alone[1].sequences[0].logprobs, abs=1e-3
    )


def test_a_request_that_leaves_does_not_disturb_the_others(service: LocalServiceClient) -> None:
    samplers = [adapter_sampler(service, seed=s, rank=4) for s in (1, 2)]
    alone = run(samplers[1], *REQUESTS[3]).result()
    seen: list[int] = []

    def leave_after_three(index: int, token: int, logprob: float) -> None:
        seen.append(token)
        if len(seen) == 3:
            raise StopGeneration  # the client went away

    async def together() -> tuple[Any, Any]:
        params = types.SamplingParams(max_tokens=30, temperature=0.0, stop=[])
        left = samplers[0].sample(
            types.ModelInput.from_ints([1, 5, 6, 7]), 1, params, on_token=leave_after_three
        )
        stays = run(samplers[1], *REQUESTS[3])
        return await left, await stays

    left, stays = asyncio.run(together())
    assert len(left.sequences[0].tokens) == 3
    assert stays.sequences[0].tokens == alone.sequences[0].tokens
    _, tolerance = precision(service)
    assert stays.sequences[0].logprobs == pytest.approx(alone.sequences[0].logprobs, abs=tolerance)


def test_requests_that_join_a_running_batch_get_their_own_adapters(
    service: LocalServiceClient,
) -> None:
    """Requests that join a running chat are prefilled on their own slots of the adapters laid
    out for the whole batch (the running rows' adapters come first): one joins at the second
    token (slot 1 of 2), two more together at the fourth (slots 2 and 3 of 4). Every answer is
    what it is alone."""
    samplers = [adapter_sampler(service, seed=s, rank=4) for s in (1, 2, 3, 4)]
    requests = [REQUESTS[0], REQUESTS[3], REQUESTS[4], REQUESTS[5]]
    alone = [run(s, *r).result() for s, r in zip(samplers, requests, strict=True)]
    tokens: list[int] = []
    joined: list[Any] = []

    def join_mid_decode(index: int, token: int, logprob: float) -> None:  # on the worker
        tokens.append(token)
        if len(tokens) == 2:
            joined.append(run(samplers[1], *requests[1]))
        elif len(tokens) == 4:  # both wait for the same admission
            joined.extend(run(s, *r) for s, r in zip(samplers[2:], requests[2:], strict=True))

    prompt, n, max_tokens, _, _ = requests[0]
    params = types.SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[])
    runner = samplers[0].sample(
        types.ModelInput.from_ints(prompt), n, params, on_token=join_mid_decode
    )
    answers = [runner.result(), *(future.result() for future in joined)]
    assert len(answers) == 4
    assert service.host.decoder.widest_batch >= 4
    _, tolerance = precision(service)
    for one, many in zip(alone, answers, strict=True):
        assert one.sequences[0].tokens == many.sequences[0].tokens
        assert one.sequences[0].logprobs == pytest.approx(many.sequences[0].logprobs, abs=tolerance)


def test_sixteen_concurrent_chats_on_four_adapters_store_correct_rollouts(
    tmp_path: Path, model_cache: Path
) -> None:
    # one owner's 16 chats at once: over the default limit of generations per owner
    live: LiveServer = make_server(tmp_path, model_cache, max_concurrent_generations_per_owner=16)
    try:
        adapters = [f"alice/a{i}" for i in range(4)]
        for i, lora_id in enumerate(adapters):
            spec = {"lora_id": lora_id, "rank": 4, "seed": i}
            assert live.client.post("/v1/adapters", json=spec).status_code == 201

        def body(i: int) -> dict[str, Any]:
            return {
                "model": adapters[i % 4],
                "messages": [{"role": "user", "content": f"Question number {i}?"}],
                "max_tokens": 6 + i % 5,
                "temperature": 0,
            }

        alone = [live.client.post("/v1/chat/completions", json=body(i)).json() for i in range(16)]
        answers: list[Any] = [None] * 16

        def ask(i: int) -> None:
            answers[i] = live.client.post("/v1/chat/completions", json=body(i))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert live.runtime.service.host.decoder.widest_batch > 1  # type: ignore[attr-defined]
        for i, response in enumerate(answers):
            assert response.status_code == 200, response.text
            answer = response.json()
            rollout = live.runtime.store.get_rollout(answer["id"])
            assert (rollout.lora_id, rollout.adapter_version) == (adapters[i % 4], 1)
            assert len(rollout.response_tokens) == answer["usage"]["completion_tokens"]
            expected = live.runtime.store.get_rollout(alone[i]["id"])
            assert rollout.response_tokens == expected.response_tokens
            assert rollout.behavior_logprobs == pytest.approx(expected.behavior_logprobs, abs=2e-4)
    finally:
        live.close()


def test_batched_log_probs_are_the_adapters_own(service: LocalServiceClient) -> None:
    """An independent reference: each batched answer, scored by one plain forward of the whole
    sequence with PEFT's own LoRA on that adapter (not the batched hooks)."""
    samplers = [adapter_sampler(service, seed=s, rank=r) for s, r in ((1, 4), (2, 8))]
    prompts = [[1, 17, 230, 94, 5], [1, 40, 41, 42, 43, 44, 45]]

    async def together() -> list[types.SampleResponse]:
        futures = [run(s, p, 1, 10, 0.0, None) for s, p in zip(samplers, prompts, strict=True)]
        return list(await asyncio.gather(*futures))

    _, tolerance = precision(service)
    for sampler, prompt, answer in zip(samplers, prompts, asyncio.run(together()), strict=True):
        tokens = answer.sequences[0].tokens
        reference = sampler.compute_logprobs(types.ModelInput.from_ints(prompt + tokens)).result()
        assert answer.sequences[0].logprobs == pytest.approx(
            reference[len(prompt) :], abs=max(tolerance, 1e-5)
        )


@pytest.mark.parametrize(
    "ids",
    [[[1, 17, 230, 94, 5], [1, 40, 41, 42, 43]], [[17]]],
    ids=["rows on the packed copies", "one row split across the threads"],
)
def test_packed_linears_give_the_plain_outputs_and_follow_in_place_changes(
    pristine: LoadedModel, ids: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = private_copy(pristine)
    model = loaded.model
    packed = PackedLinears(model)
    assert len(packed.layers) == 7 * model.config.num_hidden_layers + 1  # and the LM head
    product = torch.bmm  # the split GEMV's product: counted, to see that one row takes it
    calls: list[int] = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return product(*args)

    monkeypatch.setattr(torch, "bmm", counted)

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            plain = model(input_ids=torch.tensor(ids)).logits
            with packed.active():
                fast = model(input_ids=torch.tensor(ids)).logits
        return plain, fast

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one row is split over the threads: at least two, here
    try:
        plain, fast = both()
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        assert all("forward" not in layer.__dict__ for layer in packed.layers)  # restored
        with torch.no_grad():
            packed.layers[3].weight.mul_(1.02)  # a weight changed in place is followed
        plain_after, fast_after = both()
    finally:
        torch.set_num_threads(threads)
    assert (plain_after - plain).abs().max() > 1e-3
    torch.testing.assert_close(fast_after, plain_after, rtol=1e-5, atol=1e-5)
    assert bool(calls) is (len(ids) * len(ids[0]) == 1)  # one row, and only one, is split


@pytest.mark.parametrize("packed", [True, False])
def test_packed_weights_follow_the_setting(
    pristine: LoadedModel, tmp_path: Path, packed: bool
) -> None:
    host = AdapterHost(private_copy(pristine), packed_weights=packed)
    service = LocalServiceClient(host, tmp_path / "checkpoints")
    try:
        sampler = service.create_sampling_client(base_model=service.base_model).result()
        run(sampler, [1, 17, 230], 1, 4, 0.0, None).result()
        assert (host.decoder.batch.packed_weights.linears is not None) is packed
    finally:
        service.close()
        host.close()


@pytest.mark.parametrize("during", ["forward", "backward"])
def test_a_chat_sent_during_a_training_task_starts_inside_it_and_changes_nothing(
    pristine: LoadedModel, tmp_path: Path, during: str
) -> None:
    """A chat that arrives while a `forward_backward` runs gets its first token at the next
    yield point (a decoder layer of the forward, or of the backward), not after the task; the
    task's loss and gradients are bitwise those of the same task without the chat, and the
    chat's tokens are those it gets alone."""
    loaded = private_copy(pristine)
    service = LocalServiceClient(loaded, tmp_path / "checkpoints")
    try:
        trainer = service.create_lora_training_client(service.base_model, rank=4, seed=1).result()

        def perturb() -> None:  # non-zero B, so the adapter changes the logits and gradients
            generator = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for param in trainer.lora_parameters().values():
                    param.add_(0.05 * torch.randn(param.shape, generator=generator))

        service.host.submit(perturb).result()
        chat_sampler = adapter_sampler(service, seed=2, rank=4)
        solo = run(chat_sampler, [1, 40, 41, 42], 1, 6, 0.0, None).result()  # now resident
        tokens = [1, 17, 230, 94, 5, 61, 62, 63, 64, 65, 66]
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs={
                "target_tokens": types.TensorData.from_numpy(np.asarray(tokens[1:], np.int64)),
                "weights": types.TensorData.from_numpy(np.ones(len(tokens) - 1, np.float32)),
            },
        )
        fb: dict[str, Any] = {}
        first_token_inside: list[bool] = []

        def send_chat() -> None:  # from inside the training task, as a concurrent client would
            def on_token(sample: int, token: int, logprob: float) -> None:
                if not first_token_inside:
                    try:
                        fb["future"].result(timeout=0)
                    except TimeoutError:  # the training task has not returned yet
                        first_token_inside.append(True)
                    else:
                        first_token_inside.append(False)

            job, fb["chat"] = greedy_job([1, 40, 41, 42], chat_sampler.adapter, 6, on_token)
            service.host.decoder.submit(job)

        hooks = []
        norm = loaded.model.model.norm
        if during == "forward":
            first = loaded.model.model.layers[0]
            hooks.append(first.register_forward_pre_hook(lambda m, a: send_chat()))
        else:  # the final norm's input gradient is the first of the backward pass

            def on_norm(module: Any, args: tuple[Any, ...]) -> None:
                if args[0].requires_grad:
                    args[0].register_hook(lambda grad: send_chat())

            hooks.append(norm.register_forward_pre_hook(on_norm))
        fb["future"] = trainer.forward_backward([datum], "cross_entropy")
        with_chat = fb["future"].result()
        for hook in hooks:
            hook.remove()
        grads_with_chat = {
            k: p.grad.clone() for k, p in trainer.lora_parameters().items() if p.grad is not None
        }
        chatted = fb["chat"].result(timeout=30)
        assert first_token_inside == [True]  # admitted at a yield point inside the task

        def clear() -> None:
            for param in trainer.lora_parameters().values():
                param.grad = None

        service.host.submit(clear).result()
        alone = trainer.forward_backward([datum], "cross_entropy").result()
        assert with_chat.loss_fn_outputs[0]["logprobs"].data == (
            alone.loss_fn_outputs[0]["logprobs"].data
        )
        grads = {k: p.grad for k, p in trainer.lora_parameters().items() if p.grad is not None}
        assert grads.keys() == grads_with_chat.keys() and grads
        for key, grad in grads.items():
            assert torch.equal(grad, grads_with_chat[key]), key
        assert chatted[0].tokens == list(solo.sequences[0].tokens)
    finally:
        service.close()


def test_a_chat_sent_during_a_base_model_pass_leaves_it_on_the_base_model(
    pristine: LoadedModel, tmp_path: Path
) -> None:
    """A yield point inside a base-model scoring pass (PEFT's adapters switched off) admits a
    chat on an adapter; the pass's remaining layers still run without any adapter."""
    loaded = private_copy(pristine)
    service = LocalServiceClient(loaded, tmp_path / "checkpoints")
    try:
        chat_sampler = adapter_sampler(service, seed=2, rank=4)
        run(chat_sampler, [1, 40, 41, 42], 1, 6, 0.0, None).result()  # resident
        base = service.create_sampling_client(base_model=service.base_model).result()
        prompt = types.ModelInput.from_ints([1, 17, 230, 94, 5, 61, 62])
        on_adapter = chat_sampler.compute_logprobs(prompt).result()  # PEFT's active adapter
        alone = base.compute_logprobs(prompt).result()
        assert alone != on_adapter
        sent: list[Future[Any]] = []

        def send_chat(module: Any, args: tuple[Any, ...]) -> None:
            if sent:
                return
            job, result = greedy_job([1, 40, 41, 42], chat_sampler.adapter, 6)
            sent.append(result)
            service.host.decoder.submit(job)

        hook = loaded.model.model.layers[0].register_forward_pre_hook(send_chat)
        with_chat = base.compute_logprobs(prompt).result()
        hook.remove()
        assert sent and sent[0].result(timeout=30)
        assert with_chat == alone
    finally:
        service.close()


def test_a_request_whose_caller_is_gone_disturbs_no_other(
    pristine: LoadedModel, tmp_path: Path
) -> None:
    """Requests prefilled together with one whose client left before its first token (its
    `on_token` stops it, and its callbacks raise, as a cancelled future's do) all finish, and
    the decoder goes on serving later requests."""
    loaded = private_copy(pristine)
    host = AdapterHost(loaded)
    service = LocalServiceClient(host, tmp_path / "checkpoints")
    try:
        release = threading.Event()
        blocker = host.submit(lambda: release.wait(5))  # the three arrive together

        def on_token(sample: int, token: int, logprob: float) -> None:
            raise StopGeneration("the client went away")

        def broken(value: Any) -> None:
            raise RuntimeError("cancelled future")

        def job(prompt: list[int], gone: bool) -> tuple[DecodeJob, Future[Any]]:
            if not gone:
                return greedy_job(prompt, None, 5)
            decode_job, result = greedy_job(prompt, None, 5, on_token)
            return dataclasses.replace(decode_job, done=broken, failed=broken), result

        jobs = [job([1, 17, 230], False), job([1, 40, 41, 42], True), job([1, 300], False)]
        for decode_job, _ in jobs:
            host.decoder.submit(decode_job)
        release.set()
        blocker.result()
        finished = [result.result(timeout=30) for _, result in (jobs[0], jobs[2])]
        assert all(len(generations[0].tokens) == 5 for generations in finished)
        later, result = job([1, 17, 230], False)
        host.decoder.submit(later)
        assert result.result(timeout=30)[0].tokens == finished[0][0].tokens
    finally:
        service.close()
        host.close()
    layers = loaded.model.model.layers
    assert not layers[0]._forward_pre_hooks  # close took the decoder's hooks off the model
    with pytest.raises(ServiceClosed, match="closed"):
        host.decoder.submit(job([1, 2], False)[0])
    assert not host.decoder._pending  # refused, not left queued


def test_adapters_created_while_a_base_chat_decodes_do_not_reach_it(
    pristine: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first adapter turns the model into a PEFT model with new LoRA layers, between two
    decode slices of a running chat on the base model; its later tokens stay the base model's."""
    monkeypatch.setattr(scheduler, "SLICE_SECONDS", 0.0)  # one decode step per slice
    loaded = private_copy(pristine)
    service = LocalServiceClient(loaded, tmp_path / "checkpoints")
    try:
        base = service.create_sampling_client(base_model=service.base_model).result()
        prompt = [1, 17, 230, 94, 5]
        alone = run(base, prompt, 1, 24, 0.0, None).result()
        release = threading.Event()
        service.host.submit(lambda: release.wait(5))
        chat = run(base, prompt, 1, 24, 0.0, None)  # its first slice runs before the adapter
        trainer = service.create_lora_training_client(service.base_model, rank=4, seed=1)
        release.set()
        trainer_client = trainer.result()

        def strong() -> None:  # active in PEFT (`using` leaves it set), and far from zero
            with service.host.using(trainer_client.adapter):
                pass
            for name, param in service.host.adapter_parameters(trainer_client.adapter).items():
                if "lora_B" in name:
                    param.data.normal_(0.0, 1.0)

        service.host.submit(strong).result()
        together = chat.result()
        assert together.sequences[0].tokens == alone.sequences[0].tokens
        assert together.sequences[0].logprobs == pytest.approx(
            alone.sequences[0].logprobs, abs=2e-4
        )
    finally:
        service.close()
