"""`LocalSamplingClient`: the local `tinker.SamplingClient`, bound to one adapter or to the base.

A sampler on a checkpoint or a snapshot is a named adapter the host loads on first use (and may
evict, LRU); an `inflight` sampler reads its training client's live adapter. Requests are
validated here (`_SampleRequest`) and run on the host's worker with the torch kernels of
`decoding`. A chat joins the continuous batch of every running chat (`scheduler`); one-token
scoring passes sent together (`_ScoreJob`) run as one padded forward. Responses follow Tinker's
layout (`responses`); beyond Tinker, `sample` takes an `on_token` callback for streaming.
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tinker import types
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture
from transformers import PreTrainedTokenizerBase

from claas.errors import ContextTooLong, InvalidRequest
from claas.services.local.checkpoints import LoadedCheckpoint
from claas.services.local.decoding import (
    Generation,
    SampleStream,
    SamplingRule,
    apply_logit_rules,
    choose_next,
    generate,
    logprobs_at,
    prefill,
    score_prompt,
)
from claas.services.local.losses import check_token_ids
from claas.services.local.responses import sample_response, sampled_sequences
from claas.services.protocol import ChatSamplingParams, TokenCallback

if TYPE_CHECKING:
    from claas.services.local.service_client import LocalServiceClient


class LocalSamplingClient:
    """In-process stand-in for `tinker.SamplingClient`, bound to one adapter or to the base."""

    def __init__(
        self,
        service: LocalServiceClient,
        adapter: str | None,
        loader: Callable[[], LoadedCheckpoint] | None,
        model_path: str | None = None,
        owner: object | None = None,
    ) -> None:
        self.service = service
        self.host = service.host
        self.adapter = adapter
        self.model_path = model_path
        self._loader = loader
        self._owner = owner  # an inflight sampler's training client: its adapter stays its own
        if loader is not None and adapter is not None:
            weakref.finalize(self, self.host.release_adapter, adapter)

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        return self.host.loaded.tokenizer

    def get_base_model(self) -> str:
        return self.service.base_model

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
        *,
        on_token: TokenCallback | None = None,
    ) -> APIFuture[types.SampleResponse]:
        """Tinker's `sample`. Beyond it: `on_token(sample, token, logprob)` for streaming, and
        OpenAI's logit rules when `sampling_params` is a `ChatSamplingParams`.

        `prompt_logprobs_last_n` scores only the last N prompt positions (prompt and top-K
        log-probs of earlier ones are None), and rows of `target_prompt_logprobs` before the
        first requested id are not computed, as on Tinker; both skip work here.
        """
        if prompt_alt_tokens_k:
            raise InvalidRequest("prompt_alt_tokens_k is not supported by the local service")
        if not 0 <= topk_sample_logprobs <= 1000:
            raise InvalidRequest(
                f"topk_sample_logprobs must be in 0..1000, got {topk_sample_logprobs}"
            )
        if prompt_logprobs_last_n is not None and not include_prompt_logprobs:
            raise InvalidRequest("prompt_logprobs_last_n requires include_prompt_logprobs=True")
        request = self._validate(
            prompt, num_samples, sampling_params, topk_prompt_logprobs, target_prompt_logprobs
        )
        length = len(request.prompt)
        # Prompt and top-K log-probs: every position, or the last N. Target rows: from the
        # first row naming an id. The forward pass projects logits from the earliest of both.
        prompt_row = _last_n_row(length, prompt_logprobs_last_n)
        wants_prompt = include_prompt_logprobs or topk_prompt_logprobs > 0
        first_row = min(
            prompt_row if wants_prompt else length - 1, _first_target_row(length, request.targets)
        )
        scoring = include_prompt_logprobs or topk_prompt_logprobs > 0 or request.targets is not None
        single = num_samples == 1 and request.max_tokens == 1 and not request.stop_strings
        if scoring and single and on_token is None and not topk_sample_logprobs:
            # A scoring pass (the engine sends several at once): batch it with its neighbours.
            job = _ScoreJob(
                request, include_prompt_logprobs, topk_prompt_logprobs, first_row, prompt_row
            )
            key = f"score:{self.adapter}:{id(self._loader)}"
            return self.host.submit_batched(key, job, self._score_batch)
        inflight = self.adapter is not None and self._loader is None
        if not scoring and not inflight:  # a chat: it joins the running batch
            return self._sample_batched(request, on_token, topk_sample_logprobs)
        return self.host.submit(
            lambda: self._sample(
                request,
                include_prompt_logprobs,
                topk_prompt_logprobs,
                on_token,
                first_row,
                prompt_row,
                topk_sample_logprobs,
            )
        )

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        request = self._validate(prompt, 1, types.SamplingParams(max_tokens=1), 0, None)
        first_row = _last_n_row(len(request.prompt), prompt_logprobs_last_n)

        def score() -> list[float | None]:
            length = len(request.prompt)
            with self._active() as model, torch.inference_mode():
                logits, _ = prefill(model, request.prompt, keep=length - first_row)
                scores = score_prompt(logits, request.prompt, 0, None, first_row)
            values: list[float | None] = [None] * (first_row + 1)
            return values + scores.token_logprobs.tolist()

        return self.host.submit(score)

    # -- internals ----------------------------------------------------------------------------
    def _validate(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        params: types.SamplingParams,
        topk: int,
        targets: types.TensorData | None,
    ) -> _SampleRequest:
        loaded = self.host.loaded
        try:
            tokens = prompt.to_ints()
        except ValueError as error:
            raise InvalidRequest(f"prompt must be token chunks ({error})") from error
        if not tokens:
            raise InvalidRequest("the prompt is empty; give at least one token")
        check_token_ids(np.asarray(tokens), len(loaded.tokenizer), "prompt")
        if not 1 <= num_samples <= 64:
            raise InvalidRequest(f"num_samples must be in 1..64, got {num_samples}")
        if not 0 <= topk <= 1000:
            raise InvalidRequest(f"topk_prompt_logprobs must be in 0..1000, got {topk}")
        room = loaded.max_context - len(tokens)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(room, 4096)
        if max_tokens < 1 or max_tokens > room:
            raise ContextTooLong(
                f"prompt of {len(tokens)} tokens + max_tokens {max_tokens} exceeds the model's "
                f"context of {loaded.max_context}; shorten the prompt or lower max_tokens"
            )
        target_ids = None
        if targets is not None:
            target_ids = targets.to_torch(pad_value=-1).long()
            if target_ids.ndim != 2 or target_ids.shape[0] != len(tokens) - 1:
                raise InvalidRequest(
                    f"target_prompt_logprobs must have shape (len(prompt) - 1, K) = "
                    f"({len(tokens) - 1}, K); got {tuple(target_ids.shape)}"
                )
            if target_ids.numel() and (
                target_ids.min() < -1 or target_ids.max() >= len(loaded.tokenizer)
            ):
                raise InvalidRequest("target_prompt_logprobs ids must be -1 or valid token ids")
        if not (params.temperature >= 0 and 0 < params.top_p <= 1):
            raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]")
        rule = SamplingRule(params.temperature, params.top_k, params.top_p)
        if isinstance(params, ChatSamplingParams) and params.has_logit_rules:
            vocab = len(loaded.tokenizer)
            unknown = [i for i in params.logit_bias if not 0 <= i < vocab]
            if unknown:
                raise InvalidRequest(
                    f"logit_bias names token ids {unknown[:5]} outside the vocabulary "
                    f"(0..{vocab - 1})"
                )
            rule = replace(
                rule,
                presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty,
                logit_bias=tuple(sorted(params.logit_bias.items())),
            )
        return _SampleRequest(
            prompt=torch.tensor(tokens, dtype=torch.long, device=loaded.device),
            num_samples=num_samples,
            max_tokens=max_tokens,
            rule=rule,
            stop_ids=self._stop_ids(params.stop),
            stop_strings=[params.stop]
            if isinstance(params.stop, str)
            else [s for s in (params.stop or []) if isinstance(s, str)],
            seed=params.seed,
            targets=None if target_ids is None else target_ids.to(loaded.device),
        )

    def _stop_ids(self, stop: str | Sequence[str] | Sequence[int] | None) -> list[int]:
        defaults = self.host.loaded.stop_token_ids
        if stop is None or isinstance(stop, str):
            return defaults
        ids = [s for s in stop if isinstance(s, int)]
        return ids if ids or not stop else defaults

    def _make_resident(self) -> None:
        """A sampler on a checkpoint or snapshot: load its adapter (worker thread)."""
        if self.adapter is not None and self._loader is not None:
            self.host.ensure_sampler(self.adapter, self._loader)

    @contextmanager
    def _active(self) -> Iterator[Any]:
        self._make_resident()
        with self.host.using(self.adapter) as model:
            yield model

    def _score_batch(self, jobs: list[_ScoreJob]) -> list[types.SampleResponse]:
        """Several one-token scoring passes as one right-padded forward (causal attention:
        padding after a prompt never reaches its positions), projecting only needed rows."""
        device = self.host.loaded.device
        lengths = [len(job.request.prompt) for job in jobs]
        input_ids = torch.zeros(len(jobs), max(lengths), dtype=torch.long, device=device)
        for row, job in enumerate(jobs):
            input_ids[row, : lengths[row]] = job.request.prompt
        responses = []
        with self._active() as model, torch.inference_mode():
            causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            # No padding mask on purpose: with causal attention a row's real positions never
            # see the padding after them, and the unmasked causal kernel is the fast one.
            hidden = causal_lm.model(input_ids=input_ids)[0]
            for row, job in enumerate(jobs):
                request = job.request
                logits = causal_lm.lm_head(hidden[row, job.first_row : lengths[row]]).float()
                scores = score_prompt(
                    logits, request.prompt, job.topk, request.targets, job.first_row
                )
                generator = torch.Generator(device=device)
                seed = (
                    request.seed
                    if request.seed is not None
                    else int.from_bytes(os.urandom(8), "little")
                )
                generator.manual_seed(seed % 2**64)
                rule = request.rule  # no earlier answer tokens: only the bias applies
                token = choose_next(apply_logit_rules(logits[-1:], rule, None), rule, generator)
                logprob = logprobs_at(logits[-1:], token[:, None])
                sequence = types.SampledSequence(
                    stop_reason="stop" if int(token) in request.stop_ids else "length",
                    sequence_id=f"seq-{uuid.uuid4().hex}",
                    tokens_np=token.cpu().numpy().astype(np.int32),
                    logprobs_np=logprob[:, 0].cpu().numpy().astype(np.float32),
                )
                responses.append(
                    sample_response(
                        [sequence],
                        scores,
                        job.include_prompt_logprobs,
                        lengths[row],
                        job.prompt_row,
                    )
                )
        return responses

    def _stream(
        self, request: _SampleRequest, on_token: TokenCallback | None, topk: int
    ) -> SampleStream:
        """How the request's samples are chosen, recorded, streamed and stopped."""
        tokenizer = self.host.loaded.tokenizer
        generator = torch.Generator(device=request.prompt.device)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        generator.manual_seed(seed % 2**64)  # any int seeds; torch takes 0 .. 2**64 - 1
        stop_check = None
        if request.stop_strings:
            window = max(len(s) for s in request.stop_strings) + 16

            def stop_check(tokens: list[int]) -> bool:
                tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
                return any(s in tail for s in request.stop_strings)

        return SampleStream(
            request.num_samples,
            request.max_tokens,
            request.rule,
            request.stop_ids,
            stop_check,
            generator,
            on_token,
            topk,
        )

    def _sample_batched(
        self, request: _SampleRequest, on_token: TokenCallback | None, topk: int
    ) -> APIFuture[types.SampleResponse]:
        """A chat through the continuous batch (`scheduler`), with any other running chats."""

        def answer(generations: list[Generation]) -> types.SampleResponse:
            sequences = sampled_sequences(generations, topk)
            return sample_response(sequences, None, False, len(request.prompt), 0)

        stream = self._stream(request, on_token, topk)
        decoder = self.host.decoder
        result = decoder.decode(request.prompt, stream, self.adapter, self._make_resident, answer)
        return AwaitableConcurrentFuture(result)

    def _sample(
        self,
        request: _SampleRequest,
        include_prompt_logprobs: bool,
        topk: int,
        on_token: TokenCallback | None,
        first_row: int,
        prompt_row: int,
        topk_sample: int = 0,
    ) -> types.SampleResponse:
        """One request alone: a prompt-scoring sample, or one on a training client's live
        weights."""
        with self._active() as model, torch.inference_mode():
            scoring = include_prompt_logprobs or topk > 0 or request.targets is not None
            keep = len(request.prompt) - first_row if scoring else 1
            logits, cache = prefill(model, request.prompt, keep)
            scores = None
            if scoring:
                scores = score_prompt(logits, request.prompt, topk, request.targets, first_row)
            generations = generate(
                model, logits[-1], cache, self._stream(request, on_token, topk_sample)
            )
        return sample_response(
            sampled_sequences(generations, topk_sample),
            scores,
            include_prompt_logprobs,
            len(request.prompt),
            prompt_row,
        )


def _last_n_row(length: int, last_n: int | None) -> int:
    """The first logits row (row i predicts prompt[i+1]) that `prompt_logprobs_last_n` scores."""
    if last_n is None:
        return 0
    if not 1 <= last_n <= length - 1:
        raise InvalidRequest(
            f"prompt_logprobs_last_n must be in 1..len(prompt) - 1 = {length - 1}, got {last_n}"
        )
    return length - 1 - last_n


def _first_target_row(length: int, targets: torch.Tensor | None) -> int:
    """Rows of target_prompt_logprobs before the first one naming an id are not scored."""
    if targets is None:
        return length - 1
    named = torch.nonzero((targets >= 0).any(dim=-1))
    return int(named[0, 0]) if len(named) else length - 1


@dataclass(frozen=True)
class _ScoreJob:
    request: _SampleRequest
    include_prompt_logprobs: bool
    topk: int
    first_row: int
    prompt_row: int


@dataclass(frozen=True)
class _SampleRequest:
    prompt: torch.Tensor
    num_samples: int
    max_tokens: int
    rule: SamplingRule
    stop_ids: list[int]
    stop_strings: list[str]
    seed: int | None
    targets: torch.Tensor | None
