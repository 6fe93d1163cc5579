"""How fast one decode stream could go on this machine, all measured in one run (#24).

#24 asks decode to read its weights at >= 60 % of a streaming read. This script measures, against
that streaming read (`torch.sum` over 512 MiB, all threads):

- **the kernels alone**: every base linear of one decode step at one row, back to back, with
  no model code around them: oneDNN on packed weights (what claas's decoder runs,
  `services/local/packed.py`) and MKL's `F.linear`; and the largest single one, the LM head.
  No decode built on torch's kernels can beat these.
- **transformers' greedy decode**: eager, and compiled (`torch.compile`, inductor, with
  `freezing` so the weights are constants it prepacks) over a static KV cache, with the
  compile's seconds, and its tokens checked against eager's.
- **claas's decoder**, one stream on the base model, as `limits.py` measures it.

Bytes per token: every weight once, float32 (the tied embedding once, as the LM head).
Time per token: the 128-token answer less the 1-token answer, over 127.

    .venv/bin/python benchmarks/decode_ceiling.py [--no-compile]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import STREAM_BYTES, median_seconds, streaming
from limits import QUESTION, decode_seconds_per_token, weight_bytes
from tqdm import tqdm

from claas.models import LoadedModel, load_model
from claas.sdpo.prompts import chat_prompt_tokens
from claas.services.local import LocalServiceClient, packed, shared_model
from claas.services.local.packed import PackedLinears
from claas.settings import EMBEDDED_MODEL, Settings

TARGET = 0.60


def report(label: str, nbytes: float, seconds: float, bandwidth: float, extra: str = "") -> None:
    rate = nbytes / seconds
    print(
        f"  {label:<44} {rate / 1e9:5.1f} GB/s = {rate / bandwidth:4.0%} of the streaming read"
        + (f"  ({extra})" if extra else "")
    )


def kernels(loaded: LoadedModel, bandwidth: float) -> None:
    """The base linears of one decode step at one row, back to back."""
    linears = [m for m in loaded.model.modules() if type(m) is torch.nn.Linear]
    rows = {m.in_features: torch.randn(1, m.in_features) for m in linears}
    nbytes = sum(m.weight.nbytes for m in linears)
    head = loaded.model.get_output_embeddings()
    copies = PackedLinears(loaded.model)

    def run(layers: list[torch.nn.Linear], plain: bool = False) -> Callable[[], None]:
        def go() -> None:
            for m in layers:
                x = rows[m.in_features]
                torch.nn.functional.linear(x, m.weight) if plain else m(x)

        return go

    def measure(label: str, layers: list[torch.nn.Linear], split: bool) -> None:
        packed.SPLIT_ONE_ROW = split
        with torch.inference_mode(), copies.active():
            seconds = median_seconds(run(layers), 9)
        size = sum(m.weight.nbytes for m in layers)
        report(label, size, seconds, bandwidth, f"{size / 1e6:.0f} MB")

    print(f"the kernels alone ({len(linears)} GEMVs, {nbytes / 1e6:.0f} MB, medians of 9):")
    try:
        measure("split across the threads (claas's, one row)", linears, True)
        measure("oneDNN, packed weights (claas's before)", linears, False)
        measure("split: the LM head alone", [head], True)
        measure("oneDNN, packed: the LM head alone", [head], False)
    finally:
        packed.SPLIT_ONE_ROW = True
    with torch.inference_mode():
        report("MKL F.linear", nbytes, median_seconds(run(linears, plain=True), 9), bandwidth)


def hf_decode(loaded: LoadedModel, bandwidth: float, compile_too: bool) -> None:
    """transformers' own greedy decode, eager and compiled over a static KV cache."""
    model, nbytes = loaded.model, weight_bytes(loaded)
    prompt = chat_prompt_tokens(loaded.tokenizer, [{"role": "user", "content": QUESTION}])
    ids = torch.tensor([prompt])

    def generate(tokens: int, **options: object) -> tuple[float, torch.Tensor]:
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(  # type: ignore[operator]
                ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, **options
            )
            return time.perf_counter() - start, out

    def per_token(**options: object) -> float:
        generate(128, **options)  # warm-up
        long = statistics.median([generate(128, **options)[0] for _ in range(3)])
        short = statistics.median([generate(1, **options)[0] for _ in range(3)])
        return (long - short) / 127

    print("transformers' greedy decode, 1 stream (medians of 3):")
    seconds = per_token()
    report("eager, dynamic KV cache", nbytes, seconds, bandwidth, f"{1 / seconds:.1f} tok/s")
    if not compile_too:
        return
    eager = generate(32)[1]
    import torch._inductor.config as inductor

    inductor.freezing = True  # the weights become constants inductor prepacks for oneDNN
    start = time.perf_counter()
    model.forward = torch.compile(model.forward, dynamic=False)  # type: ignore[method-assign]
    generate(8, cache_implementation="static")
    compile_seconds = time.perf_counter() - start
    seconds = per_token(cache_implementation="static")
    same = torch.equal(eager, generate(32, cache_implementation="static")[1])
    report(
        "compiled, static KV cache",
        nbytes,
        seconds,
        bandwidth,
        f"{1 / seconds:.1f} tok/s; compiling took {compile_seconds:.0f} s; "
        f"32 greedy tokens {'the same as' if same else 'DIFFERENT from'} eager",
    )


async def claas_decode(bandwidth: float, rounds: int = 3) -> None:
    """claas's decoder with one row as a split GEMV (`packed.SPLIT_ONE_ROW`, the default) and
    as before it, on the packed copy, alternated."""
    settings = Settings()
    loaded = shared_model(EMBEDDED_MODEL, settings.model_cache_dir, "cpu")
    nbytes = weight_bytes(loaded)
    prompt = chat_prompt_tokens(loaded.tokenizer, [{"role": "user", "content": QUESTION}])
    times: dict[bool, list[float]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        service = LocalServiceClient(loaded, Path(tmp) / "checkpoints")
        try:
            for _ in tqdm(range(rounds), desc="claas's decoder, split and not, alternated"):
                for split in (True, False):
                    packed.SPLIT_ONE_ROW = split
                    times[split].append(await decode_seconds_per_token(service, prompt))
        finally:
            packed.SPLIT_ONE_ROW = True
            service.close()
    print(f"claas's decoder, 1 stream on the base model (medians of {rounds}, alternated):")
    for split, label in (
        (True, "one row split across the threads"),
        (False, "one row on the packed copy (before)"),
    ):
        seconds = statistics.median(times[split])
        report(label, nbytes, seconds, bandwidth, f"{1 / seconds:.1f} tok/s")
    ratio = statistics.median(times[False]) / statistics.median(times[True])
    print(f"  split ÷ before: {ratio:.2f}x the tok/s")


def main(compile_too: bool) -> None:
    bandwidth = STREAM_BYTES / median_seconds(streaming(), 7)
    print(
        f"{EMBEDDED_MODEL} on CPU, {torch.get_num_threads()} threads; streaming read "
        f"{bandwidth / 1e9:.1f} GB/s (sum over 512 MiB, median of 7); target >= {TARGET:.0%}"
    )
    asyncio.run(claas_decode(bandwidth))
    loaded = load_model(EMBEDDED_MODEL, Settings().model_cache_dir, device="cpu")
    loaded.model.eval()
    kernels(loaded, bandwidth)
    hf_decode(loaded, bandwidth, compile_too)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-compile",
        action="store_true",
        help="skip the compiled decode (its compile takes minutes)",
    )
    main(not parser.parse_args().no_compile)
