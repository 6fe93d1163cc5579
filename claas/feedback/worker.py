"""The worker's loops: claim batches and train each in a task of its own, keep the claims'
leases alive, and sweep now and then.

Any number of workers claim batches from the store's queue (`Store.claim`), each under a lease
that its heartbeat extends every third of `lease_seconds`; a claim whose lease ends (its worker
died or hung) goes back to the queue, and every heartbeat gives back such claims. A worker finds
requests queued by other processes every `poll_seconds` (at once on PostgreSQL, which notifies
it) and its own at once; it trains at most `max_batches` batches at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import uuid
from collections.abc import Callable

from claas.feedback.training import BatchTraining

logger = logging.getLogger("claas.feedback")  # one logger for the whole queue


def default_worker_name() -> str:
    """Unique per process: the host, the pid and a random suffix (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker(BatchTraining):
    """Claims and trains batches, and keeps their leases (the part of `FeedbackQueue` that
    does)."""

    max_coalesce: int
    lease_seconds: float
    poll_seconds: float
    max_batches: int
    purge_interval: float | None
    housekeeping: Callable[[], None] | None
    _wake: asyncio.Event
    _running: dict[str, asyncio.Task[None]]

    async def _work(self) -> None:
        """Claim batches while there is room, train each in its own task; then sleep until
        this process queues something, a batch ends, or `poll_seconds` pass."""
        while True:
            try:
                while len(self._running) < self.max_batches:
                    batch = await asyncio.to_thread(
                        self.store.claim, self.worker, self.lease_seconds, self.max_coalesce
                    )
                    if not batch:
                        break
                    head = batch[0].id
                    self._claimed[head] = [request.id for request in batch]
                    task = asyncio.create_task(self._train(batch))
                    self._running[head] = task
                    task.add_done_callback(functools.partial(self._finished, head))
            except asyncio.CancelledError:
                raise
            except Exception:  # the database is down or restarting: try again after a poll
                logger.exception(
                    "claiming feedback failed; retrying in %.1f s",
                    self.poll_seconds,
                    extra={"retry_in_seconds": self.poll_seconds},
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()

    def _finished(self, head: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(head, None)
        self._claimed.pop(head, None)
        self._wake.set()  # room for the next batch

    async def _heartbeat(self) -> None:
        """Every third of the lease: extend this worker's claims, give back the claims of
        workers whose lease ended, and do the housekeeping (sweep what dead workers left)."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            try:
                ids = [i for claimed in list(self._claimed.values()) for i in claimed]
                if ids:
                    held = await asyncio.to_thread(
                        self.store.extend_lease, self.worker, ids, self.lease_seconds
                    )
                    if held < len(ids):
                        logger.warning(
                            "worker %s lost %d of its %d claims (its lease ended); another "
                            "worker trains them, and this worker's results are discarded",
                            self.worker,
                            len(ids) - held,
                            len(ids),
                        )
                requeued = await asyncio.to_thread(self.store.reclaim)
                if requeued:
                    logger.warning(
                        "requeued %d feedback requests whose worker's lease ended",
                        requeued,
                        extra={"requeued": requeued},
                    )
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("the worker's heartbeat failed; it retries on the next beat")

    async def _housekeep(self) -> None:
        """Every two lease periods, in a thread: e.g. sweep what dead workers left."""
        assert self.housekeeping is not None
        while True:
            await asyncio.sleep(2 * self.lease_seconds)
            try:
                await asyncio.to_thread(self.housekeeping)
            except Exception:
                logger.exception("housekeeping failed; it runs again later")

    async def _purge_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            # Off the event loop: a purge waits on the database's write lock, chats must not.
            await asyncio.to_thread(self.purge_expired)

    def purge_expired(self) -> int | None:
        """Delete the expired rollouts; how many, or None if the store failed (logged: the next
        purge tries again)."""
        try:
            purged = self.store.purge_expired_rollouts()
        except Exception:
            logger.exception(
                "purging expired rollouts failed; the next purge retries",
                extra={"retry_in_seconds": self.purge_interval},
            )
            return None
        logger.log(
            logging.INFO if purged else logging.DEBUG,
            "purged %d expired rollouts",
            purged,
            extra={"purged_rollouts": purged},
        )
        return purged
