"""The local training service against Tinker's semantics, on the tiny Llama (and a few on SmolLM2).

References are computed independently in each test: a plain forward pass of an untouched copy of
the model, or a plain PEFT model, never the service's own code path.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tinker
import torch
from model_copies import private_copy
from peft import LoraConfig, PeftModel, get_peft_model
from tinker import types

from claas.errors import CheckpointNotFound, ContextTooLong, InvalidRequest, ServiceClosed
from claas.models import LoadedModel, tiny_llama
from claas.sdpo.prompts import chat_prompt_tokens
from claas.services.local import (
    AdapterHost,
    LocalServiceClient,
    LocalTrainingClient,
    training_client,
)
from claas.services.local.checkpoints import write_checkpoint
from claas.services.local.worker import ModelWorker

TOKENS = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 2]


@pytest.fixture(scope="module")
def pristine(model_cache: Path) -> LoadedModel:
    """The tiny model, built once; the services and references get copies of it."""
    return tiny_llama(model_cache, seed=0)


@pytest.fixture
def reference(pristine: LoadedModel) -> LoadedModel:
    """An untouched copy of the tiny model (the service's weights)."""
    return private_copy(pristine)


@pytest.fixture
def service(pristine: LoadedModel, tmp_path: Path) -> Iterator[LocalServiceClient]:
    svc = LocalServiceClient(private_copy(pristine), tmp_path / "checkpoints")
    yield svc
    svc.close()


def inputs(**arrays: np.ndarray) -> dict[str, types.TensorData]:
    """`loss_fn_inputs` from numpy arrays, as `types.Datum` would convert them itself."""
    return {name: types.TensorData.from_numpy(array) for name, array in arrays.items()}


def accumulated_grads(trainer: LocalTrainingClient) -> dict[str, torch.Tensor]:
    """Copies of the accumulated LoRA gradients, left in place (every weight must have one)."""
    found = {}
    for name, param in trainer.lora_parameters().items():
        assert param.grad is not None, f"{name} got no gradient"
        found[name] = param.grad.clone()
    return found


def plain_logprobs(model: Any, tokens: list[int]) -> torch.Tensor:
    """(L-1, V) log-probs; row i predicts tokens[i+1]. Independent of claas code."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def ce_datum(tokens: list[int], k: int = 0, seed: int = 0) -> types.Datum:
    rng = np.random.default_rng(seed)
    n = len(tokens) - 1
    if k == 0:
        targets = np.asarray(tokens[1:], dtype=np.int64)
        weights = rng.uniform(0.1, 1.0, size=n).astype(np.float32)
    else:
        targets = rng.integers(0, 49152, size=(n, k)).astype(np.int64)
        weights = rng.normal(size=(n, k)).astype(np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs=inputs(target_tokens=targets, weights=weights),
    )


def perturb(trainer: LocalTrainingClient, seed: int = 1) -> None:
    """Give the adapter non-zero B matrices so gradients reach every LoRA weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in trainer.lora_parameters().values():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


def new_trainer(service: LocalServiceClient, seed: int = 0, rank: int = 4) -> LocalTrainingClient:
    return service.create_lora_training_client(
        service.base_model, rank=rank, seed=seed, train_unembed=False
    ).result()


# ---------------------------------------------------------------------------------------------
# Losses and gradients
# ---------------------------------------------------------------------------------------------


def test_cross_entropy_loss_is_tinkers_plain_sum(
    service: LocalServiceClient, reference: LoadedModel
) -> None:
    trainer = new_trainer(service)  # fresh LoRA (B = 0) computes exactly the base model
    datums = [ce_datum(TOKENS, seed=0), ce_datum(TOKENS[:9], seed=1)]
    out = trainer.forward_backward(datums, "cross_entropy").result()
    expected = 0.0
    for datum, output in zip(datums, out.loss_fn_outputs, strict=True):
        tokens = datum.model_input.to_ints()
        targets = datum.loss_fn_inputs["target_tokens"].to_numpy()
        weights = datum.loss_fn_inputs["weights"].to_numpy()
        logprobs = plain_logprobs(reference.model, [*tokens, int(targets[-1])])
        picked = logprobs[torch.arange(len(tokens)), torch.from_numpy(targets)].numpy()
        np.testing.assert_allclose(output["logprobs"].to_numpy(), picked, atol=1e-5)
        expected += float(-(picked * weights).sum())
    assert out.metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)


def test_importance_sampling_loss_is_tinkers_formula(
    service: LocalServiceClient, reference: LoadedModel
) -> None:
    trainer = new_trainer(service)
    targets = np.asarray(TOKENS[1:], dtype=np.int64)
    sampling = np.full(len(targets), -9.0, dtype=np.float32)
    advantages = np.linspace(-1, 1, len(targets)).astype(np.float32)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs=inputs(target_tokens=targets, logprobs=sampling, advantages=advantages),
    )
    out = trainer.forward([datum], "importance_sampling").result()
    logprobs = plain_logprobs(reference.model, TOKENS)
    picked = logprobs[torch.arange(len(targets)), torch.from_numpy(targets)].numpy()
    expected = -(np.exp(picked - sampling) * advantages).sum()
    assert out.metrics["loss:sum"] == pytest.approx(float(expected), rel=1e-5)


