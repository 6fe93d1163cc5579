"""claas's two hot paths against this machine's limits, each measured in the same run (#24).

- **Decode**: one greedy stream on the base model, in process. Bytes of weights read per token
  (every weight once, float32; the tied embedding once, as the LM head) ÷ time per token,
  against a streaming read of 512 MiB (`torch.sum`, all threads). Time per token is the
  128-token answer's time less the 1-token answer's (the prefill), over the 127 tokens between.
- **Feedback**: one request at the default `TrainingConfig` on a 100-token answer, through the
  engine and the store as the feedback queue runs it. Its time against the FLOP-limit time of
  its passes at the float32 matmul rate (2048², all threads): per step a forward (2·P·T) and a
  backward to the activations (2·P·T; no base-weight gradients), plus the teacher's scoring
  pass (2·P·T_teacher) and the final scoring of the student (2·P·T). P counts the base model's
  weights and the adapter's. Median of `--repeats` requests, each on an adapter of its own
  whose version 1 answered (so its sampler is resident, as after a chat).

    .venv/bin/python benchmarks/limits.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import STREAM_BYTES, local_engine, median_seconds, streaming
from tinker import types

from claas.adapters import Adapters, AdapterSpec
from claas.feedback import train_and_register
from claas.models import LoadedModel
from claas.sdpo.engine import FeedbackSample, TrainingConfig
from claas.sdpo.prompts import chat_prompt_tokens
from claas.services.local import LocalServiceClient, shared_model
from claas.settings import EMBEDDED_MODEL, Settings
from claas.store import Store

DECODE_TARGET = 0.60  # of the streaming read
FEEDBACK_TARGET = 2.0  # × the FLOP-limit time
QUESTION = "Explain how a rainbow forms."
FEEDBACK = "Way too long. Answer in one short sentence."


def matmul_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_seconds(lambda: a @ b, 7)


def streaming_read() -> float:
    return STREAM_BYTES / median_seconds(streaming(), 7)


def weight_bytes(loaded: LoadedModel) -> int:
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def lora_parameters(loaded: LoadedModel, spec: AdapterSpec) -> int:
    """A LoRA adapter's parameters: rank x (in + out) per targeted linear layer."""
    return sum(
        spec.rank * (module.in_features + module.out_features)
        for name, module in loaded.model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in spec.target_modules
    )


async def decode_seconds_per_token(service: LocalServiceClient, prompt: list[int]) -> float:
    sampler = await service.create_sampling_client(base_model=service.base_model)

    async def answer(tokens: int) -> float:
        params = types.SamplingParams(max_tokens=tokens, temperature=0.0, stop=[])
        start = time.perf_counter()
        out = await sampler.sample(types.ModelInput.from_ints(prompt), 1, params)
        assert len(out.sequences[0].tokens) == tokens
        return time.perf_counter() - start

    await answer(128)  # warm-up: kernels, packed weights
    long = statistics.median([await answer(128) for _ in range(3)])
    short = statistics.median([await answer(1) for _ in range(3)])
    return (long - short) / 127


async def feedback_requests(
    loaded: LoadedModel, service: LocalServiceClient, store: Store, repeats: int
) -> list[tuple[float, dict[str, float], int, int]]:
    """Per request: its seconds, its phases, T and T_teacher."""
    config = TrainingConfig()
    engine = local_engine(service, loaded)
    messages = [{"role": "user", "content": QUESTION}]
    prompt = chat_prompt_tokens(loaded.tokenizer, messages)
    results = []
    for index in range(repeats + 1):  # the first is a warm-up
        lora_id = f"bench/limits-{index}"
        await Adapters(service, store, loaded.name).init(lora_id, AdapterSpec(seed=index))
        version = store.latest_version(lora_id)
        assert version is not None
        sampler = await service.create_sampling_client(model_path=version.sampler_path)
        params = types.SamplingParams(max_tokens=100, temperature=0.0, stop=[])
        out = await sampler.sample(types.ModelInput.from_ints(prompt), 1, params)
        sample = FeedbackSample(
            lora_id=lora_id,
            messages=messages,
            prompt_tokens=prompt,
            response_tokens=out.sequences[0].tokens,
            behavior_logprobs=list(out.sequences[0].logprobs or []),
            feedback=FEEDBACK,
        )
        start = time.perf_counter()
        _, trained = await train_and_register(engine, store, [sample], config)
        seconds = time.perf_counter() - start
        teacher = len(loaded.tokenizer(trained.teacher_texts[0])["input_ids"])
        if index:
            results.append((seconds, trained.timings, len(prompt) + 100, teacher))
    return results


