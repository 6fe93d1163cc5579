"""Packed weights: the base linears of a batched forward run by oneDNN on weights packed once.

At the few rows of a decode step a linear layer only streams its weight from memory. MKL's GEMM
on a weight in PyTorch's layout reaches well under the memory's bandwidth there; oneDNN on the
weight reordered once into its blocked layout comes close to it (the measurements: "Where a
decode step's time goes" in benchmarks/batching.md). So, on a CPU in float32, the decoder's
batched forwards run the base linears on packed copies (`PackedLinears`). The copies cost the
linear weights' memory again: `Settings.packed_weights` turns them off, and `PackedWeights`
skips them when memory is short. LoRA's own A and B are left alone.

One row (one stream's decode step) is the exception: there, even packed, a GEMV of a few MB
reads its weight at about half the streaming rate, its threads barely used. It runs instead as
a batched product over blocks of the weight's rows, one block per thread, on a view of the
weight (`SPLIT_ONE_ROW`; measured in `benchmarks/decode_ceiling.py`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch

from claas.models import LoadedModel

logger = logging.getLogger(__name__)

PACK_ROWS_HINT = 8  # the batch size oneDNN picks a packed layout for: a decode step's few rows
# One row (one stream's decode step) runs as a GEMV split across the threads, on a view of the
# weight; more rows run on the packed copy. Read when a forward starts (benchmarks switch it).
SPLIT_ONE_ROW = True


class PackedWeights:
    """Whether the decoder's batched forwards run on packed weights, and the packed copies
    (made on the first forward that wants them)."""

    def __init__(self, wanted: bool = True) -> None:
        self.wanted = wanted
        self.linears: PackedLinears | None = None

    def _ready(self, loaded: LoadedModel) -> bool:
        """Whether the batched forward runs its linears on packed weights: asked for, float32
        on a CPU with oneDNN, and the copy fits in memory."""
        if self.linears is not None:
            return True
        base = loaded.model
        if not (
            self.wanted
            and loaded.device.type == "cpu"
            and base.dtype == torch.float32
            and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
        ):
            return False
        packed = PackedLinears(base)
        available = psutil.virtual_memory().available
        if packed.nbytes > available // 2:
            logger.warning(
                "not packing the linear weights for decoding: the copy would take %.1f GB of "
                "the %.1f GB available (set CLAAS_PACKED_WEIGHTS=false to silence this)",
                packed.nbytes / 1e9,
                available / 1e9,
            )
            self.wanted = False
            return False
        self.linears = packed
        return True

    @contextmanager
    def active(self, loaded: LoadedModel) -> Iterator[None]:
        """The base linears of `loaded` run by oneDNN on packed weights inside this block,
        when they can (else as they are)."""
        if not self._ready(loaded):
            yield
            return
        assert self.linears is not None
        with self.linears.active():
            yield

    def close(self) -> None:
        """Drop the packed copies."""
        self.linears = None


class PackedLinears:
    """A model's base linear layers, run by oneDNN on weights packed once, while `active`.

    The base weights are frozen, and a weight changed in place is packed again. Float32 on CPU
    only; LoRA's own A and B are left alone.
    """

    def __init__(self, model: Any) -> None:
        self.layers = [
            module
            for name, module in model.named_modules()
            if type(module) is torch.nn.Linear
            and module.weight.dtype == torch.float32
            and module.weight.device.type == "cpu"
            and ".lora_" not in f".{name}"
        ]
        self._packed: dict[int, tuple[int, int, torch.Tensor]] = {}
        # per layer: its forward, made once per weight (storage, version) and thread count
        self._forwards: dict[int, tuple[tuple[int, int, int], Callable[..., torch.Tensor]]] = {}
        self.nbytes = sum(layer.weight.nbytes for layer in self.layers)  # of the copies

    def _weight(self, layer: torch.nn.Linear) -> torch.Tensor:
        weight = layer.weight
        key = (weight.data_ptr(), weight._version)
        cached = self._packed.get(id(layer))
        if cached is None or cached[:2] != key:
            cached = (*key, _pack(weight.detach()))
            self._packed[id(layer)] = cached
        return cached[2]

    def _forward(self, layer: torch.nn.Linear, parts: int) -> Callable[..., torch.Tensor]:
        """`layer`'s forward on its packed copy (one row split over `parts` threads), kept
        between forwards while the weight and the thread count stay the same."""
        weight = layer.weight
        key = (weight.data_ptr(), weight._version, parts)
        cached = self._forwards.get(id(layer))
        if cached is None or cached[0] != key:
            forward = _packed_forward(self._weight(layer), weight.detach(), layer.bias, parts)
            cached = (key, forward)
            self._forwards[id(layer)] = cached
        return cached[1]

    @contextmanager
    def active(self) -> Iterator[None]:
        patched = []
        parts = torch.get_num_threads() if SPLIT_ONE_ROW else 1
        try:
            for layer in self.layers:
                layer.forward = self._forward(layer, parts)  # type: ignore[method-assign]
                patched.append(layer)
            yield
        finally:
            for layer in patched:
                del layer.forward


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """A (out, in) float32 weight reordered into oneDNN's layout, for `_linear`."""
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS_HINT)
    return packed


def _linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + bias, for W packed by `_pack`."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


def _split_gemv(x: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + bias for ONE row of x, as a batched product over `blocks`, W's rows cut into one
    block per thread (`_blocks`): the batch is split across the threads. A GEMV of a few MB run
    by MKL or oneDNN does not use the second core (`benchmarks/speed.md`)."""
    parts, k, n = blocks.shape
    out = torch.bmm(x.reshape(1, 1, k).expand(parts, 1, k), blocks).reshape(
        *x.shape[:-1], parts * n
    )
    return out if bias is None else out + bias


def _blocks(weight: torch.Tensor, parts: int) -> torch.Tensor:
    """W (out, in) as `parts` blocks of its rows, each transposed: (parts, in, out / parts), a
    view of W (so it follows W's weights, no copy)."""
    n, k = weight.shape
    return weight.view(parts, n // parts, k).transpose(1, 2)


def _packed_forward(
    packed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward of a linear with `weight`: one row as a split GEMV over `parts` threads
    (when the rows divide evenly), more rows on the packed copy."""
    blocks = _blocks(weight, parts) if parts > 1 and weight.shape[0] % parts == 0 else None

    def forward(x: torch.Tensor) -> torch.Tensor:
        if blocks is not None and x.numel() == x.shape[-1]:
            return _split_gemv(x, blocks, bias)
        return _linear(x, packed, bias)

    return forward
