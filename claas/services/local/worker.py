"""The model worker: the one thread that runs all model work of a local service, in order.

PyTorch modules and PEFT adapter switching are not thread-safe, so every forward, backward,
optimizer step, adapter change and checkpoint write is a task on this single thread, run in
submission order. That makes the service safe under concurrent async callers and lets a caller
pipeline `forward_backward` + `optim_step` without waiting in between. Every submission returns
Tinker's own `AwaitableConcurrentFuture`: `await` it or call `.result()`.

Consecutive items submitted under the same key (scoring passes of one sampler) run as one call,
so the worker can batch them into one padded forward without reordering anything.

An `urgent` task (a chat's first tokens) runs before every task still queued, after the one
that is running: a chat that arrives while a feedback step trains waits for one training task,
not for all that the step has queued.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture

from claas.errors import ServiceClosed

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - a batched item

_CLOSED = (
    "the local service is closed and takes no new work; retry once the server is back "
    "(in-process: create a new service)"
)


@dataclass
class _Batch(Generic[I, T]):
    """Consecutive same-key work items the worker runs as one call."""

    key: str
    run: Callable[[list[I]], list[T]]
    entries: list[tuple[I, Future[T]]] = field(default_factory=list)


class ModelWorker:
    """A single worker thread; tasks run in submission order, same-key runs batched."""

    def __init__(self) -> None:
        self._thread: int | None = None  # the worker thread's ident, once it runs
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="claas-model", initializer=self._started
        )
        self._closed = False
        self._batch_lock = threading.Lock()
        self._open_batch: _Batch[Any, Any] | None = None
        # The tasks, in order; the executor runs one `_run_next` per task, urgent ones first.
        self._queued: deque[Callable[[], None]] = deque()
        self._urgent: deque[Callable[[], None]] = deque()

    @property
    def closed(self) -> bool:
        return self._closed

    def _started(self) -> None:
        self._thread = threading.get_ident()

    def on_worker_thread(self) -> bool:
        return threading.get_ident() == self._thread

    def submit(self, fn: Callable[[], T], urgent: bool = False) -> APIFuture[T]:
        if self._closed:
            raise ServiceClosed(_CLOSED)
        future: Future[T] = Future()
        with self._batch_lock:
            if not urgent:
                self._open_batch = None  # later batched work must not overtake this task
            self._enqueue(lambda: run_into(fn, future), urgent)
        return AwaitableConcurrentFuture(future)

    def _enqueue(self, task: Callable[[], None], urgent: bool) -> None:
        """(Under the batch lock.) One more task, and one more turn of the worker to run it."""
        (self._urgent if urgent else self._queued).append(task)
        try:
            self._executor.submit(self._run_next)
        except RuntimeError as closed:  # shut down between the check and here
            (self._urgent if urgent else self._queued).pop()
            raise ServiceClosed(_CLOSED) from closed

    def _run_next(self) -> None:
        with self._batch_lock:
            task = self._urgent.popleft() if self._urgent else self._queued.popleft()
        task()

    def submit_batched(self, key: str, item: I, run: Callable[[list[I]], list[T]]) -> APIFuture[T]:
        """Queue `item` to run together with consecutive items of the same `key`.

        Items join the open batch only while nothing else was submitted after it, so the
        worker's submission order is kept exactly; the batch runs when the worker reaches it.
        """
        if self._closed:
            raise ServiceClosed(_CLOSED)
        result: Future[T] = Future()
        with self._batch_lock:
            batch = self._open_batch
            if batch is None or batch.key != key:
                batch = _Batch(key, run)
                self._open_batch = batch
                self._enqueue(functools.partial(self._run_batch, batch), urgent=False)
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
        """Refuse new work (`ServiceClosed`) and wait for the queued tasks to finish."""
        self._closed = True
        self._executor.shutdown(wait=True)


def run_into(fn: Callable[[], T], future: Future[T]) -> None:
    """Run `fn` and settle `future` with its result or error (unless it was cancelled)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as error:
        future.set_exception(error)