async def main(repeats: int) -> None:
    settings = Settings()
    loaded = shared_model(EMBEDDED_MODEL, settings.model_cache_dir, "cpu")
    threads = torch.get_num_threads()
    # Counted before the service wraps the model in PEFT (whose adapters would count too).
    nbytes = weight_bytes(loaded)
    base = sum(p.numel() for p in loaded.model.parameters())
    lora = lora_parameters(loaded, AdapterSpec())
    flops, bandwidth = matmul_flops(), streaming_read()
    print(f"{loaded.name} on CPU, {threads} threads")
    print(f"machine: matmul {flops / 1e9:.1f} GFLOP/s (float32, 2048², median of 7); ", end="")
    print(f"streaming read {bandwidth / 1e9:.1f} GB/s (sum over 512 MiB, median of 7)")

    with tempfile.TemporaryDirectory() as tmp:
        service = LocalServiceClient(loaded, Path(tmp) / "checkpoints")
        store = Store(Path(tmp) / "claas.db")
        try:
            prompt = chat_prompt_tokens(loaded.tokenizer, [{"role": "user", "content": QUESTION}])
            per_token = await decode_seconds_per_token(service, prompt)
            requests = await feedback_requests(loaded, service, store, repeats)
        finally:
            service.close()
            store.close()

    rate = nbytes / per_token
    verdict = "PASS" if rate / bandwidth >= DECODE_TARGET else "MISS"
    print(
        f"decode, 1 stream, base: {1 / per_token:.1f} tok/s; {nbytes / 1e6:.0f} MB of weights "
        f"per token -> {rate / 1e9:.1f} GB/s = {rate / bandwidth:.0%} of the streaming read "
        f"(target >= {DECODE_TARGET:.0%}) {verdict}"
    )

    requests.sort(key=lambda r: r[0])
    seconds, phases, tokens, teacher = requests[len(requests) // 2]
    params = base + lora
    steps = TrainingConfig().steps_per_batch
    step_flops = steps * 4 * params * tokens
    scoring_flops = 2 * params * (teacher + tokens)
    limit = (step_flops + scoring_flops) / flops
    verdict = "PASS" if seconds / limit <= FEEDBACK_TARGET else "MISS"
    print(
        f"feedback, default config, a 100-token answer (T = {tokens}, teacher T = {teacher}), "
        f"{steps} steps, P = {params / 1e6:.1f} M ({lora / 1e6:.1f} M LoRA):"
    )
    print(
        f"  FLOPs {steps} x 4PT + 2P(T_teacher + T) = {(step_flops + scoring_flops) / 1e9:.0f} G "
        f"-> FLOP limit {limit:.2f} s at the matmul rate"
    )
    print(
        f"  request {seconds:.2f} s (median of {len(requests)}: "
        f"{', '.join(f'{r[0]:.2f}' for r in requests)}) = {seconds / limit:.2f}x the limit "
        f"(target <= {FEEDBACK_TARGET:.0f}x) {verdict}"
    )
    train_limit = step_flops / flops
    print(
        "  phases (s): "
        + ", ".join(f"{name} {value:.2f}" for name, value in phases.items() if value >= 0.005)
    )
    print(f"  train: {phases['train']:.2f} s = {phases['train'] / train_limit:.2f}x its FLOP limit")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="feedback requests measured")
    asyncio.run(main(max(1, parser.parse_args().repeats)))