def test_topk_cross_entropy_gradient_equals_autograd(
    service: LocalServiceClient, pristine: LoadedModel
) -> None:
    trainer = new_trainer(service)
    perturb(trainer)
    datums = [ce_datum(TOKENS, k=5, seed=2), ce_datum(TOKENS[:7], k=5, seed=3)]
    trainer.forward_backward(datums, "cross_entropy").result()
    got = accumulated_grads(trainer)

    # Independent: a plain PEFT model with the same weights, the loss written out by hand.
    config = LoraConfig(
        r=4,
        lora_alpha=32,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        lora_dropout=0.0,
    )
    peft = get_peft_model(private_copy(pristine).model, config)
    params = {n.replace(".default.", "."): p for n, p in peft.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, value in trainer.lora_parameters().items():
            params[name].copy_(value)
    loss = torch.zeros(())
    for datum in datums:
        logits = peft(input_ids=torch.tensor([datum.model_input.to_ints()])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        targets = datum.loss_fn_inputs["target_tokens"].to_torch()
        weights = datum.loss_fn_inputs["weights"].to_torch()
        loss = loss - (logprobs.gather(-1, targets) * weights).sum()
    loss.backward()  # type: ignore[no-untyped-call]
    assert set(got) == set(params)
    for name, param in params.items():
        assert param.grad is not None
        scale = float(param.grad.abs().max())  # float32 sums in another order: relative atol
        torch.testing.assert_close(got[name], param.grad, rtol=1e-4, atol=1e-5 * max(scale, 1e-3))
    assert any(g.abs().max() > 0 for g in got.values())


def test_training_log_probs_keep_a_top_k_mass_within_one(model_cache: Path, tmp_path: Path) -> None:
    """A peaked model (logits up to ~44), where a float32 logsumexp puts the top-100 mass
    ~1e-6 over 1, which the divergence refuses: the training forward's values are the
    float64-normalised ones, to float32 precision."""
    loaded = tiny_llama(model_cache, seed=0, initializer_range=1.0)
    tokens = torch.randint(0, 49152, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.tensor([tokens])).logits[0].double()
    reference = torch.log_softmax(logits, dim=-1)[:-1]
    top, ids = reference.topk(100, dim=-1)
    service = LocalServiceClient(loaded, tmp_path / "checkpoints")
    try:
        datum = types.Datum(
            model_input=types.ModelInput.from_ints(tokens[:-1]),
            loss_fn_inputs=inputs(
                target_tokens=ids.numpy(), weights=np.zeros(ids.shape, dtype=np.float32)
            ),
        )
        out = new_trainer(service).forward([datum], "cross_entropy").result()
    finally:
        service.close()
    got = torch.from_numpy(out.loss_fn_outputs[0]["logprobs"].to_numpy()).double()
    torch.testing.assert_close(got, top, rtol=0, atol=5e-5)  # float32 logits of ~44
    assert float(torch.logsumexp(got, dim=-1).max()) <= 2e-7


def custom_datum(tokens: list[int], k: int, seed: int) -> types.Datum:
    """(N, k) targets and a target distribution over them: an input only the loss reads."""
    rng = np.random.default_rng(seed)
    n = len(tokens) - 1
    distribution = rng.dirichlet(np.ones(k), size=n).astype(np.float32)
    return types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs=inputs(
            target_tokens=rng.integers(0, 49152, size=(n, k)).astype(np.int64),
            target_distribution=distribution,
        ),
    )


def distribution_loss(
    data: list[types.Datum], logprobs: list[torch.Tensor]
) -> tuple[torch.Tensor, dict[str, float]]:
    """A non-linear custom loss: cross-entropy to a target distribution plus a square term."""
    total = torch.zeros(())
    for datum, lp in zip(data, logprobs, strict=True):
        target = datum.loss_fn_inputs["target_distribution"].to_torch()
        total = total - (target * lp).sum() + 0.01 * (lp**2).sum()
    return total, {"custom/datums:sum": float(len(data))}


def lora_grads(trainer: LocalTrainingClient) -> dict[str, torch.Tensor]:
    """The accumulated gradients, taken on the worker; they are cleared after."""

    def take() -> dict[str, torch.Tensor]:
        grads = {}
        for name, param in trainer.lora_parameters().items():
            assert param.grad is not None, f"{name} got no gradient"
            grads[name] = param.grad.clone()
            param.grad = None
        return grads

    return trainer.host.submit(take).result()


def test_custom_loss_in_one_pass_is_tinkers_forward_then_linear_backward(
    service: LocalServiceClient,
) -> None:
    """Hosted Tinker runs a custom loss in two passes, with the SDK's own code: a forward, the
    loss differentiated on the client into weights (`_compute_custom_loss`), and a
    `cross_entropy` backward at those weights. The local service's one pass must match it."""
    trainer = new_trainer(service)
    perturb(trainer)
    data = [custom_datum(TOKENS, k=4, seed=4), custom_datum(TOKENS[:8], k=4, seed=5)]
    one_pass = trainer.forward_backward_custom(data, distribution_loss).result()
    got = lora_grads(trainer)

    sdk = tinker.TrainingClient
    scoring = sdk._get_custom_loss_forward_data(None, data, "cross_entropy")  # type: ignore[arg-type]
    forward = trainer.forward(scoring, "cross_entropy").result()
    linear = sdk._compute_custom_loss(data, distribution_loss, forward)
    backward = trainer.forward_backward(linear.data, "cross_entropy").result()
    want = lora_grads(trainer)

    assert set(got) == set(want)
    for name in want:
        scale = float(want[name].abs().max())
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3))
    assert any(g.abs().max() > 0 for g in got.values())
    assert one_pass.metrics["loss:sum"] == pytest.approx(linear.loss_sum, rel=1e-6)
    assert one_pass.metrics["surrogate_loss:sum"] == pytest.approx(
        backward.metrics["loss:sum"], rel=1e-5
    )
    assert one_pass.metrics["custom/datums:sum"] == 2.0
    for ours, theirs in zip(one_pass.loss_fn_outputs, backward.loss_fn_outputs, strict=True):
        np.testing.assert_allclose(
            ours["logprobs"].to_numpy(), theirs["logprobs"].to_numpy(), atol=1e-6
        )


