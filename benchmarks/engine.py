"""One feedback request on the real SmolLM2-135M-Instruct (CPU), split by phase.

4 samples of about 150 tokens (prompt + a 120-token answer sampled from the adapter), the
default TrainingConfig (top-K GJS, K = 100, 4 steps). Printed, measured in one run:
- the request's time per phase;
- per step, top-K mode's training time (`forward_backward_custom` with the SDPO loss, which
  scores the student in the same pass, + optim_step) against a bare forward_backward +
  optim_step on the same datums (target <= 1.3x, issue #13).

    .venv/bin/python benchmarks/engine.py
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np
from common import local_engine
from tinker import types

from claas.adapters import Adapters, AdapterSpec
from claas.feedback import train_and_register
from claas.sdpo import datums
from claas.sdpo.engine import FeedbackSample, TrainingConfig
from claas.sdpo.prompts import chat_prompt_tokens
from claas.services.local import LocalServiceClient, shared_model
from claas.settings import EMBEDDED_MODEL, Settings
from claas.store import Store

# Top-K engine step / bare forward_backward + optim_step (#13)
TARGET = 1.3

QUESTIONS = [
    "Explain how a rainbow forms.",
    "Why do cats purr?",
    "How does a bicycle stay upright?",
    "What causes the seasons on Earth?",
]
LORA = "bench/engine"


async def main() -> None:
    settings = Settings()
    loaded = shared_model(EMBEDDED_MODEL, settings.model_cache_dir, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        service = LocalServiceClient(loaded, Path(tmp) / "checkpoints")
        store = Store(Path(tmp) / "claas.db")
        await Adapters(service, store, loaded.name).init(LORA, AdapterSpec(seed=0))
        version = store.latest_version(LORA)
        assert version is not None
        sampler = await service.create_sampling_client(model_path=version.sampler_path)
        samples = []
        for question in QUESTIONS:
            messages = [{"role": "user", "content": question}]
            prompt = chat_prompt_tokens(loaded.tokenizer, messages)
            params = types.SamplingParams(max_tokens=120, temperature=0.7, seed=1, stop=[])
            out = await sampler.sample(types.ModelInput.from_ints(prompt), 1, params)
            samples.append(
                FeedbackSample(
                    lora_id=LORA,
                    messages=messages,
                    prompt_tokens=prompt,
                    response_tokens=out.sequences[0].tokens,
                    behavior_logprobs=list(out.sequences[0].logprobs or []),
                    feedback="Way too long. Answer in one short sentence.",
                )
            )
        tokens = [len(s.prompt_tokens) + len(s.response_tokens) for s in samples]
        engine = local_engine(service, loaded)
        config = TrainingConfig()
        start = time.perf_counter()
        _, result = await train_and_register(engine, store, samples, config)
        total = time.perf_counter() - start

        # Bare baseline: the same top-K datums, forward_backward + optim_step only.
        trainer = await service.create_training_client_from_state_with_optimizer(version.state_path)
        rng = np.random.default_rng(0)
        engine_datums = [  # same tokens and (N, K+1) shapes as the engine's datums
            datums.topk_datum(
                s.prompt_tokens,
                s.response_tokens,
                rng.integers(0, 49152, size=(len(s.response_tokens), config.teacher_top_k)),
                rng.normal(size=(len(s.response_tokens), config.teacher_top_k)) * 1e-3,
                np.zeros(len(s.response_tokens)),
            )
            for s in samples
        ]
        adam = types.AdamParams(learning_rate=engine.learning_rate_for(config), grad_clip_norm=1.0)
        bare = []
        for _ in range(config.steps_per_batch):
            clock = time.perf_counter()
            fwd = trainer.forward_backward(engine_datums, "cross_entropy")
            opt = trainer.optim_step(adam)
            await fwd
            await opt
            bare.append(time.perf_counter() - clock)
        service.close()
        store.close()

    timings = result.timings
    steps = config.steps_per_batch
    per_step = timings["train"] / steps
    bare_step = sum(bare) / len(bare)
    print(f"4 samples, {sum(tokens)} tokens ({tokens}), K={config.teacher_top_k}, {steps} steps")
    print(f"{'phase':28s} {'seconds':>8s}")
    for phase, seconds in timings.items():
        print(f"{phase:28s} {seconds:8.2f}")
    print(f"{'total request':28s} {total:8.2f}")
    ratio = per_step / bare_step
    verdict = "PASS" if ratio <= TARGET else "MISS"
    print(
        f"per step: top-K {per_step:.2f} s vs bare fwd_bwd+optim {bare_step:.2f} s "
        f"= {ratio:.2f}x (target <= {TARGET}x) {verdict}"
    )
    print(f"GJS {result.metrics['gjs_mean']:.4f} -> {result.metrics['gjs_mean_after']:.4f}")


if __name__ == "__main__":
    asyncio.run(main())
