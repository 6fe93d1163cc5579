"""Tinker's loss functions, as the local service computes them: plain sums over tokens and datums.

- `cross_entropy`: −Σ logp(target)·weight, with targets and weights (N,) or (N, K);
- `importance_sampling`: −Σ exp(logp(target) − sampling_logprob)·advantage.

Position i of a Datum's `model_input` predicts `target_tokens[i]`. `prepare_datums` validates
datums against these shapes (errors name the datum) and turns them into tensors; the training
client runs `target_logprobs` and `datum_loss` on the worker and reports `_forward_output`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tinker import types

from claas.errors import InvalidRequest
from claas.services.local.decoding import log_normaliser

LOSS_INPUTS = {
    "cross_entropy": ("target_tokens", "weights"),
    "importance_sampling": ("target_tokens", "logprobs", "advantages"),
}


@dataclass(frozen=True)
class PreparedDatum:
    input_ids: torch.Tensor  # (N,)
    inputs: dict[str, torch.Tensor]  # loss_fn_inputs as tensors, first dim N


def prepare_datums(
    data: Sequence[types.Datum], loss_fn: str, vocab_size: int, max_context: int
) -> list[PreparedDatum]:
    """Validate datums for `loss_fn` and turn them into tensors. Errors name the datum."""
    if loss_fn not in LOSS_INPUTS:
        raise InvalidRequest(
            f"loss_fn {loss_fn!r} is not supported by the local service; use one of "
            f"{sorted(LOSS_INPUTS)}"
        )
    if not data:
        raise InvalidRequest("no datums given; pass at least one types.Datum")
    prepared = []
    for index, datum in enumerate(data):
        where = f"datum {index}"
        try:
            tokens = datum.model_input.to_ints()
        except ValueError as error:
            raise InvalidRequest(f"{where}: model_input must be token chunks ({error})") from error
        n = len(tokens)
        if n == 0 or n > max_context:
            raise InvalidRequest(f"{where}: model_input has {n} tokens; need 1..{max_context}")
        check_token_ids(np.asarray(tokens), vocab_size, f"{where} model_input")
        needed = LOSS_INPUTS[loss_fn]
        unknown = set(datum.loss_fn_inputs) - set(needed)
        missing = [key for key in needed if key not in datum.loss_fn_inputs]
        if missing or unknown:
            raise InvalidRequest(
                f"{where}: {loss_fn} needs loss_fn_inputs {list(needed)}; missing {missing}, "
                f"unexpected {sorted(unknown)}"
            )
        arrays = {key: datum.loss_fn_inputs[key].to_numpy() for key in needed}
        target_shape = arrays["target_tokens"].shape
        if target_shape[:1] != (n,) or len(target_shape) > 2:
            raise InvalidRequest(
                f"{where}: target_tokens has shape {target_shape}; it must be (N,) or (N, K) with "
                f"N = {n}, the model_input length (position i predicts target_tokens[i])"
            )
        if loss_fn == "importance_sampling" and len(target_shape) != 1:
            raise InvalidRequest(f"{where}: importance_sampling needs (N,) target_tokens")
        check_token_ids(arrays["target_tokens"], vocab_size, f"{where} target_tokens")
        for key in needed[1:]:
            if arrays[key].shape != target_shape:
                raise InvalidRequest(
                    f"{where}: {key} has shape {arrays[key].shape} but target_tokens has "
                    f"{target_shape}; they must match"
                )
            if not np.all(np.isfinite(arrays[key])):
                raise InvalidRequest(f"{where}: {key} contains NaN or inf; refusing to train")
        prepared.append(
            PreparedDatum(
                input_ids=torch.tensor(tokens, dtype=torch.long),
                inputs={
                    key: torch.from_numpy(np.ascontiguousarray(value))
                    for key, value in arrays.items()
                },
            )
        )
    return prepared


def check_token_ids(ids: np.ndarray, vocab_size: int, what: str) -> None:
    """InvalidRequest if `ids` (a prompt, targets) names a token outside the vocabulary."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InvalidRequest(f"{what} has token ids outside [0, {vocab_size}); check the tokenizer")


def target_logprobs(model: Any, batch: Sequence[PreparedDatum], device: torch.device) -> list[Any]:
    """Per datum, log p(target_tokens[i] | model_input[:i+1]), shaped like target_tokens."""
    lengths = [len(d.input_ids) for d in batch]
    width = max(lengths)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    for row, datum in enumerate(batch):
        input_ids[row, : lengths[row]] = datum.input_ids
        attention[row, : lengths[row]] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
    results = []
    for row, datum in enumerate(batch):
        row_logits = logits[row, : lengths[row]].float()
        targets = datum.inputs["target_tokens"].to(device)
        flat = targets if targets.ndim == 2 else targets[:, None]
        # The value is normalised as the sampler does it (a float32 logsumexp rounds by ~1e-6,
        # enough to push a top-K mass over 1); the gradient is logsumexp's, which keeps no
        # (N, V) tensor of its own for the backward.
        lse = torch.logsumexp(row_logits, dim=-1, keepdim=True).double()
        with torch.no_grad():
            rounding = log_normaliser(row_logits) - lse
        picked = (row_logits.gather(-1, flat).double() - lse - rounding).float()
        results.append(picked if targets.ndim == 2 else picked[:, 0])
    return results


def datum_loss(loss_fn: str, logprobs: torch.Tensor, datum: PreparedDatum) -> torch.Tensor:
    """Tinker's loss for one datum, a plain sum over its positions."""
    inputs = {k: v.to(logprobs.device) for k, v in datum.inputs.items()}
    if loss_fn == "cross_entropy":
        return -(logprobs * inputs["weights"]).sum()
    ratio = torch.exp(logprobs - inputs["logprobs"])
    return -(ratio * inputs["advantages"]).sum()


def _forward_output(
    logprobs: Sequence[torch.Tensor], losses: Sequence[torch.Tensor]
) -> types.ForwardBackwardOutput:
    return types.ForwardBackwardOutput(
        loss_fn_output_type="TensorData",
        loss_fn_outputs=[
            {
                "logprobs": types.TensorData.from_numpy(lp.detach().float().cpu().numpy()),
                "loss": types.TensorData.from_numpy(
                    np.array([float(loss.detach())], dtype=np.float32)
                ),
            }
            for lp, loss in zip(logprobs, losses, strict=True)
        ],
        metrics={"loss:sum": float(sum(float(loss.detach()) for loss in losses))},
    )
