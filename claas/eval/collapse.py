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

Length drift (mean answer length against the baseline) is computed by the runner from the probe
answers of every step, since it needs no extra samples.
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