def test_a_refused_custom_loss_leaves_no_gradient(service: LocalServiceClient) -> None:
    trainer = new_trainer(service)
    perturb(trainer)
    data = [custom_datum(TOKENS, k=3, seed=6), custom_datum(TOKENS[:6], k=3, seed=7)]

    def scaled(factor: float) -> Any:
        return lambda d, lps: (sum(lp.sum() for lp in lps) * factor, {})

    refused = [
        (scaled(float("nan")), "NaN or inf"),
        (lambda d, lps: (lps[0], {}), "scalar tensor"),
        (lambda d, lps: (torch.zeros(()), {}), "scalar tensor"),
        (lambda d, lps: (lps[0].sum(), {}), "every datum"),
    ]
    for loss, message in refused:
        with pytest.raises(InvalidRequest, match=message):
            trainer.forward_backward_custom(data, loss).result()
        assert all(p.grad is None for p in trainer.lora_parameters().values())
    with pytest.raises(InvalidRequest, match="callable"):
        trainer.forward_backward_custom(data, "cross_entropy")  # type: ignore[arg-type]
    no_targets = types.Datum(model_input=types.ModelInput.from_ints(TOKENS[:-1]), loss_fn_inputs={})
    with pytest.raises(InvalidRequest, match="target_tokens"):
        trainer.forward_backward_custom([no_targets], scaled(1.0))
    trainer.forward_backward_custom(data, scaled(1.0)).result()  # the client still trains
    assert lora_grads(trainer)


def test_importance_sampling_step_raises_the_advantaged_token(
    service: LocalServiceClient,
) -> None:
    trainer = new_trainer(service)
    sampler = trainer.save_weights_and_get_sampling_client(kind="inflight").result()
    prompt = types.ModelInput.from_ints(TOKENS)
    before = sampler.compute_logprobs(prompt).result()
    targets = np.asarray(TOKENS[1:], dtype=np.int64)
    advantages = np.zeros(len(targets), dtype=np.float32)
    advantages[5] = 1.0
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(TOKENS[:-1]),
        loss_fn_inputs=inputs(
            target_tokens=targets,
            logprobs=np.asarray(before[1:], dtype=np.float32),
            advantages=advantages,
        ),
    )
    fwd = trainer.forward_backward([datum], "importance_sampling")
    opt = trainer.optim_step(types.AdamParams(learning_rate=1e-3))
    fwd.result(), opt.result()
    after = sampler.compute_logprobs(prompt).result()
    assert after[6] is not None and before[6] is not None
    assert after[6] > before[6] + 1e-3


