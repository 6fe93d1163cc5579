"""What the benchmark scripts share: timing a callable, the machine's streaming read, and the SDPO
engine on a local model. Each script runs as `python benchmarks/<name>.py`, which puts this
folder on the import path."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from claas.models import LoadedModel
from claas.sdpo.engine import SDPOEngine
from claas.services.local import LocalServiceClient

STREAM_BYTES = 512 * 2**20  # well past the caches


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median time of `repeats` calls of `run`, after one call that is not counted (first
    touch, warm-up)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def streaming() -> Callable[[], None]:
    """A streaming read (`sum`, all threads) of `STREAM_BYTES`."""
    data = torch.ones(STREAM_BYTES // 4)

    def read() -> None:
        data.sum()

    return read


def local_engine(service: LocalServiceClient, loaded: LoadedModel) -> SDPOEngine:
    """The engine as `claas serve` makes it for a local model (its learning rate follows the
    model's size)."""
    config = loaded.model.config
    return SDPOEngine(
        service, loaded.name, loaded.max_context, int(config.hidden_size), str(config.model_type)
    )
