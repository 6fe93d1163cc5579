"""What one eval step measures, through the public API, on the adapter's current version.

Each function turns answers from the server into flat metrics (str → number):

- `compliance`: the preference's verifier, mean over its held-out probes (one answer each, at the
  run's temperature, with a seed fixed per probe so that steps differ only by the adapter);
  `mean_length` is those answers' mean length in tokens.
- `margin`: from `/v1/score`, log p(preferred) − log p(dispreferred) over the preference's
  pairs, summed over tokens (`margin_sum`) and per token (`margin_per_token`, the difference of
  the mean token log-probs, which does not reward a shorter answer for being short).
- `capability`: accuracy on the capability set, greedy.
- `collapse`: see `claas.eval.collapse`, on temperature-1 samples with logprobs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

from claas.eval import collapse
from claas.eval.capability import CapabilityQuestion, is_correct
from claas.eval.client import Answer, ClaasClient
from claas.eval.config import EvalConfig
from claas.eval.preferences import Preference

T = TypeVar("T")
R = TypeVar("R")


def derive_seed(seed: int, *parts: object) -> int:
    """A deterministic 31-bit seed for one sampling call, from the run's seed and its role."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class Measurer:
    """Samples and scores through one client, a few requests in flight at a time."""

    def __init__(self, client: ClaasClient, config: EvalConfig) -> None:
        self.client = client
        self.config = config
        self.pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="claas-eval")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def parallel(self, function: Callable[[T], R], items: Sequence[T]) -> list[R]:
        return list(self.pool.map(function, items))

    def answers(
        self, model: str, prompts: Sequence[str], seeds: Sequence[int], **sampling: Any
    ) -> list[Answer]:
        sampling = {
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            **sampling,
        }
        return self.parallel(
            lambda job: self.client.chat(model, job[0], seed=job[1], **sampling),
            list(zip(prompts, seeds, strict=True)),
        )

    def compliance(
        self, model: str, preference: Preference
    ) -> tuple[dict[str, float], list[dict[str, Any]]]:
        prompts = preference.probes[: self.config.probe_limit]
        seeds = [
            derive_seed(self.config.seed, "probe", preference.name, i) for i in range(len(prompts))
        ]
        answers = self.answers(model, prompts, seeds)
        verifier = preference.build_verifier()
        scores = [verifier.score(a.text, a.finish_reason) for a in answers]
        probes = [
            {"prompt": prompt, "response": a.text, "score": score, "finish_reason": a.finish_reason}
            for prompt, a, score in zip(prompts, answers, scores, strict=True)
        ]
        metrics = {
            "compliance": float(np.mean(scores)),
            "mean_length": float(np.mean([a.tokens for a in answers])),
        }
        return metrics, probes

    def margin(self, model: str, preference: Preference) -> dict[str, float]:
        jobs = [
            (p.prompt, text) for p in preference.pairs for text in (p.preferred, p.dispreferred)
        ]
        scored = self.parallel(lambda job: self.client.score(model, job[0], job[1]), jobs)
        sums, per_token = [], []
        for good, bad in zip(scored[0::2], scored[1::2], strict=True):
            sums.append(sum(good) - sum(bad))
            per_token.append(float(np.mean(good)) - float(np.mean(bad)))
        return {"margin_sum": float(np.mean(sums)), "margin_per_token": float(np.mean(per_token))}

    def capability(self, model: str, questions: Sequence[CapabilityQuestion]) -> dict[str, float]:
        questions = questions[: self.config.capability_limit]
        seeds = [derive_seed(self.config.seed, "capability", i) for i in range(len(questions))]
        answers = self.answers(
            model,
            [q.question for q in questions],
            seeds,
            temperature=0.0,
            max_tokens=self.config.capability_max_tokens,
        )
        right = [is_correct(a.text, q.answers) for a, q in zip(answers, questions, strict=True)]
        return {"capability_accuracy": float(np.mean(right))}

    def collapse(self, model: str, preference: Preference) -> dict[str, float]:
        probes = preference.probes[: self.config.collapse_probes]
        k = self.config.collapse_samples
        prompts = [p for p in probes for _ in range(k)]
        seeds = [
            derive_seed(self.config.seed, "collapse", preference.name, i, j)
            for i in range(len(probes))
            for j in range(k)
        ]
        # Temperature 1: −mean log-prob of the model's own samples estimates its entropy.
        answers = self.answers(model, prompts, seeds, temperature=1.0, logprobs=True)
        texts = [a.text for a in answers]
        values = {
            "entropy": collapse.entropy_estimate([a.logprobs for a in answers]),
            "self_rouge_l": collapse.self_rouge_l(
                [texts[i * k : (i + 1) * k] for i in range(len(probes))]
            ),
            "distinct_1": collapse.distinct_n(texts, 1),
            "distinct_2": collapse.distinct_n(texts, 2),
        }
        return {key: value for key, value in values.items() if value is not None}