def test_optim_step_honours_grad_clip_and_weight_decay(service: LocalServiceClient) -> None:
    trainer = new_trainer(service)
    perturb(trainer)
    start = {n: p.detach().clone() for n, p in trainer.lora_parameters().items()}
    trainer.forward_backward([ce_datum(TOKENS, k=3)], "cross_entropy").result()
    taken = accumulated_grads(trainer)
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in taken.values()])))
    params = types.AdamParams(
        learning_rate=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, grad_clip_norm=0.5
    )
    out = trainer.optim_step(params).result()
    assert out.metrics is not None and out.metrics["grad_norm"] == pytest.approx(norm, rel=1e-5)
    # Independent AdamW step on copies, with the gradient clipped to norm 0.5.
    copies = {n: torch.nn.Parameter(v.clone()) for n, v in start.items()}
    for name, copy in copies.items():
        copy.grad = taken[name] * min(1.0, 0.5 / (norm + 1e-6))
    torch.optim.AdamW(
        list(copies.values()), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1
    ).step()
    for name, param in trainer.lora_parameters().items():
        torch.testing.assert_close(param.detach(), copies[name].detach(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------------


def test_prompt_scores_align_with_a_plain_forward_pass(
    service: LocalServiceClient, reference: LoadedModel
) -> None:
    sampler = service.create_sampling_client(base_model=service.base_model).result()
    n = len(TOKENS)
    targets = torch.full((n - 1, 3), -1, dtype=torch.int64)
    targets[:, 0] = torch.tensor(TOKENS[1:])  # the actual next tokens
    targets[4, 1] = 7
    targets[4, 2] = 11
    out = sampler.sample(
        types.ModelInput.from_ints(TOKENS),
        1,
        types.SamplingParams(max_tokens=1, temperature=0.0),
        include_prompt_logprobs=True,
        topk_prompt_logprobs=4,
        target_prompt_logprobs=types.TensorData.from_torch_sparse(targets, pad_value=-1),
    ).result()
    expected = plain_logprobs(reference.model, TOKENS)  # row i predicts TOKENS[i+1]
    assert out.prompt_logprobs is not None and out.prompt_logprobs[0] is None
    for position in range(1, n):  # prompt_logprobs[i] scores TOKENS[i] given TOKENS[:i]
        assert out.prompt_logprobs[position] == pytest.approx(
            float(expected[position - 1, TOKENS[position]]), abs=1e-5
        )
    assert out.topk_prompt_logprobs is not None and out.topk_prompt_logprobs[0] is None
    top = out.topk_prompt_logprobs[3]
    assert top is not None
    values, ids = expected[2].topk(4)
    assert [t for t, _ in top] == ids.tolist()
    assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
    np.testing.assert_allclose([lp for _, lp in top], values.numpy(), atol=1e-5)
    assert out.target_prompt_logprobs is not None
    scored = out.target_prompt_logprobs.to_numpy()
    assert scored.shape == (n - 1, 3)
    np.testing.assert_allclose(  # row i scores position i+1: equals prompt_logprobs[i+1]
        scored[:, 0], np.asarray(out.prompt_logprobs[1:], dtype=np.float32), atol=1e-6
    )
    assert scored[4, 1] == pytest.approx(float(expected[4, 7]), abs=1e-5)
    assert scored[3, 1] == 0.0  # -1 means skip
    computed = sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()
    assert computed == pytest.approx(out.prompt_logprobs, abs=1e-6)


def test_last_n_scores_only_the_tail(service: LocalServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=service.base_model).result()
    prompt = types.ModelInput.from_ints(TOKENS)
    full = sampler.sample(
        prompt, 1, types.SamplingParams(max_tokens=1), True, topk_prompt_logprobs=3
    ).result()
    tail = sampler.sample(
        prompt,
        1,
        types.SamplingParams(max_tokens=1),
        True,
        topk_prompt_logprobs=3,
        prompt_logprobs_last_n=4,
    ).result()
    assert tail.prompt_logprobs is not None and full.prompt_logprobs is not None
    assert tail.prompt_logprobs[:-4] == [None] * (len(TOKENS) - 4)
    assert tail.prompt_logprobs[-4:] == pytest.approx(full.prompt_logprobs[-4:], abs=1e-6)
    assert tail.topk_prompt_logprobs is not None and full.topk_prompt_logprobs is not None
    assert tail.topk_prompt_logprobs[:-4] == [None] * (len(TOKENS) - 4)
    assert [[i for i, _ in row or []] for row in tail.topk_prompt_logprobs[-4:]] == [
        [i for i, _ in row or []] for row in full.topk_prompt_logprobs[-4:]
    ]
    computed = sampler.compute_logprobs(prompt, prompt_logprobs_last_n=2).result()
    assert computed[:-2] == [None] * (len(TOKENS) - 2)
    assert computed[-2:] == pytest.approx(full.prompt_logprobs[-2:], abs=1e-6)
    with pytest.raises(InvalidRequest, match="prompt_logprobs_last_n"):
        sampler.compute_logprobs(prompt, prompt_logprobs_last_n=len(TOKENS))


def test_greedy_sampling_matches_argmax_decoding(
    service: LocalServiceClient, reference: LoadedModel
) -> None:
    sampler = service.create_sampling_client(base_model=service.base_model).result()
    out = sampler.sample(
        types.ModelInput.from_ints(TOKENS[:6]), 1, types.SamplingParams(max_tokens=8, temperature=0)
    ).result()
    sequence = out.sequences[0]
    tokens = list(TOKENS[:6])
    for token, logprob in zip(sequence.tokens, sequence.logprobs or [], strict=True):
        row = plain_logprobs(reference.model, [*tokens, 0])[-1]
        assert token == int(row.argmax())
        assert logprob == pytest.approx(float(row[token]), abs=1e-4)
        tokens.append(token)
    assert len(sequence.tokens) == 8 and sequence.stop_reason == "length"


def test_sampling_params_are_honoured(service: LocalServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=service.base_model).result()
    prompt = types.ModelInput.from_ints(TOKENS[:6])

    def run(n: int = 1, **params: Any) -> types.SampleResponse:
        return sampler.sample(prompt, n, types.SamplingParams(**params)).result()

    first = run(4, max_tokens=6, temperature=1.0, seed=7)
    again = run(4, max_tokens=6, temperature=1.0, seed=7)
    assert len(first.sequences) == 4
    assert [s.tokens for s in first.sequences] == [s.tokens for s in again.sequences]
    assert len({tuple(s.tokens) for s in first.sequences}) > 1  # batched rows differ
    greedy = run(max_tokens=6, temperature=0).sequences[0].tokens
    assert run(max_tokens=6, temperature=1.0, top_k=1, seed=3).sequences[0].tokens == greedy
    assert run(max_tokens=6, temperature=1.0, top_p=1e-6, seed=3).sequences[0].tokens == greedy
    stop_at = greedy[2]
    stopped = run(max_tokens=6, temperature=0, stop=[stop_at]).sequences[0]
    assert stopped.tokens == greedy[: greedy.index(stop_at) + 1]
    assert stopped.stop_reason == "stop"
    text = service.get_tokenizer().decode(greedy[:3])
    by_string = run(max_tokens=6, temperature=0, stop=[text[-2:]]).sequences[0]
    assert by_string.stop_reason == "stop" and len(by_string.tokens) <= 3


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _train_steps(trainer: LocalTrainingClient, seeds: list[int]) -> None:
    for seed in seeds:
        trainer.forward_backward([ce_datum(TOKENS, k=3, seed=seed)], "cross_entropy")
        trainer.optim_step(types.AdamParams(learning_rate=1e-2, weight_decay=0.01)).result()


def _weights(trainer: LocalTrainingClient) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.lora_parameters().items()}


def test_resume_with_optimizer_equals_training_straight_through(
    service: LocalServiceClient,
) -> None:
    straight = new_trainer(service, seed=5)
    perturb(straight)
    _train_steps(straight, [1, 2, 3])

    first = new_trainer(service, seed=5)
    perturb(first)
    _train_steps(first, [1, 2])
    path = first.save_state("step2").result().path
    assert path.startswith("local://") and "/weights/step2" in path

    resumed = service.create_training_client_from_state_with_optimizer(path).result()
    _train_steps(resumed, [3])
    for name, value in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[name], value, rtol=1e-6, atol=1e-8)

    weights_only = service.create_training_client_from_state(path).result()
    _train_steps(weights_only, [3])  # fresh Adam moments: must differ from straight-through
    assert any(
        not torch.allclose(_weights(weights_only)[n], v) for n, v in _weights(straight).items()
    )


