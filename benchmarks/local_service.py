"""Local service on the real SmolLM2-135M-Instruct, against this machine's own limits.

Measured in one run:
- the machine: torch float32 matmul FLOP/s and memory bandwidth (a large tensor copy);
- training: forward_backward + optim_step on 4 datums of ~150 tokens, as achieved FLOP/s
  (6 · params · tokens) against the matmul limit (target >= 35 %);
- sampling: tokens/s of one 128-token greedy sample against the bandwidth bound
  (bandwidth / weight bytes read per token; target >= 50 %), and of 4 batched samples;
- loading: cached model load, and adapter swap (first use of a sampler from disk vs resident).

    .venv/bin/python benchmarks/local_service.py
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tinker import types

from claas.models import load_model
from claas.services.local import LocalServiceClient
from claas.settings import EMBEDDED_MODEL, Settings


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    seconds = best_of(5, lambda: a @ b)
    return 2 * n**3 / seconds


def copy_bandwidth(megabytes: int = 1024) -> float:
    """Bytes moved per second (read + write) by a large contiguous copy."""
    src = torch.empty(megabytes * 2**20 // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = best_of(5, lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / seconds


def main() -> None:
    torch.manual_seed(0)
    settings = Settings()
    flops = matmul_flops()
    bandwidth = copy_bandwidth()
    print(
        f"threads={torch.get_num_threads()}  matmul {flops / 1e9:.1f} GFLOP/s  "
        f"copy bandwidth {bandwidth / 1e9:.2f} GB/s"
    )

    load_model(EMBEDDED_MODEL, settings.model_cache_dir, "cpu")  # make sure the cache exists
    start = time.perf_counter()
    loaded = load_model(EMBEDDED_MODEL, settings.model_cache_dir, "cpu")
    load_seconds = time.perf_counter() - start
    params = sum(p.numel() for p in loaded.model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())

    with tempfile.TemporaryDirectory() as tmp:
        service = LocalServiceClient(loaded, Path(tmp))
        trainer = service.create_lora_training_client(
            service.base_model, rank=32, seed=0, train_unembed=False
        ).result()
        rng = np.random.default_rng(0)
        data = []
        for _ in range(4):
            tokens = rng.integers(100, 40000, size=151).tolist()
            data.append(
                types.Datum(
                    model_input=types.ModelInput.from_ints(tokens[:-1]),
                    loss_fn_inputs={
                        "target_tokens": np.asarray(tokens[1:], dtype=np.int64),
                        "weights": np.full(150, 1 / 600, dtype=np.float32),
                    },
                )
            )
        adam = types.AdamParams(learning_rate=1e-5)

        def train_step() -> None:
            fwd = trainer.forward_backward(data, "cross_entropy")
            opt = trainer.optim_step(adam)
            fwd.result(), opt.result()

        train_step()
        train_seconds = best_of(3, train_step)
        train_flops = 6 * params * 600 / train_seconds

        base = service.create_sampling_client(base_model=service.base_model).result()
        prompt = types.ModelInput.from_ints(rng.integers(100, 40000, size=32).tolist())
        greedy = types.SamplingParams(max_tokens=128, temperature=0.0, stop=[])

        def sample(n: int) -> None:
            out = base.sample(prompt, n, greedy).result()
            assert all(len(s.tokens) == 128 for s in out.sequences)

        sample(1)
        one_seconds = best_of(3, lambda: sample(1))
        four_seconds = best_of(2, lambda: sample(4))
        tokens_per_s = 128 / one_seconds
        bound = bandwidth / 2 / weight_bytes  # a token reads every weight once (copy moved 2x)

        paths = [
            service.create_lora_training_client(service.base_model, rank=32, seed=s)
            .result()
            .save_weights_for_sampler("bench")
            .result()
            .path
            for s in (1, 2)
        ]
        score = types.ModelInput.from_ints(rng.integers(100, 40000, size=64).tolist())
        samplers = [service.create_sampling_client(model_path=p).result() for p in paths]
        start = time.perf_counter()
        samplers[0].compute_logprobs(score).result()
        cold = time.perf_counter() - start
        samplers[1].compute_logprobs(score).result()
        warm = best_of(5, lambda: [s.compute_logprobs(score).result() for s in samplers]) / 2
        base_score = best_of(5, lambda: base.compute_logprobs(score).result())
        service.close()

    rows = [
        (
            "train fwd_bwd+optim, 4x150 tok",
            f"{train_seconds * 1e3:.0f} ms",
            f"{train_flops / 1e9:.1f} GFLOP/s = {train_flops / flops:.0%} of matmul",
            ">= 35%",
            train_flops / flops >= 0.35,
        ),
        (
            "sample 1x128 greedy",
            f"{tokens_per_s:.1f} tok/s",
            f"{tokens_per_s / bound:.0%} of bandwidth bound {bound:.1f} tok/s",
            ">= 50%",
            tokens_per_s / bound >= 0.5,
        ),
        (
            "sample 4x128 batched",
            f"{4 * 128 / four_seconds:.1f} tok/s",
            f"{(4 * 128 / four_seconds) / tokens_per_s:.2f}x one stream",
            "-",
            None,
        ),
        ("load model (cached)", f"{load_seconds * 1e3:.0f} ms", "", "< 2 s", load_seconds < 2),
        (
            "adapter first use (disk)",
            f"{cold * 1e3:.0f} ms",
            f"score 64 tok: adapter {warm * 1e3:.0f} ms vs base {base_score * 1e3:.0f} ms",
            "-",
            None,
        ),
    ]
    print(f"SmolLM2: {params / 1e6:.1f} M params, {weight_bytes / 1e6:.0f} MB float32")
    for name, value, ratio, target, ok in rows:
        verdict = "" if ok is None else ("PASS" if ok else "MISS")
        print(f"{name:32s} {value:>12s}  {ratio:50s} {target:>7s} {verdict}")


if __name__ == "__main__":
    main()
