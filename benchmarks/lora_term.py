"""The batched LoRA term of a decode step, against memory bandwidth and the block-masked form.

On the embedded SmolLM2-135M-Instruct's shapes (the 7 projections of its 30 blocks), random
rank-32 adapters in float32 on CPU, one decode step's LoRA terms (one input per row) are timed
three ways, in one run:
- ours: `lora_term.RankStack.add_term`, the adapters stacked by rank and applied by a `bmm` pair
  (with the rows gathered into their slots when they are not in order);
- the block-masked form it replaced: every adapter's A side by side, a per-row mask keeping each
  row's own block, then every B (two 2-D matmuls on MKL);
- a streaming read (`sum`) of 512 MiB, scaled to the LoRA weights' bytes: what the memory
  gives.

The weights (39 MB per adapter) are larger than the caches from 4 adapters on, as in a decode
step, where the base model's 540 MB stream through the caches between two LoRA layers.

    .venv/bin/python benchmarks/lora_term.py
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from common import STREAM_BYTES, median_seconds, streaming
from tqdm import tqdm

from claas.services.local import shared_model
from claas.services.local.lora_term import LoraPlan, stack_by_rank
from claas.settings import EMBEDDED_MODEL, Settings

RANK = 32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES = [(1, 1), (4, 1), (8, 1), (4, 4)]  # (adapters, rows per adapter)
REPEATS = 15

Weights = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]


def shapes() -> dict[str, tuple[int, int]]:
    """Each LoRA target of the embedded model: (in, out)."""
    loaded = shared_model(EMBEDDED_MODEL, Settings().model_cache_dir, "cpu")
    return {
        name: (module.in_features, module.out_features)
        for name, module in loaded.model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
    }


def adapters(layers: dict[str, tuple[int, int]], count: int) -> Weights:
    generator = torch.Generator().manual_seed(count)
    return {
        f"a{i}": {
            key: (
                torch.randn(RANK, d_in, generator=generator) * 0.01,
                torch.randn(d_out, RANK, generator=generator) * 0.01,
                2.0,
            )
            for key, (d_in, d_out) in layers.items()
        }
        for i in range(count)
    }


def ours(
    layers: dict[str, tuple[int, int]], weights: Weights, rows: list[str | None]
) -> Callable[[], None]:
    plan = LoraPlan(stack_by_rank(weights), rows, set(weights))
    inputs = {key: torch.randn(len(rows), d_in) for key, (d_in, _) in layers.items()}
    outputs = {key: torch.zeros(len(rows), d_out) for key, (_, d_out) in layers.items()}

    def step() -> None:
        for key, stacks in plan.weights.items():
            for stack in stacks:
                route = plan.route(stack, 1)
                assert route is not None
                stack.add_term(inputs[key], route, outputs[key])

    return step


def masked(
    layers: dict[str, tuple[int, int]], weights: Weights, rows: list[str | None]
) -> Callable[[], None]:
    names = list(weights)
    laid_out = {
        key: (
            torch.cat([weights[n][key][0] for n in names]).t().contiguous(),  # (in, ΣR)
            torch.cat([weights[n][key][1] for n in names], dim=1).t().contiguous(),  # (ΣR, out)
        )
        for key in layers
    }
    mask = torch.zeros(len(rows), RANK * len(names))
    for row, name in enumerate(rows):
        slot = names.index(name) if name is not None else -1
        if slot >= 0:
            mask[row, slot * RANK : (slot + 1) * RANK] = 2.0
    inputs = {key: torch.randn(len(rows), d_in) for key, (d_in, _) in layers.items()}
    outputs = {key: torch.zeros(len(rows), d_out) for key, (_, d_out) in layers.items()}

    def step() -> None:
        for key, (a, b) in laid_out.items():
            outputs[key].addmm_((inputs[key] @ a).mul_(mask), b)

    return step


def main() -> None:
    layers = shapes()
    lines = []
    with torch.inference_mode():
        for count, per in tqdm(CASES, desc="cases"):
            weights = adapters(layers, count)
            # rows interleaved (a0, a1, ..., a0, a1, ...): in order only at one row per adapter
            rows: list[str | None] = [f"a{i}" for _ in range(per) for i in range(count)]
            nbytes = sum(a.nbytes + b.nbytes for w in weights.values() for a, b, _ in w.values())
            sides = {
                "ours": ours(layers, weights, rows),
                "masked": masked(layers, weights, rows),
                "stream": streaming(),
            }
            seconds: dict[str, list[float]] = {name: [] for name in sides}
            for turn in range(3):  # alternated, so a busy spell hits all three
                order = list(sides) if turn % 2 == 0 else list(sides)[::-1]
                for name in order:
                    seconds[name].append(median_seconds(sides[name], REPEATS))
            med = {name: statistics.median(values) for name, values in seconds.items()}
            med["stream"] *= nbytes / STREAM_BYTES
            lines.append(
                f"{count} adapters x {per} row(s): {nbytes / 1e6:.0f} MB; ours "
                f"{med['ours'] * 1e3:.2f} ms ({nbytes / med['ours'] / 1e9:.1f} GB/s), masked "
                f"{med['masked'] * 1e3:.2f} ms, streaming read {med['stream'] * 1e3:.2f} ms "
                f"({nbytes / med['stream'] / 1e9:.1f} GB/s); masked / ours "
                f"{med['masked'] / med['ours']:.2f}x, ours / streaming read "
                f"{med['ours'] / med['stream']:.2f}x"
            )
    print(
        f"One decode step's LoRA terms, {EMBEDDED_MODEL}'s {len(layers)} projections, rank "
        f"{RANK}, float32, {torch.get_num_threads()} threads; medians of {REPEATS} x 3 "
        "alternated"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