def test_a_released_training_adapter_is_reused_with_the_new_weights_only(
    service: LocalServiceClient,
) -> None:
    """A training client's adapter, released, becomes a spare slot: the next client from a
    checkpoint of the same config takes it, with exactly the checkpoint's weights and no
    gradient left from before; a slot an inflight sampler still reads is not taken."""
    first = new_trainer(service, seed=5)
    perturb(first)
    path = first.save_state("saved").result().path
    saved = _weights(first)
    _train_steps(first, [1])  # weights and gradients move on after the save
    moved, slot = _weights(first), first.adapter
    del first
    gc.collect()

    resumed = service.create_training_client_from_state(path).result()
    assert resumed.adapter == slot  # the spare slot, not a new PEFT adapter
    for name, value in saved.items():
        torch.testing.assert_close(_weights(resumed)[name], value, rtol=0, atol=0)
    assert any(not torch.equal(_weights(resumed)[n], v) for n, v in moved.items())
    assert all(p.grad is None for p in resumed.lora_parameters().values())
    _train_steps(resumed, [2])

    reader = resumed.save_weights_and_get_sampling_client(kind="inflight").result()
    live = resumed.adapter
    del resumed
    gc.collect()
    other = service.create_training_client_from_state(path).result()
    assert other.adapter != live  # the inflight sampler keeps its client's adapter
    assert reader.adapter == live and service.host.has_adapter(live)


