"""`FeedbackQueue`: admits feedback into the store's queue and, with `train`, trains it as a
worker; waiters learn when their request finished, whichever process trained it.

    queue = FeedbackQueue(store, engine, max_coalesce=8, purge_interval=600)
    queue.start()  # and, every purge_interval seconds, expired rollouts are purged
    request = await queue.admit(items, owner=None)  # None: no owner scoping (the admin)
    done = await queue.wait(request.id)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence

from claas.errors import DatabaseUnavailable, TooManyRequests
from claas.feedback.items import FeedbackItem, ResolvedFeedback, resolve_feedback, samples_of
from claas.feedback.worker import Worker, default_worker_name
from claas.ids import parse_lora_id
from claas.records import FINISHED, PENDING, AdapterVersion, FeedbackRequest
from claas.sdpo.engine import SDPOEngine
from claas.store import NOTICE_QUEUED, Store

logger = logging.getLogger("claas.feedback")  # one logger for the whole queue


class FeedbackQueue(Worker):
    """Admits feedback into the store's queue and, with `train`, trains it as a worker.

    The queue itself is the database: any number of processes admit requests and any number of
    workers claim batches (`Store.claim`), each under a lease its heartbeat extends every third
    of `lease_seconds`. A worker finds requests queued by other processes every `poll_seconds`
    and its own at once; it trains at most `max_batches` batches at a time.

    It is built from its parts: `Worker` claims batches and keeps their leases
    (`claas.feedback.worker`), `BatchTraining` trains them (`claas.feedback.training`).
    """

    def __init__(
        self,
        store: Store,
        engine: SDPOEngine,
        max_coalesce: int = 8,
        on_trained: Callable[[FeedbackRequest, float], None] | None = None,
        max_pending_per_owner: int | None = None,
        on_version: Callable[[AdapterVersion], Awaitable[None]] | None = None,
        purge_interval: float | None = None,
        memory_items: int = 256,
        *,
        train: bool = True,
        worker: str | None = None,
        lease_seconds: float = 30.0,
        poll_seconds: float = 1.0,
        max_batches: int = 4,
        housekeeping: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.memory_items = memory_items  # kept per adapter for replay; 0: none kept or replayed
        self.engine = engine
        self.max_coalesce = max_coalesce
        self.max_pending_per_owner = max_pending_per_owner
        self.on_trained = on_trained
        self.on_version = on_version  # after a version is registered: e.g. load it for serving
        self.purge_interval = purge_interval  # seconds; None: purge only at start
        self.train = train
        self.worker = worker or default_worker_name()
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.max_batches = max_batches
        self.housekeeping = housekeeping  # now and then, in a thread: e.g. sweep checkpoints
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._running: dict[str, asyncio.Task[None]] = {}  # by the batch's head id
        self._claimed: dict[str, list[str]] = {}  # head id -> the ids its lease covers
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._unlisten: Callable[[], None] | None = None  # PostgreSQL: stop the notices

    def _on_notice(self, notice: str) -> None:
        """Another process queued feedback (a worker looks now) or finished some (waiters
        re-read their status now), without waiting for the next poll."""
        if notice == NOTICE_QUEUED:
            self._wake.set()
        else:
            self._tasks.append(asyncio.ensure_future(self.notify()))
            self._tasks = [t for t in self._tasks if not t.done()]

    # -- admission, before anything is queued ----------------------------------------------
    def resolve(self, items: Sequence[FeedbackItem], owner: str | None) -> ResolvedFeedback:
        """Find each item's rollout and check the batch (`items.resolve_feedback`)."""
        return resolve_feedback(self.store, items, owner)

    async def admit(self, items: Sequence[FeedbackItem], owner: str | None) -> FeedbackRequest:
        """Resolve, check everything the engine would refuse (teacher prompt, context), queue.

        An owner with `max_pending_per_owner` requests queued or running gets a 429 (None: no
        limit).
        """
        resolved = await asyncio.to_thread(self.resolve, items, owner)
        adapter_owner = parse_lora_id(resolved.lora_id)[0]
        pending = await asyncio.to_thread(
            functools.partial(self.store.count_feedback, owner=adapter_owner, statuses=PENDING)
        )
        if self.max_pending_per_owner is not None and pending >= self.max_pending_per_owner:
            raise TooManyRequests(
                f"{adapter_owner!r} has {pending} feedback requests queued or running, the most "
                f"this server takes (CLAAS_MAX_PENDING_FEEDBACK_PER_OWNER); wait for some to "
                "finish (GET /v1/feedback/{id}) and retry",
                headers={"Retry-After": "30"},
            )
        samples = await asyncio.to_thread(samples_of, self.store, resolved.lora_id, resolved.items)
        await self.engine.check(samples, resolved.training)
        request = await asyncio.to_thread(
            self.store.enqueue_feedback,
            resolved.lora_id,
            resolved.items,
            resolved.training.model_dump(),
        )
        self._wake.set()
        return request

    async def wait(self, feedback_id: str, timeout: float | None = None) -> FeedbackRequest:
        """Until the request is done or failed, whichever process trains it: woken at once by
        this process's worker, else by re-reading its status every `poll_seconds`.
        FeedbackNotFound if its adapter was deleted."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    request = await asyncio.to_thread(self.store.get_feedback, feedback_id)
                except DatabaseUnavailable:  # restarting: keep waiting
                    await asyncio.sleep(self.poll_seconds)
                    continue
                if request.status in FINISHED:
                    return request
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), self.poll_seconds)

    def depth(self) -> int:
        return self.store.count_feedback(statuses=("queued",))

    # -- the worker's life -------------------------------------------------------------------
    def start(self) -> None:
        """Begin serving (call inside the loop): purge expired rollouts now and every
        `purge_interval` seconds; with `train`, give back claims whose lease ended (a worker,
        or this process before a crash, died holding them) and train the queue.
        """
        if self._started:
            return
        self._started = True
        requeued = self.store.reclaim() if self.train else 0
        purged = self.store.purge_expired_rollouts()
        logger.info(
            "feedback queue started: %d requests requeued, %d expired rollouts purged",
            requeued,
            purged,
            extra={
                "requeued": requeued,
                "purged_rollouts": purged,
                "queued": self.depth(),
                "train": self.train,
                "worker": self.worker if self.train else None,
            },
        )
        loop = asyncio.get_running_loop()

        def on_notice(notice: str) -> None:  # on the listener's thread
            loop.call_soon_threadsafe(self._on_notice, notice)

        self._unlisten = self.store.listen(on_notice)
        if self.train:
            self._tasks += [
                asyncio.create_task(self._work()),
                asyncio.create_task(self._heartbeat()),
            ]
            if self.housekeeping is not None:
                self._tasks.append(asyncio.create_task(self._housekeep()))
        if self.purge_interval is not None:
            self._tasks.append(asyncio.create_task(self._purge_every(self.purge_interval)))
        self._wake.set()

    async def stop(self) -> None:
        """Stop the worker. Batches it was training go back to the queue, for the next worker
        (this one restarted, or another); if the database cannot be reached, they stay claimed
        until their lease ends."""
        if self._unlisten is not None:
            await asyncio.to_thread(self._unlisten)
            self._unlisten = None
        tasks = [*self._tasks, *self._running.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.train and self._started:
            # What this worker was training goes back to the queue now, not when the lease
            # ends (or is marked done, if its version was registered).
            try:
                await asyncio.to_thread(self.store.reclaim, None, self.worker)
            except Exception as error:  # the database is gone: the lease ends by itself
                logger.warning("could not give back this worker's claims at stop: %s", error)
        self._tasks, self._started = [], False
