"""Collapse indicators: is the adapter still a varied, calibrated language model?

Computed on several temperature-1 samples of each probe, each drawn with its own seed:

- **entropy** (nats per token): the mean of −log p(token) over every sampled token. With samples
  drawn at temperature 1 from the model's own distribution p, E[−log p(x_t)] is the entropy of
  p at each position, so this mean is an unbiased Monte-Carlo estimate of the average per-token
  entropy along the model's own trajectories (the log-probs are those the server returns with
  `logprobs: true`). A collapsing model grows confident: this falls.
- **self_rouge_l**: the mean pairwise ROUGE-L F1 (`rouge-score`) between samples of the same
  probe. Near 1: the seeds no longer matter, every sample says the same.
- **distinct_1 / distinct_2**: unique n-grams over all n-grams, pooled over the samples
  (lower-cased whitespace tokens). Repetition loops drive these down.

Two more need no extra samples, so the runner computes them on every step:

- **repetition_max / repetition_mean**: `repetition_rate` of each answer the step sampled
  (compliance probes, capability answers, collapse samples and the step's training rollouts):
  the share of an answer's word 3-grams that repeat one seen earlier in the same answer. A
  normal paragraph repeats few: SmolLM2-135M's answers to the shipped probes score 0 to 0.11.
  But that model also loops by itself now and then (a caption that repeats one line six times:
  0.68), mostly on the tweet and caption prompts: 8 of the 204 probe and rollout answers in
  `benchmarks/evals` score over 0.25, and so do 2 of its 7 baselines' `repetition_max`, on 4 to
  6 answers each. The alert (`AlertThresholds.max_repetition`, 0.25) is therefore on
  `repetition_mean`, at most 0.11 on any line there (0.013 over the 146 answers of a fresh
  baseline step with capability and collapse samples): it fires when looping is what the
  model does, not when one answer of many loops; `repetition_max` shows that one.
- **length drift**: mean probe-answer length against the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

import numpy as np
from rouge_score import rouge_scorer

_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def entropy_estimate(logprobs: Sequence[Sequence[float]]) -> float | None:
    """−mean log-prob over the answers' tokens (temperature-1 samples; as the chat API reports
    them, without a closing end-of-turn token, since runs after 2026-11-26); None with none."""
    pooled = [lp for sample in logprobs for lp in sample]
    return float(-np.mean(pooled)) if pooled else None


def self_rouge_l(samples_per_probe: Sequence[Sequence[str]]) -> float | None:
    """Mean pairwise ROUGE-L F1 within each probe's samples, averaged over probes."""
    per_probe = []
    for samples in samples_per_probe:
        pairs = [
            _ROUGE.score(a, b)["rougeL"].fmeasure
            for a, b in combinations(samples, 2)
            if a.strip() and b.strip()
        ]
        if pairs:
            per_probe.append(float(np.mean(pairs)))
    return float(np.mean(per_probe)) if per_probe else None


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over `texts`; None when no text has n words."""
    grams = [
        tuple(words[i : i + n])
        for words in (text.lower().split() for text in texts)
        for i in range(len(words) - n + 1)
    ]
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(text: str, n: int = 3) -> float:
    """The share of `text`'s word n-grams (lower-cased whitespace words) that repeat an n-gram
    seen earlier in the same text: 0 for fresh prose, toward 1 for a loop
    ("lazy lazy lazy lazy lazy lazy": 3 of its 4 3-grams repeat, 0.75). 0 for a text of fewer
    than n + 1 words, where nothing can repeat."""
    words = text.lower().split()
    if len(words) < n + 1:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        repeats += gram in seen
        seen.add(gram)
    return repeats / (len(words) - n + 1)


def repetition(texts: Sequence[str]) -> dict[str, float]:
    """`repetition_max` and `repetition_mean` of `repetition_rate` over `texts` (every answer
    one step sampled); empty when there are none."""
    rates = [repetition_rate(text) for text in texts]
    if not rates:
        return {}
    return {"repetition_max": max(rates), "repetition_mean": float(np.mean(rates))}
