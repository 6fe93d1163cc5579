"""What one eval step measures, through the public API, on the adapter's current version.

Each metric group submits its requests to the measurer's thread pool and returns at once (a
`Pending`); the runner submits every group of a step before it waits for any, so the server's
continuous batcher decodes the step's probes, capability questions and collapse samples side by
side instead of one group after another. Every request carries its own seed, so the results do
not depend on `concurrency` or on the order requests are served. Each group then turns its
answers into flat metrics (str → number) and hands back the texts it sampled:

- `compliance`: the preference's verifier, mean over its held-out probes (one answer each, at the
  run's temperature, with a seed fixed per probe so that steps differ only by the adapter);
  `mean_length` is those answers' mean length in tokens.
- `margin`: from `/v1/score`, log p(preferred) − log p(dispreferred) over the preference's
  pairs, summed over tokens (`margin_sum`) and per token (`margin_per_token`, the difference of
  the mean token log-probs, which does not reward a shorter answer for being short).
- `capability`: accuracy on the capability set, greedy.
- `collapse`: see `claas.eval.collapse`, on temperature-1 samples with logprobs.

    pending = [measurer.compliance(model, p) for p in preferences] + [measurer.capability(...)]
    results = [group.result() for group in pending]

Answers are sampled through the official `openai` client (`claas.client.Client.openai()`), as a
user of claas would; scores through `claas.client.Client.score`. An error answer raises
`claas.client`'s `ClaasAPIError`, an unreachable server httpx's `TransportError`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
import numpy as np
import openai

from claas.client import ClaasAPIError, Client, RateLimitError
from claas.client.errors import api_error
from claas.eval import collapse
from claas.eval.capability import CapabilityQuestion, is_correct
from claas.eval.config import EvalConfig
from claas.eval.preferences import Preference
from claas.runs import Probe

T = TypeVar("T")
R = TypeVar("R")


def derive_seed(seed: int, *parts: object) -> int:
    """A deterministic 31-bit seed for one sampling call, from the run's seed and its role."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


@dataclass(frozen=True)
class Answer:
    """One sampled chat answer."""

    completion_id: str
    text: str
    finish_reason: str
    tokens: int
    logprobs: list[float]


def chat(
    client: openai.OpenAI,
    model: str,
    prompt: str,
    *,
    max_tokens: int,
    temperature: float,
    seed: int,
    logprobs: bool = False,
    patience: float,
) -> Answer:
    """One answer to `prompt` from `model`, waiting out 429s for up to `patience` seconds.

    A 429 says this owner has as many generations running as the server allows
    (CLAAS_MAX_CONCURRENT_GENERATIONS_PER_OWNER, which the eval's concurrency may exceed): the
    eval waits for a slot instead of failing the run.
    """
    deadline = time.monotonic() + patience
    while True:
        try:
            completion = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=max_tokens,
                temperature=temperature,
                seed=seed,
                logprobs=logprobs,
            )
            break
        except openai.RateLimitError as error:
            if time.monotonic() > deadline:
                refused = _api_error(error)
                hint = f"; waited {patience:.0f} s for a generation slot: lower concurrency"
                raise RateLimitError(429, refused.type, refused.message + hint) from None
            time.sleep(_retry_after(error.response.headers.get("retry-after")))
        except openai.APIStatusError as error:
            raise _api_error(error) from None
        except openai.APIConnectionError as error:  # after the openai client's own retries
            raise httpx.TransportError(f"{error} ({client.base_url})") from error
    choice = completion.choices[0]
    content = choice.logprobs.content if choice.logprobs is not None else None
    return Answer(
        completion_id=completion.id,
        text=choice.message.content or "",
        finish_reason=choice.finish_reason,
        tokens=completion.usage.completion_tokens if completion.usage else 0,
        logprobs=[float(t.logprob) for t in content or []],
    )


def _api_error(error: openai.APIStatusError) -> ClaasAPIError:
    """`claas.client`'s typed error for the error answer an openai call got (openai carries
    its answers in its own fork of httpx: the answer is copied across)."""
    answer = error.response
    return api_error(
        httpx.Response(answer.status_code, headers=dict(answer.headers), content=answer.content)
    )


def _retry_after(header: str | None) -> float:
    """The seconds a 429 asks to wait (1 when it does not say), within [0.1, 30]."""
    try:
        return min(max(float(header or "1"), 0.1), 30.0)
    except ValueError:
        return 1.0


@dataclass(frozen=True)
class Measured:
    """What one metric group found: its flat metrics, and the text of every answer it sampled
    (for `collapse.repetition_rate`, which the runner takes over the whole step)."""

    metrics: dict[str, float]
    texts: list[str]
    probes: list[Probe] = field(default_factory=list)  # compliance: one per probe


class Pending(Generic[R]):
    """A metric group's requests, already in the pool, and how to turn their results into a
    `Measured`; `result()` waits for them."""

    def __init__(self, futures: list[Future[R]], finish: Callable[[list[R]], Measured]) -> None:
        self.futures = futures
        self.finish = finish

    def result(self) -> Measured:
        return self.finish([future.result() for future in self.futures])


