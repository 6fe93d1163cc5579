"""Continuous batching of chat decoding across adapters: the scheduler, on the model worker.

Every chat request of the local service (a `DecodeJob`) joins one running batch: at each step the
worker runs a single forward for all running samples, whatever adapter each is on. Steps run in
slices of up to `SLICE_SECONDS`, taking turns with the worker's other tasks (training, adapter
loads, scoring). Requests that arrive while others decode are prefilled together, then join at
the next step; each sample leaves when it ends (its own `max_tokens`, stop tokens and strings,
or its client going away).

- **First tokens first.** A new request's prefill and first token are an urgent worker task
  (ahead of queued training tasks), and yield points between the decoder layers of a running
  training or scoring pass admit it there (`install_yield_points`).
- **Exactness.** Sampling is `decoding.SampleStream`, per request, with the request's own
  generator: the same request gives the same tokens and log-probs alone or batched, up to the
  float rounding of a batched matmul.

This module decides what runs when: admission, slices, yield points, and ending requests when
the service closes. The batch itself lives beside it: its forwards in `running_batch`, its rows
and their shared KV cache in `kv_rows`, each row's own LoRA term in `lora_term`, the base
linears on packed weights in `packed`. Requests that score their prompt, and samplers on a
training client's live weights (`inflight`), keep the one-request path in `sampling_client`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

import torch

from claas.errors import ServiceClosed
from claas.services.local.decoding import Generation, SampleStream
from claas.services.local.running_batch import BatchHost, DecodeJob, RunningBatch, fail_each

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_ROWS = 64  # running samples at most; later requests wait for a free row
# Decode steps run back to back for this long before other work queued on the worker gets its
# turn. The shorter the slice, the sooner training goes on, and the slower a chat beside it: at
# one step per turn a chat during a feedback step took several times as long as at a second
# ("Slice length" in benchmarks/batching.md). Chats are what users wait on; training runs behind.
SLICE_SECONDS = 1.0


class DecoderHost(BatchHost, Protocol):
    """What the decoder uses of its host (`AdapterHost`): the batch's needs, and the worker."""

    def has_adapter(self, name: str) -> bool: ...

    def on_worker_thread(self) -> bool: ...

    def submit(self, fn: Callable[[], None], urgent: bool = False) -> object:
        """Queue `fn` on the worker; ServiceClosed once the host is closed."""


