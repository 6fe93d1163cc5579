"""The running batch's rows and the one KV cache they share.

Every running sample is a row of one HF `DynamicCache`, left-padded to a common length: a 2-D
attention mask hides each row's padding and `position_ids` give each row its own positions, so
a row attends to exactly its own tokens. Rows join by padding (theirs or the batch's) and leave
by selection; columns that became padding for every row are dropped.

The batch's forwards (`running_batch`) decide which requests join and which samples go on; this
module keeps the cache, the mask and the positions consistent with that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

J = TypeVar("J")  # a row's request


@dataclass
class Rows(Generic[J]):
    """The running rows: per row its request, and the tensors that describe it to the model."""

    jobs: list[J]  # one entry per row (a request with n samples has n rows, adjacent)
    cache: Any  # DynamicCache, batch = rows
    mask: torch.Tensor  # (rows, T) 1 = a real token, 0 = left padding
    positions: torch.Tensor  # (rows,) the position of each row's next token


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts (L,) as one batch for a prefill: input ids (rows, T), left-padded, and their
    mask."""
    lengths = [prompt.shape[0] for prompt in prompts]
    width = max(lengths)
    input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=prompts[0].device)
    mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - lengths[row] :] = prompt
        mask[row, width - lengths[row] :] = 1
    return input_ids, mask


def prefill_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position in its own row (its padding at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def prefilled(jobs: list[J], cache: Any, mask: torch.Tensor, keep: list[int]) -> Rows[J]:
    """The rows of a prefill that go on: `keep` names the prefill's row of each (a prompt whose
    n samples go on is kept n times); `jobs` is the request of each prefill row."""
    index = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(index)
    kept = mask[index]
    rows = Rows([jobs[row] for row in keep], cache, kept, kept.sum(dim=1))
    return _drop_padding(rows)


def joined(rows: Rows[J] | None, new: Rows[J]) -> Rows[J]:
    """`new` rows after the running ones, both padded on the left to the wider of the two."""
    if rows is None:
        return new
    width = max(rows.mask.shape[1], new.mask.shape[1])
    return Rows(
        rows.jobs + new.jobs,
        _cat_caches(_pad_cache(rows.cache, width), _pad_cache(new.cache, width)),
        torch.cat([_pad_left(rows.mask, width), _pad_left(new.mask, width)]),
        torch.cat([rows.positions, new.positions]),
    )


def step_mask(rows: Rows[J]) -> torch.Tensor:
    """The attention mask of a decode step: the rows' mask and one real column for the token."""
    return torch.cat([rows.mask, torch.ones_like(rows.mask[:, :1])], dim=1)


def advanced(rows: Rows[J], cache: Any, mask: torch.Tensor, keep: list[int]) -> Rows[J] | None:
    """The rows after a decode step (its `cache` and `mask`), with only those in `keep`; None
    when no row goes on."""
    if len(keep) == len(rows.jobs):
        return Rows(rows.jobs, cache, mask, rows.positions + 1)
    if not keep:
        return None
    index = torch.tensor(keep, device=mask.device)
    cache.batch_select_indices(index)
    return _drop_padding(
        Rows([rows.jobs[i] for i in keep], cache, mask[index], rows.positions[index] + 1)
    )


def _drop_padding(rows: Rows[J]) -> Rows[J]:
    """The rows without the columns that are padding in every row."""
    first = int(rows.mask.any(dim=0).nonzero()[0, 0])
    if first > 0:
        for layer in rows.cache.layers:
            layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        rows.mask = rows.mask[:, first:]
    return rows


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, T) padded with zeros on the left to (rows, width)."""
    missing = width - tensor.shape[1]
    if missing == 0:
        return tensor
    return torch.cat([tensor.new_zeros(tensor.shape[0], missing), tensor], dim=1)


def _pad_cache(cache: Any, width: int) -> Any:
    for layer in cache.layers:
        missing = width - layer.keys.shape[2]
        if missing:
            shape = (*layer.keys.shape[:2], missing, layer.keys.shape[3])
            layer.keys = torch.cat([layer.keys.new_zeros(shape), layer.keys], dim=2)
            layer.values = torch.cat([layer.values.new_zeros(shape), layer.values], dim=2)
    return cache


def _cat_caches(into: Any, other: Any) -> Any:
    """`other`'s rows appended to `into`'s (same length), in `into`."""
    for layer, more in zip(into.layers, other.layers, strict=True):
        layer.keys = torch.cat([layer.keys, more.keys])
        layer.values = torch.cat([layer.values, more.values])
    return into
