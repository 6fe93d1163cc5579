"""Tinker's response layout: what the local sampler answers, placed as Tinker places it.

A `SampleResponse` holds each sample's tokens and log-probs (`sampled_sequences`) and, when
asked, the prompt's log-probs, top-K and target log-probs (`sample_response`). Prompt position p
is row p - 1 of the prompt scores; positions the request did not ask about hold Tinker's fillers
(NaN, `MASK_LOGPROB`, 0.0).
"""

from __future__ import annotations

import uuid

import numpy as np
from tinker import types
from tinker.types.topk_logprobs import MASK_LOGPROB, TopkLogprobs

from claas.services.local.decoding import Generation, PromptScores


def sampled_sequences(generations: list[Generation], topk: int) -> list[types.SampledSequence]:
    """Each generation as Tinker's `SampledSequence`, with its top-`topk` when asked."""
    return [
        types.SampledSequence(
            stop_reason="stop" if g.stopped else "length",
            sequence_id=f"seq-{uuid.uuid4().hex}",
            tokens_np=np.asarray(g.tokens, dtype=np.int32),
            logprobs_np=np.asarray(g.logprobs, dtype=np.float32),
            topk_logprobs_np=_topk_matrices(g, topk) if topk else None,
        )
        for g in generations
    ]


def _topk_matrices(generation: Generation, k: int) -> TopkLogprobs:
    """A generation's per-step top-k as Tinker's dense (tokens, k) matrices."""
    k = min(k, max((len(row) for row in generation.topk_ids), default=k))
    ids = np.asarray(generation.topk_ids, dtype=np.int32).reshape(-1, k)
    logprobs = np.asarray(generation.topk_logprobs, dtype=np.float32).reshape(-1, k)
    return TopkLogprobs(token_ids=ids, logprobs=logprobs)


def sample_response(
    sequences: list[types.SampledSequence],
    scores: PromptScores | None,
    include_prompt_logprobs: bool,
    length: int,
    prompt_row: int,
) -> types.SampleResponse:
    """Tinker's layout: prompt position p is row p − 1 of the scores. Prompt and top-K
    log-probs start at `prompt_row` (earlier positions: NaN / sentinel rows), targets at the
    scores' first row (earlier: 0.0)."""
    prompt_logprobs = topk = target = None
    if scores is not None:
        skip = prompt_row - scores.first_row  # rows computed only for the targets
        start = prompt_row + 1  # the first prompt position with a prompt log-prob
        if include_prompt_logprobs:
            prompt_logprobs = np.full(length, np.nan, dtype=np.float32)
            prompt_logprobs[start:] = scores.token_logprobs[skip:].cpu().numpy()
        if scores.topk_ids is not None and scores.topk_logprobs is not None:
            k = scores.topk_ids.shape[1]
            ids = np.zeros((length, k), dtype=np.int32)
            logprobs = np.full((length, k), MASK_LOGPROB, dtype=np.float32)
            ids[start:] = scores.topk_ids[skip:].cpu().numpy()
            logprobs[start:] = scores.topk_logprobs[skip:].cpu().numpy()
            topk = TopkLogprobs(token_ids=ids, logprobs=logprobs)
        if scores.target_logprobs is not None:
            rows = scores.target_logprobs.cpu().numpy()
            full = np.zeros((length - 1, rows.shape[1]), dtype=np.float32)
            full[scores.first_row :] = rows
            target = types.TensorData.from_numpy(full)
    return types.SampleResponse(
        sequences=sequences,
        prompt_logprobs_np=prompt_logprobs,
        topk_prompt_logprobs_np=topk,
        target_prompt_logprobs=target,
    )