class Measurer:
    """Samples and scores through one client, `concurrency` requests in flight at a time."""

    def __init__(self, claas: Client, config: EvalConfig) -> None:
        self.claas = claas
        # Retries ride out a lost connection or a 5xx; a 429 is waited out in `chat`.
        self.chat_client = claas.openai().with_options(max_retries=8)
        self.config = config
        self.pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="claas-eval")

    def close(self) -> None:
        # A failed step leaves the rest of its requests queued: they would change nothing.
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.chat_client.close()

    def submit(self, function: Callable[[T], R], items: Sequence[T]) -> list[Future[R]]:
        return [self.pool.submit(function, item) for item in items]

    def submit_answers(
        self, model: str, prompts: Sequence[str], seeds: Sequence[int], **sampling: Any
    ) -> list[Future[Answer]]:
        sampling = {
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            **sampling,
        }
        patience = self.claas.timeout  # as long as any request may take

        def sample(job: tuple[str, int]) -> Answer:
            prompt, seed = job
            return chat(self.chat_client, model, prompt, seed=seed, patience=patience, **sampling)

        return self.submit(sample, list(zip(prompts, seeds, strict=True)))

    def answers(
        self, model: str, prompts: Sequence[str], seeds: Sequence[int], **sampling: Any
    ) -> list[Answer]:
        return [f.result() for f in self.submit_answers(model, prompts, seeds, **sampling)]

    def compliance(self, model: str, preference: Preference) -> Pending[Answer]:
        prompts = preference.probes[: self.config.probe_limit]
        seeds = [
            derive_seed(self.config.seed, "probe", preference.name, i) for i in range(len(prompts))
        ]
        verifier = preference.build_verifier()

        def finish(answers: list[Answer]) -> Measured:
            scores = [verifier.score(a.text, a.finish_reason) for a in answers]
            probes = [
                Probe(prompt=prompt, response=a.text, score=score, finish_reason=a.finish_reason)
                for prompt, a, score in zip(prompts, answers, scores, strict=True)
            ]
            metrics = {
                "compliance": float(np.mean(scores)),
                "mean_length": float(np.mean([a.tokens for a in answers])),
            }
            return Measured(metrics, [a.text for a in answers], probes)

        return Pending(self.submit_answers(model, prompts, seeds), finish)

    def margin(self, model: str, preference: Preference) -> Pending[list[float]]:
        jobs = [
            (p.prompt, text) for p in preference.pairs for text in (p.preferred, p.dispreferred)
        ]

        def finish(scored: list[list[float]]) -> Measured:
            sums, per_token = [], []
            for good, bad in zip(scored[0::2], scored[1::2], strict=True):
                sums.append(sum(good) - sum(bad))
                per_token.append(float(np.mean(good)) - float(np.mean(bad)))
            metrics = {
                "margin_sum": float(np.mean(sums)),
                "margin_per_token": float(np.mean(per_token)),
            }
            return Measured(metrics, [])  # scored, not sampled: no answers of the model's own

        def score(job: tuple[str, str]) -> list[float]:
            prompt, text = job
            messages = [{"role": "user", "content": prompt}]
            return self.claas.score(model, messages, text).logprobs

        return Pending(self.submit(score, jobs), finish)

    def capability(self, model: str, questions: Sequence[CapabilityQuestion]) -> Pending[Answer]:
        questions = questions[: self.config.capability_limit]
        seeds = [derive_seed(self.config.seed, "capability", i) for i in range(len(questions))]

        def finish(answers: list[Answer]) -> Measured:
            right = [is_correct(a.text, q.answers) for a, q in zip(answers, questions, strict=True)]
            return Measured(
                {"capability_accuracy": float(np.mean(right))}, [a.text for a in answers]
            )

        futures = self.submit_answers(
            model,
            [q.question for q in questions],
            seeds,
            temperature=0.0,
            max_tokens=self.config.capability_max_tokens,
        )
        return Pending(futures, finish)

    def collapse(self, model: str, preference: Preference) -> Pending[Answer]:
        probes = preference.probes[: self.config.collapse_probes]
        k = self.config.collapse_samples
        prompts = [p for p in probes for _ in range(k)]
        seeds = [
            derive_seed(self.config.seed, "collapse", preference.name, i, j)
            for i in range(len(probes))
            for j in range(k)
        ]

        def finish(answers: list[Answer]) -> Measured:
            texts = [a.text for a in answers]
            values = {
                "entropy": collapse.entropy_estimate([a.logprobs for a in answers]),
                "self_rouge_l": collapse.self_rouge_l(
                    [texts[i * k : (i + 1) * k] for i in range(len(probes))]
                ),
                "distinct_1": collapse.distinct_n(texts, 1),
                "distinct_2": collapse.distinct_n(texts, 2),
            }
            metrics = {key: value for key, value in values.items() if value is not None}
            return Measured(metrics, texts)

        # Temperature 1: −mean log-prob of the model's own samples estimates its entropy.
        futures = self.submit_answers(model, prompts, seeds, temperature=1.0, logprobs=True)
        return Pending(futures, finish)
