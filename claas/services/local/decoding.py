"""Torch kernels of the local service: next-token log-probs, prompt scoring and sampling.

Pure functions of a causal LM and token ids; they know nothing of adapters, futures or Tinker
types. Log-probs are always full-vocabulary and temperature-1, reported as float32 with the
normaliser taken to ~1e-7, so the log-prob a sampler reports for a token is the number a training
forward pass computes for it (to float32 rounding).

Alignment: logits at position i predict token i + 1. A prompt of length L therefore has L − 1
scored positions; position 0 has no preceding context.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from claas.services.protocol import StopGeneration

StopCheck = Callable[[list[int]], bool]


def log_normaliser(logits: torch.Tensor) -> torch.Tensor:
    """logsumexp over the vocabulary (..., 1), accurate to ~1e-7.

    Exponentials in float32 after a max shift, summed in float64: a plain float32 logsumexp
    rounds by ~1e-6, enough to push a top-K mass over 1, which the divergence rightly refuses.
    """
    peak = logits.amax(dim=-1, keepdim=True)
    total = torch.exp(logits - peak).sum(dim=-1, keepdim=True, dtype=torch.float64)
    return peak.double() + total.log()


def logprobs_at(
    logits: torch.Tensor, ids: torch.Tensor, normaliser: torch.Tensor | None = None
) -> torch.Tensor:
    """Full-vocabulary log-probs of `ids` (..., k) under float32 `logits` (..., V), as float32.

    Pass `normaliser` (from `log_normaliser`) to reuse it across several gathers.
    """
    lse = log_normaliser(logits) if normaliser is None else normaliser
    return (logits.gather(-1, ids).double() - lse).float()


@dataclass(frozen=True)
class PromptScores:
    """Scores of a prompt's own tokens, for rows first_row .. L-2.

    Row i describes prompt position i + 1 (the token predicted by the logits at position i).
    Rows before `first_row` were not computed (Tinker's `prompt_logprobs_last_n`).
    """

    first_row: int
    token_logprobs: torch.Tensor  # (rows,) log-prob of prompt[i+1]
    topk_ids: torch.Tensor | None  # (rows, k)
    topk_logprobs: torch.Tensor | None  # (rows, k)
    target_logprobs: torch.Tensor | None  # (rows, K) at the requested ids, 0.0 where id == -1


def score_prompt(
    logits: torch.Tensor,
    prompt: torch.Tensor,
    topk: int,
    targets: torch.Tensor | None,
    first_row: int = 0,
) -> PromptScores:
    """Score a prompt (L,) from the logits of its positions first_row .. L-1."""
    length = prompt.shape[0]
    logits = logits[-(length - first_row) : -1].float()  # row j is prompt position first_row+j
    lse = log_normaliser(logits)
    token_logprobs = logprobs_at(logits, prompt[first_row + 1 :, None], lse).squeeze(-1)
    topk_ids = topk_logprobs = None
    if topk > 0:
        topk_ids = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices
        topk_logprobs = logprobs_at(logits, topk_ids, lse)
    target_logprobs = None
    if targets is not None:
        rows = targets[first_row:]
        target_logprobs = logprobs_at(logits, rows.clamp(min=0), lse).masked_fill(rows < 0, 0.0)
    return PromptScores(first_row, token_logprobs, topk_ids, topk_logprobs, target_logprobs)


@dataclass(frozen=True)
class SamplingRule:
    temperature: float
    top_k: int
    top_p: float
    # OpenAI's logit rules: subtracted per earlier occurrence of a token in this answer
    # (frequency), once if it occurred at all (presence); `logit_bias` adds to given ids.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def penalises(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def apply_logit_rules(
    logits: torch.Tensor, rule: SamplingRule, counts: torch.Tensor | None
) -> torch.Tensor:
    """`logits` (n, V) as the rules shape them for choosing; `counts` (n, V) holds how often
    each token already occurs in each row's answer (None without penalties)."""
    if rule.logit_bias:
        ids = torch.tensor([i for i, _ in rule.logit_bias], device=logits.device)
        values = torch.tensor([v for _, v in rule.logit_bias], device=logits.device)
        logits = logits.float().index_add(-1, ids, values.expand(logits.shape[0], -1))
    if counts is not None:
        logits = (
            logits.float()
            - rule.frequency_penalty * counts
            - rule.presence_penalty * (counts > 0).float()
        )
    return logits


# Temperatures below this are greedy (as vLLM's): dividing logits by a denormal overflows them.
GREEDY_BELOW = 1e-5


def choose_next(
    logits: torch.Tensor, rule: SamplingRule, generator: torch.Generator
) -> torch.Tensor:
    """Pick one token per row of `logits` (n, V), after `apply_logit_rules`. A temperature
    below `GREEDY_BELOW` is greedy; top-k and top-p always keep the likeliest token, so a top_p
    as small as a denormal samples it alone."""
    if rule.temperature < GREEDY_BELOW:
        return logits.argmax(dim=-1)
    scaled = logits.float() / rule.temperature
    if 0 < rule.top_k < scaled.shape[-1]:
        kth = scaled.topk(rule.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if rule.top_p < 1.0:
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p; the first token always stays (in
        # float32 a top_p below 1e-45 is 0, and a mass before it of 0 would reach it).
        drop_sorted = (probs.cumsum(dim=-1) - probs) >= rule.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    probs = scaled.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    tokens: list[int]
    logprobs: list[float]
    stopped: bool  # True: a stop token or string ended it; False: max_tokens did
    # With `topk`: the k likeliest tokens at each step and their log-probs (the model's own).
    topk_ids: list[list[int]] = field(default_factory=list)
    topk_logprobs: list[list[float]] = field(default_factory=list)


def prefill(model: Any, prompt: torch.Tensor, keep: int = 0) -> tuple[torch.Tensor, Any]:
    """Run the prompt (L,) once. Returns the logits of its last `keep` positions (all if 0),
    shape (keep, V), and the KV cache. Unneeded positions skip the vocabulary projection."""
    out = model(input_ids=prompt[None], use_cache=True, logits_to_keep=keep)
    return out.logits[0], out.cache


class SampleStream:
    """One request's samples while they are decoded, in whatever batch they run.

    `advance(logits)` takes one row of logits per running sample, chooses each next token by the
    request's rule, records it (token, the model's own log-prob, and the `topk` likeliest),
    streams it through `on_token`, and ends samples on a stop token, a stop string or
    `max_tokens`. The same request therefore gives the same tokens alone (`generate`) or among
    other requests (`claas.services.local.running_batch`), up to the float rounding of its logits.
    """

    def __init__(
        self,
        num_samples: int,
        max_tokens: int,
        rule: SamplingRule,
        stop_ids: Sequence[int],
        stop_check: StopCheck | None,
        generator: torch.Generator,
        on_token: Callable[[int, int, float], None] | None = None,
        topk: int = 0,
    ) -> None:
        self.generations = [Generation([], [], False) for _ in range(num_samples)]
        self.active = list(range(num_samples))  # the samples still running, in row order
        self.max_tokens = max_tokens
        self.rule = rule
        self.stop_set = set(stop_ids)
        self.stop_check = stop_check
        self.generator = generator
        self.on_token = on_token
        self.topk = topk
        self.finished = False
        self.next_tokens = torch.zeros(0, dtype=torch.long)  # the running samples' last tokens
        self._counts: torch.Tensor | None = None

    def advance(self, logits: torch.Tensor) -> list[int]:
        """Choose the next token of every running sample from `logits` (one row each, in
        `active` order). Returns the rows whose samples go on; `finished` is then set when none
        does (or the client went away: `on_token` raised `StopGeneration`)."""
        rule = self.rule
        if rule.penalises and self._counts is None:
            self._counts = torch.zeros(len(self.active), logits.shape[-1], device=logits.device)
        next_tokens = choose_next(
            apply_logit_rules(logits, rule, self._counts), rule, self.generator
        )
        normaliser = log_normaliser(logits.float())
        next_logprobs = logprobs_at(logits.float(), next_tokens[:, None], normaliser).squeeze(-1)
        top_ids = top_logprobs = None
        if self.topk > 0:
            top_ids = logits.topk(min(self.topk, logits.shape[-1]), dim=-1).indices
            top_logprobs = logprobs_at(logits.float(), top_ids, normaliser)
        if self._counts is not None:
            self._counts[torch.arange(len(self.active)), next_tokens] += 1
        going_on = []
        for row, index in enumerate(self.active):
            token, logprob = int(next_tokens[row]), float(next_logprobs[row])
            generation = self.generations[index]
            generation.tokens.append(token)
            generation.logprobs.append(logprob)
            if top_ids is not None and top_logprobs is not None:
                generation.topk_ids.append(top_ids[row].tolist())
                generation.topk_logprobs.append(top_logprobs[row].tolist())
            if self.on_token is not None:
                try:
                    self.on_token(index, token, logprob)
                except StopGeneration:
                    self.finished = True
                    return []
            stop_check = self.stop_check
            if token in self.stop_set or (stop_check is not None and stop_check(generation.tokens)):
                generation.stopped = True
            elif len(generation.tokens) < self.max_tokens:
                going_on.append(row)
        self.active = [self.active[row] for row in going_on]
        self.next_tokens = next_tokens[going_on]
        if self._counts is not None:
            self._counts = self._counts[going_on]
        self.finished = not self.active
        return going_on


def generate(
    model: Any, prompt_logits_last: torch.Tensor, cache: Any, stream: SampleStream
) -> list[Generation]:
    """Decode one request's samples (`stream`) in one batch, after a prefill of batch size 1
    whose last logits and cache are given. Returns the generations; a client that went away
    (`on_token` raised `StopGeneration`) gets the tokens so far."""
    samples = len(stream.active)
    if samples > 1:
        cache.batch_repeat_interleave(samples)
    logits = prompt_logits_last[None].expand(samples, -1)
    while True:
        rows = len(stream.active)
        going_on = stream.advance(logits)
        if stream.finished:
            return stream.generations
        if len(going_on) < rows:
            cache.batch_select_indices(torch.tensor(going_on, device=logits.device))
        out = model(input_ids=stream.next_tokens[:, None], cache=cache, use_cache=True)
        logits = out.logits[:, -1]
        cache = out.cache