def test_a_save_writes_the_weights_of_its_own_moment(
    service: LocalServiceClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints are written off the worker, from a copy taken when the save runs: a step
    run while the file is still being written does not reach it. (The real writer is held
    until the step is done, so the order does not depend on timing.)"""
    step_done = threading.Event()

    def held_write(*args: Any, **kwargs: Any) -> Any:
        step_done.wait(60)
        return write_checkpoint(*args, **kwargs)

    monkeypatch.setattr(training_client, "write_checkpoint", held_write)  # the module's name
    trainer = new_trainer(service, seed=5)
    perturb(trainer)
    before = _weights(trainer)
    saving = trainer.save_state("then")
    _train_steps(trainer, [1])
    step_done.set()
    loaded = service.create_training_client_from_state(saving.result().path).result()
    for name, value in before.items():
        torch.testing.assert_close(_weights(loaded)[name], value, rtol=0, atol=0)
    assert any(not torch.equal(_weights(trainer)[n], v) for n, v in before.items())


def test_checkpoint_loads_in_plain_peft(service: LocalServiceClient, pristine: LoadedModel) -> None:
    trainer = new_trainer(service)
    perturb(trainer)
    path = trainer.save_weights_for_sampler("v1").result().path
    directory = service.storage_dir / path.removeprefix("local://")
    assert {p.name for p in directory.iterdir()} >= {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    assert not (directory / "optimizer.pt").exists()
    plain = PeftModel.from_pretrained(private_copy(pristine).model, directory)
    sampler = service.create_sampling_client(model_path=path).result()
    ours = sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result()
    expected = plain_logprobs(plain, TOKENS)[torch.arange(len(TOKENS) - 1), TOKENS[1:]]
    np.testing.assert_allclose(np.asarray(ours[1:], dtype=np.float32), expected.numpy(), atol=1e-5)
    base = service.create_sampling_client(base_model=service.base_model).result()
    assert base.compute_logprobs(types.ModelInput.from_ints(TOKENS)).result() != ours


def test_adapters_do_not_contaminate_each_other_or_the_base(service: LocalServiceClient) -> None:
    prompt = types.ModelInput.from_ints(TOKENS)
    base = service.create_sampling_client(base_model=service.base_model).result()
    other = new_trainer(service, seed=9)
    perturb(other, seed=9)
    other_sampler = service.create_sampling_client(
        model_path=other.save_weights_for_sampler("frozen").result().path
    ).result()
    base_before = base.compute_logprobs(prompt).result()
    other_before = other_sampler.compute_logprobs(prompt).result()

    trainer = new_trainer(service, seed=1)
    perturb(trainer)
    live = trainer.save_weights_and_get_sampling_client(kind="inflight").result()
    live_before = live.compute_logprobs(prompt).result()
    for _ in range(3):
        trainer.forward_backward([ce_datum(TOKENS, k=3)], "cross_entropy")
        # Interleave: sample the other adapter and the base between training calls.
        other_sampler.compute_logprobs(prompt)
        base.compute_logprobs(prompt)
        trainer.optim_step(types.AdamParams(learning_rate=1e-2)).result()

    assert base.compute_logprobs(prompt).result() == base_before
    assert other_sampler.compute_logprobs(prompt).result() == other_before
    assert live.compute_logprobs(prompt).result() != live_before  # training did change it


def test_concurrent_async_callers_get_correct_results(service: LocalServiceClient) -> None:
    prompt = types.ModelInput.from_ints(TOKENS)
    base = service.create_sampling_client(base_model=service.base_model).result()
    trainer = new_trainer(service)
    perturb(trainer)
    snapshot = trainer.save_weights_and_get_sampling_client().result()
    expected_base = base.compute_logprobs(prompt).result()
    expected_snap = snapshot.compute_logprobs(prompt).result()

    async def main() -> list[Any]:
        calls: list[Any] = []
        for _ in range(4):
            calls.append(base.compute_logprobs(prompt))
            calls.append(snapshot.compute_logprobs(prompt))
            calls.append(trainer.forward_backward([ce_datum(TOKENS, k=2)], "cross_entropy"))
            calls.append(trainer.optim_step(types.AdamParams(learning_rate=1e-2)))
        return list(await asyncio.gather(*calls))

    results = asyncio.run(main())
    for index in range(0, len(results), 4):
        assert results[index] == expected_base
        assert results[index + 1] == expected_snap  # a snapshot does not follow training


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors(service: LocalServiceClient) -> None:
    trainer = new_trainer(service)
    datum = ce_datum(TOKENS)
    with pytest.raises(InvalidRequest, match="loss_fn 'dpo' is not supported"):
        trainer.forward_backward([datum], "dpo")  # type: ignore[arg-type]
    short = types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs=inputs(target_tokens=np.asarray(TOKENS[1:4]), weights=np.ones(3)),
    )
    with pytest.raises(InvalidRequest, match="target_tokens has shape"):
        trainer.forward_backward([short], "cross_entropy")
    mismatched = types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs=inputs(target_tokens=np.asarray(TOKENS[1:]), weights=np.ones(3)),
    )
    with pytest.raises(InvalidRequest, match="weights has shape"):
        trainer.forward_backward([mismatched], "cross_entropy")
    nan = types.Datum(
        model_input=datum.model_input,
        loss_fn_inputs=inputs(
            target_tokens=np.asarray(TOKENS[1:]), weights=np.full(len(TOKENS) - 1, np.nan)
        ),
    )
    with pytest.raises(InvalidRequest, match="NaN"):
        trainer.forward_backward([nan], "cross_entropy")
    with pytest.raises(InvalidRequest, match="missing"):
        trainer.forward_backward([datum], "importance_sampling")
    with pytest.raises(InvalidRequest, match="not served here"):
        service.create_lora_training_client("Qwen/Qwen3-8B")
    for bad in [
        "local://run-x/weights/nope",
        "local://../../etc/weights/passwd",
        "local://run-x/weights/..",
        "local://run-x/../../weights/x",
        "tinker://run-x/weights/x",
        "/etc/passwd",
    ]:
        with pytest.raises(CheckpointNotFound):
            service.create_training_client_from_state(bad)
        with pytest.raises(CheckpointNotFound):
            service.create_sampling_client(model_path=bad)
    with pytest.raises(InvalidRequest, match="not allowed"):
        trainer.save_state("../escape")
    sampler = service.create_sampling_client(base_model=service.base_model).result()
    with pytest.raises(ContextTooLong, match="exceeds the model's context"):
        sampler.sample(types.ModelInput.from_ints(TOKENS), 1, types.SamplingParams(max_tokens=4096))
    with pytest.raises(InvalidRequest, match="shape"):
        sampler.sample(
            types.ModelInput.from_ints(TOKENS),
            1,
            types.SamplingParams(max_tokens=1),
            target_prompt_logprobs=types.TensorData.from_numpy(np.zeros((3, 2), dtype=np.int64)),
        )
    # Nothing above touched the adapter: it still trains.
    assert trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"] > 0


# ---------------------------------------------------------------------------------------------
# The real model
# ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_scoring_and_greedy_answer(smol: LoadedModel, tmp_path: Path) -> None:
    """On SmolLM2 (shared, untouched: the service gets its own copy of the weights)."""
    import copy

    service = LocalServiceClient(
        LoadedModel(smol.name, copy.deepcopy(smol.model), smol.tokenizer, smol.device), tmp_path
    )
    try:
        sampler = service.create_sampling_client(base_model=service.base_model).result()
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        prompt = chat_prompt_tokens(smol.tokenizer, messages)
        out = sampler.sample(
            types.ModelInput.from_ints(prompt),
            1,
            types.SamplingParams(max_tokens=24, temperature=0),
            include_prompt_logprobs=True,
        ).result()
        answer = smol.tokenizer.decode(out.sequences[0].tokens, skip_special_tokens=True)
        assert "Paris" in answer
        assert out.sequences[0].stop_reason == "stop"
        assert out.sequences[0].tokens[-1] in smol.stop_token_ids
        expected = plain_logprobs(smol.model, prompt)[torch.arange(len(prompt) - 1), prompt[1:]]
        assert out.prompt_logprobs is not None
        np.testing.assert_allclose(
            np.asarray(out.prompt_logprobs[1:], dtype=np.float32), expected.numpy(), atol=1e-4
        )
        trainer = service.create_lora_training_client(service.base_model, rank=8, seed=0).result()
        datum = ce_datum(prompt, k=4)
        loss = trainer.forward_backward([datum], "cross_entropy").result().metrics["loss:sum"]
        assert np.isfinite(loss)
    finally:
        service.close()


def test_sdk_semantics_of_last_n_topk_and_optimizer_args(service: LocalServiceClient) -> None:
    sampler = service.create_sampling_client(base_model=service.base_model).result()
    prompt = types.ModelInput.from_ints(TOKENS)
    params = types.SamplingParams(max_tokens=1)
    # top-K alone scores every position, as on Tinker
    topk_only = sampler.sample(prompt, 1, params, topk_prompt_logprobs=2).result()
    assert topk_only.topk_prompt_logprobs is not None
    assert all(row is not None for row in topk_only.topk_prompt_logprobs[1:])
    # early target ids do not widen the last-N window of prompt log-probs
    ids = torch.full((len(TOKENS) - 1, 1), -1, dtype=torch.int64)
    ids[0, 0] = 5
    out = sampler.sample(
        prompt,
        1,
        params,
        include_prompt_logprobs=True,
        target_prompt_logprobs=types.TensorData.from_torch(ids),
        prompt_logprobs_last_n=3,
    ).result()
    assert out.prompt_logprobs is not None
    assert out.prompt_logprobs[:-3] == [None] * (len(TOKENS) - 3)
    assert out.target_prompt_logprobs is not None
    assert out.target_prompt_logprobs.to_numpy()[0, 0] < 0  # still scored
    with pytest.raises(InvalidRequest, match="requires include_prompt_logprobs"):
        sampler.sample(prompt, 1, params, prompt_logprobs_last_n=2)
    trainer = new_trainer(service)
    adam = types.AdamParams(learning_rate=1e-3)
    with pytest.raises(InvalidRequest, match="not both"):
        trainer.optim_step(adam, adam_params=adam)
    masked = ce_datum(TOKENS)
    masked = types.Datum(
        model_input=masked.model_input,
        loss_fn_inputs={**masked.loss_fn_inputs, **inputs(mask=np.ones(len(TOKENS) - 1))},
    )
    with pytest.raises(InvalidRequest, match="unexpected \\['mask'\\]"):
        trainer.forward_backward([masked], "cross_entropy")


def test_two_services_on_one_host_share_one_worker(pristine: LoadedModel, tmp_path: Path) -> None:
    host = AdapterHost(private_copy(pristine))
    first = LocalServiceClient(host, tmp_path / "a")
    second = LocalServiceClient(host, tmp_path / "b")
    try:
        assert first.host is second.host is host
        first.close()
        second.close()
        assert not host.closed  # a shared host is its owner's to close
        sampler = second.create_sampling_client(base_model=second.base_model).result()
        sampler.compute_logprobs(types.ModelInput.from_ints(TOKENS[:4])).result()
    finally:
        host.close()
    with pytest.raises(ServiceClosed, match="closed"):
        first.create_lora_training_client(first.base_model, rank=2)


def test_a_service_given_a_model_owns_its_host(pristine: LoadedModel, tmp_path: Path) -> None:
    service = LocalServiceClient(private_copy(pristine), tmp_path)
    assert not service.host.closed
    service.close()
    assert service.host.closed


def test_generation_stops_when_the_callback_asks(service: LocalServiceClient) -> None:
    from claas.services.protocol import StopGeneration

    sampler = service.create_sampling_client(base_model=service.base_model).result()
    seen: list[int] = []

    def on_token(index: int, token: int, logprob: float) -> None:
        seen.append(token)
        if len(seen) == 3:
            raise StopGeneration

    out = sampler.sample(
        types.ModelInput.from_ints(TOKENS[:5]),
        1,
        types.SamplingParams(max_tokens=50, temperature=0),
        on_token=on_token,
    ).result()
    assert len(out.sequences[0].tokens) == 3


def test_concurrent_scoring_is_batched_exactly_and_in_order(
    service: LocalServiceClient, reference: LoadedModel
) -> None:
    trainer = new_trainer(service)
    perturb(trainer)
    sampler = trainer.save_weights_and_get_sampling_client(kind="inflight").result()
    prompts = [TOKENS, TOKENS[:6], TOKENS[3:12]]
    params = types.SamplingParams(max_tokens=1, temperature=0)

    def score(tokens: list[int]) -> Any:
        return sampler.sample(
            types.ModelInput.from_ints(tokens), 1, params, include_prompt_logprobs=True
        )

    futures = [score(p) for p in prompts]  # queued together: one padded forward
    for tokens, future in zip(prompts, futures, strict=True):
        out = future.result()
        alone = sampler.compute_logprobs(types.ModelInput.from_ints(tokens)).result()
        assert out.prompt_logprobs == pytest.approx(alone, abs=1e-5)
        assert (
            out.sequences[0].tokens
            == sampler.sample(
                types.ModelInput.from_ints(tokens),
                1,
                types.SamplingParams(max_tokens=2, temperature=0),
            )
            .result()
            .sequences[0]
            .tokens[:1]
        )
    before = score(TOKENS)
    trainer.forward_backward([ce_datum(TOKENS, k=3)], "cross_entropy")
    trainer.optim_step(types.AdamParams(learning_rate=1e-2))
    after = score(TOKENS)  # submitted after the step: must not join the earlier batch
    assert after.result().prompt_logprobs != before.result().prompt_logprobs


def test_an_urgent_task_runs_before_the_queued_ones_after_the_running_one() -> None:
    """A chat's first tokens (urgent) wait for the running training task only, not for every
    task the feedback step has queued; same-key batches keep their order among the rest."""
    worker = ModelWorker()
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def run(name: str) -> str:
        order.append(name)
        return name

    def run_when_released() -> str:
        started.set()
        release.wait(5)
        return run("running")

    try:
        running = worker.submit(run_when_released)
        assert started.wait(5)
        queued = [worker.submit(functools.partial(run, name)) for name in ("a", "b")]
        batch = worker.submit_batched("k", "c", lambda items: [run(i) for i in items])
        urgent = worker.submit(lambda: run("urgent"), urgent=True)
        release.set()
        for future in (running, *queued, batch, urgent):
            future.result()
        assert order == ["running", "urgent", "a", "b", "c"]
    finally:
        worker.close()
