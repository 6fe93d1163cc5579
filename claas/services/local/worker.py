"""The model worker: the one thread that runs all model work of a local service, in order.

PyTorch modules and PEFT adapter switching are not thread-safe, so every forward, backward,
optimizer step, adapter change and checkpoint write is a task on this single thread, run in
submission order. That makes the service safe under concurrent async callers and lets a caller
pipeline `forward_backward` + `optim_step` without waiting in between. Every submission returns
Tinker's own `AwaitableConcurrentFuture`: `await` it or call `.result()`.

Consecutive items submitted under the same key (scoring passes of one sampler) run as one call,
so the worker can batch them into one padded forward without reordering anything.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture

from claas.errors import InvalidRequest

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - a batched item


@dataclass
class _Batch(Generic[I, T]):
    """Consecutive same-key work items the worker runs as one call."""

    key: str
    run: Callable[[list[I]], list[T]]
    entries: list[tuple[I, Future[T]]] = field(default_factory=list)


class ModelWorker:
    """A single worker thread; tasks run in submission order, same-key runs batched."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="claas-model")
        self._closed = False
        self._batch_lock = threading.Lock()
        self._open_batch: _Batch[Any, Any] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[[], T]) -> APIFuture[T]:
        if self._closed:
            raise InvalidRequest("the local service is closed; create a new one")
        with self._batch_lock:
            self._open_batch = None  # later batched work must not overtake this task
            future: Future[T] = self._executor.submit(fn)
        return AwaitableConcurrentFuture(future)

    def submit_batched(self, key: str, item: I, run: Callable[[list[I]], list[T]]) -> APIFuture[T]:
        """Queue `item` to run together with consecutive items of the same `key`.

        Items join the open batch only while nothing else was submitted after it, so the
        worker's submission order is kept exactly; the batch runs when the worker reaches it.
        """
        if self._closed:
            raise InvalidRequest("the local service is closed; create a new one")
        result: Future[T] = Future()
        with self._batch_lock:
            batch = self._open_batch
            if batch is None or batch.key != key:
                batch = _Batch(key, run)
                self._open_batch = batch
                self._executor.submit(self._run_batch, batch)
            batch.entries.append((item, result))
        return AwaitableConcurrentFuture(result)

    def _run_batch(self, batch: _Batch[Any, Any]) -> None:
        with self._batch_lock:
            if self._open_batch is batch:
                self._open_batch = None  # closed: later items start a new batch
            entries = list(batch.entries)
        try:
            outputs = batch.run([item for item, _ in entries])
        except BaseException as error:
            for _, future in entries:
                future.set_exception(error)
            return
        for (_, future), output in zip(entries, outputs, strict=True):
            future.set_result(output)

    def close(self) -> None:
        """Refuse new work and wait for the queued tasks to finish."""
        self._closed = True
        self._executor.shutdown(wait=True)