class ContinuousDecoder:
    """The running batch of chat samples; `submit` from any thread, steps on the worker."""

    def __init__(self, host: DecoderHost, pack: bool = True) -> None:
        self.host = host
        self.batch = RunningBatch(host, pack)
        self._lock = threading.Lock()
        self._pending: list[DecodeJob] = []
        self._scheduled = False
        self._inside = False  # the decoder's own work is running (no yield points inside it)
        self._yield_hooks: list[Any] = []

    @property
    def running_rows(self) -> int:
        """Samples decoding now (a request with n samples has n rows)."""
        return self.batch.running_rows

    @property
    def widest_batch(self) -> int:
        """The most rows one step has run (for tests and benchmarks)."""
        return self.batch.widest_batch

    @property
    def rows_decoded(self) -> int:
        """Rows run by decode steps so far: one per sampled token."""
        return self.batch.rows_decoded

    def submit(self, job: DecodeJob) -> None:
        """Queue a request. Its prefill and first token run urgently, ahead of the training
        tasks queued on the worker; its later tokens take turns with them (`_step`)."""
        with self._lock:
            self._pending.append(job)
            first = not self._scheduled
            self._scheduled = True
        try:
            # the first request starts the slices; later ones join now, whatever is queued
            self.host.submit(self._step if first else self._admit, urgent=True)
        except ServiceClosed:  # the request was never queued
            with self._lock:
                if job in self._pending:
                    self._pending.remove(job)
                if first:
                    self._scheduled = False
            raise

    def decode(
        self,
        prompt: torch.Tensor,
        stream: SampleStream,
        adapter: str | None,
        activate: Callable[[], None],
        answer: Callable[[list[Generation]], T],
    ) -> Future[T]:
        """`submit` a request; the future gets `answer` of its generations, or its error. A
        future its caller cancelled (its client went away) is left alone: nobody waits."""
        result: Future[T] = Future()

        def done(generations: list[Generation]) -> None:
            with contextlib.suppress(InvalidStateError):
                result.set_result(answer(generations))

        def failed(error: BaseException) -> None:
            with contextlib.suppress(InvalidStateError):
                result.set_exception(error)

        self.submit(DecodeJob(prompt, stream, adapter, activate, done, failed))
        return result

    # -- the worker's side --------------------------------------------------------------------
    def _step(self) -> None:
        """Decode steps for every row (admitting waiting requests before each) for up to
        `SLICE_SECONDS`, then queue the next slice behind whatever the worker was given
        meanwhile: a training step's tasks and a chat's tokens take turns, neither waits for
        the other to finish."""
        deadline = time.perf_counter() + SLICE_SECONDS
        while True:
            self._admit()
            if self.batch.rows is None:
                break
            with torch.inference_mode(), self._own_work():
                try:
                    self.batch.decode_step()
                except Exception as error:  # a broken step fails its requests, not the server
                    jobs = self.batch.jobs()
                    self.batch.clear()
                    fail_each(jobs, error)
            if time.perf_counter() > deadline:
                break
        with self._lock:
            if self.batch.rows is None and not self._pending:
                self._scheduled = False
                return
        try:
            self.host.submit(self._step)
        except ServiceClosed as closed:  # end what is left
            self._fail_all(closed)

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            jobs, self._pending = list(self._pending), []
            self._scheduled = False
        jobs += self.batch.jobs()
        self.batch.clear()
        fail_each(jobs, error)

    def _admit(self, resident_only: bool = False) -> None:
        """Waiting requests, in order, while rows are free, prefilled together. With
        `resident_only` (inside another task) it stops at a request whose adapter is not loaded:
        loading one changes the PEFT model and torch's RNG, which the task may be using."""
        room = MAX_ROWS - self.running_rows
        with self._lock:
            admitted: list[DecodeJob] = []
            while self._pending and len(self._pending[0].stream.active) <= room:
                job = self._pending[0]
                resident = job.adapter is None or self.host.has_adapter(job.adapter)
                if resident_only and not resident:
                    break
                self._pending.pop(0)
                room -= len(job.stream.active)
                admitted.append(job)
        if not admitted:
            return
        with self._own_work():
            try:
                self.batch.prefill(admitted)
            except Exception as error:  # no admitted request is left without an answer
                joined = set(self.batch.jobs())
                fail_each([j for j in admitted if j not in joined and not j.stream.finished], error)

    @contextmanager
    def _own_work(self) -> Iterator[None]:
        outer, self._inside = self._inside, True
        try:
            yield
        finally:
            self._inside = outer

    # -- yield points: chats admitted in the middle of a long task ------------------------------
    def install_yield_points(self, model: Any) -> None:
        """Let waiting chats get their first tokens in the middle of a long training or scoring
        task: a forward pre-hook on each decoder layer, and in a forward that builds a graph, a
        hook on the gradient of the layer's input, so also between the layers of a backward
        pass. A chat that arrives during a feedback step then waits for one layer, not for the
        task. The task's results do not change: the admission runs in inference mode, restores
        every flag it sets, and loads no adapter."""
        layers = getattr(getattr(model, "model", None), "layers", None)
        if layers is None or self._yield_hooks:
            return
        for layer in layers:
            self._yield_hooks.append(layer.register_forward_pre_hook(self._before_layer))

    def close(self) -> None:
        """Take every hook off the model (it may outlive this decoder) and drop what was kept
        for it: the packed weights and the adapters' layout."""
        for handle in self._yield_hooks:
            handle.remove()
        self._yield_hooks = []
        self.batch.close()

    def _before_layer(self, module: Any, args: tuple[Any, ...]) -> None:
        if self._inside or not self.host.on_worker_thread():
            return
        hidden = args[0] if args else None
        if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
            hidden.register_hook(self._during_backward)  # type: ignore[no-untyped-call]
        if self._pending:
            self._yield()

    def serves(self, adapter: str) -> bool:
        """Whether a chat on `adapter` waits or runs now."""
        with self._lock:
            waiting = any(job.adapter == adapter for job in self._pending)
        return waiting or any(job.adapter == adapter for job in self.batch.jobs())

    def yield_point(self) -> None:
        """Admit waiting chats now, from a worker task between two stretches of its own work
        (a custom loss between its forward and backward). Elsewhere it does nothing."""
        if self._pending and not self._inside and self.host.on_worker_thread():
            self._yield()

    def _during_backward(self, grad: torch.Tensor) -> None:
        self.yield_point()  # on a GPU autograd runs this on a thread of its own: no yield there

    def _yield(self) -> None:
        try:
            self._admit(resident_only=True)  # fails the requests it cannot admit
        except Exception:  # never into the task that yielded
            logger.exception("admitting chats at a yield point failed")
