"""Training a claimed batch: from its requests to a registered version, or to their failure.

`BatchTraining` is the part of `FeedbackQueue` that trains one batch a worker claimed: a request
that cannot be trained fails alone, before the step; the rest train in one step, and
`train_and_register` registers the result as the adapter's next version in the same transaction
that finishes the requests (done, with their metrics and what they taught). Each finished
request gets one `claas.feedback` log line (`log_finished`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from claas.errors import (
    AdapterNotFound,
    ClaasError,
    ClaimLost,
    Conflict,
    DatabaseUnavailable,
    FeedbackNotFound,
    InvalidFeedback,
    ServiceClosed,
)
from claas.feedback.items import samples_of
from claas.feedback.memory import remembered, replay_for
from claas.ids import validate_lora_id
from claas.records import AdapterVersion, FeedbackRequest, MemoryItem
from claas.sdpo.config import FeedbackSample, Lesson, TrainedCheckpoint, TrainFrom, TrainingConfig
from claas.sdpo.engine import SDPOEngine
from claas.services.protocol import delete_checkpoints
from claas.store import Store

logger = logging.getLogger("claas.feedback")  # one logger for the whole queue


class BatchTraining:
    """Trains the batches a worker claimed (the part of `FeedbackQueue` that does)."""

    store: Store
    engine: SDPOEngine
    worker: str
    memory_items: int
    on_trained: Callable[[FeedbackRequest, float], None] | None
    on_version: Callable[[AdapterVersion], Awaitable[None]] | None
    _claimed: dict[str, list[str]]
    _changed: asyncio.Condition

    async def _train(self, batch: list[FeedbackRequest]) -> None:
        """Train one batch. A request that cannot be trained fails alone, before the step.

        The adapter may be deleted while its step runs: its requests are then gone with it,
        and there is nothing left to mark.
        """
        config = TrainingConfig.model_validate(batch[0].training)
        ready: list[tuple[FeedbackRequest, list[FeedbackSample]]] = []
        for request in batch:
            try:
                samples = await asyncio.to_thread(
                    samples_of, self.store, request.lora_id, request.items
                )
                await self.engine.check(samples, config)
            except (DatabaseUnavailable, ServiceClosed) as error:  # not the request's fault
                log_finished([request], "interrupted", error=str(error))  # the lease ends
                return
            except ClaasError as error:
                message = f"{type(error).__name__}: {error}"
                marked = await self._mark(
                    self.store.mark_failed, [request.id], message, worker=self.worker
                )
                log_finished([request], "failed" if marked else "deleted", error=message)
                await self.notify()  # its waiters learn now, not after the batch's step
                continue
            ready.append((request, samples))
        if not ready:
            await self.notify()
            return
        head, ids = ready[0][0], [request.id for request, _ in ready]
        requests = [request for request, _ in ready]
        self._claimed[batch[0].id] = ids  # the failed ones need no lease any more
        for follower, _ in ready[1:]:
            await self._mark(self.store.mark_coalesced, follower.id, head.id)
        started = time.perf_counter()
        try:
            samples = [sample for _, request_samples in ready for sample in request_samples]
            replay = (
                await asyncio.to_thread(replay_for, self.store, head, samples, config)
                if self.memory_items
                else []
            )
            learned = remembered(ready) if self.memory_items else []

            def describe(trained: TrainedCheckpoint) -> dict[str, Any]:
                return {
                    **trained.metrics,
                    "timings": trained.timings,
                    "steps": [s.model_dump() for s in trained.steps],
                    "teacher_texts": trained.teacher_texts,
                    "coalesced": len(ready),
                    "coalesced_ids": ids,
                }

            # Registering the version finishes the requests in the same transaction: done,
            # with their metrics and what they taught.
            version, trained = await train_and_register(
                self.engine,
                self.store,
                samples,
                config,
                feedback_id=head.id,
                replay=replay,
                worker=self.worker,
                claimed=ids,
                describe=describe,
                learned=learned,
                memory_limit=self.memory_items,
            )
            log_finished(
                requests,
                "done",
                version=version,
                trained=trained,
                seconds=time.perf_counter() - started,
            )
            await self._announce(version)
        except asyncio.CancelledError:
            raise  # shutting down: the requests stay claimed until the lease ends
        except ClaimLost as error:  # another worker trains them now: nothing to mark
            log_finished(requests, "reclaimed", error=str(error))
        except (DatabaseUnavailable, ServiceClosed) as error:
            # Not the request's fault (the database went, or the training service is shutting
            # down): it stays claimed, and once the lease ends it is trained again (or found
            # done, if its version was registered before the database went).
            log_finished(requests, "interrupted", error=str(error))
        except Exception as error:
            # A domain error says what to do; anything else is a bug or a broken service, whose
            # traceback is logged.
            unexpected = not isinstance(error, ClaasError)
            message = f"{type(error).__name__}: {error}"
            if unexpected:
                message = f"training failed ({message}); the adapter stays on its last good version"
            marked = await self._mark(self.store.mark_failed, ids, message, worker=self.worker)
            log_finished(
                requests,
                "failed" if marked else "deleted",
                error=message,
                seconds=time.perf_counter() - started,
                unexpected=unexpected,
            )
        finally:
            if self.on_trained is not None:
                self.on_trained(head, time.perf_counter() - started)
            await self.notify()

    async def _announce(self, version: AdapterVersion) -> None:
        """Tell `on_version` of a new version; its failure never fails the trained request."""
        if self.on_version is None:
            return
        try:
            await self.on_version(version)
        except ClaasError as error:  # e.g. vLLM down: it is loaded on first use instead
            logger.warning("after training %s v%d: %s", version.lora_id, version.version, error)
        except Exception:
            logger.exception("after training %s v%d", version.lora_id, version.version)

    @staticmethod
    async def _mark(update: Callable[..., None], *args: Any, **kwargs: Any) -> bool:
        """Record a status change (in a thread); False if the requests were deleted with their
        adapter, claimed by another worker meanwhile, or the database did not answer (then the
        lease ends and the batch is trained again, or found done)."""
        try:
            await asyncio.to_thread(update, *args, **kwargs)
        except (FeedbackNotFound, ClaimLost):
            return False
        except DatabaseUnavailable as error:
            logger.warning("could not record a feedback status: %s", error)
            return False
        return True

    async def notify(self) -> None:
        """Wake `wait`ers: a request finished, failed, or was deleted with its adapter."""
        async with self._changed:
            self._changed.notify_all()


def log_finished(
    requests: Sequence[FeedbackRequest],
    status: str,
    *,
    version: AdapterVersion | None = None,
    trained: TrainedCheckpoint | None = None,
    error: str | None = None,
    seconds: float | None = None,
    unexpected: bool = False,
) -> None:
    """One `claas.feedback` line per finished request: its outcome, and the training metrics
    and phase timings of its batch, or the error (with the traceback if `unexpected`: call
    it inside the `except`). "deleted": the adapter was deleted meanwhile, with them."""
    head = requests[0]
    for request in requests:
        fields: dict[str, Any] = {
            "feedback_id": request.id,
            "lora_id": request.lora_id,
            "status": status,
            "version": version.version if version is not None else None,
            "coalesced": len(requests),
            "coalesced_into": None if request is head else head.id,
            "total_seconds": round(time.time() - request.created_at, 3),
        }
        if seconds is not None:
            fields["train_seconds"] = round(seconds, 3)
        if trained is not None:
            fields["metrics"] = trained.metrics
            fields["timings"] = {phase: round(t, 4) for phase, t in trained.timings.items()}
            fields["steps"] = len(trained.steps)
        if error is not None:
            fields["error"] = error
        level = logging.ERROR if unexpected else logging.WARNING if error else logging.INFO
        outcome = f"v{version.version}" if version is not None else error or status
        logger.log(
            level,
            "feedback %s %s: %s %s",
            request.id,
            status,
            request.lora_id,
            outcome,
            extra=fields,
            exc_info=unexpected and request is head,
        )


async def train_and_register(
    engine: SDPOEngine,
    store: Store,
    samples: Sequence[FeedbackSample],
    config: TrainingConfig,
    feedback_id: str | None = None,
    replay: Sequence[Lesson] = (),
    worker: str | None = None,
    claimed: Sequence[str] = (),
    describe: Callable[[TrainedCheckpoint], dict[str, Any]] | None = None,
    learned: Sequence[MemoryItem] = (),
    memory_limit: int | None = None,
) -> tuple[AdapterVersion, TrainedCheckpoint]:
    """Train the adapter's current version on `samples` and register the result as the next.

    The adapter as it was when training started goes with the registration: if it was rolled
    back, or deleted and re-created, meanwhile, the store refuses the result (`Conflict`) and
    the checkpoints just written are removed, so nothing half-registered remains. With
    `worker`, the requests `claimed` must still be that worker's claim (`ClaimLost` otherwise),
    and they finish in the registering transaction, with `describe(trained)` as their metrics
    and `learned` kept in memory.
    """
    if not samples:
        raise InvalidFeedback("no samples given; send at least one feedback item")
    lora_id = validate_lora_id(samples[0].lora_id)
    adapter = await asyncio.to_thread(store.get_adapter, lora_id)
    current = await asyncio.to_thread(store.latest_version, lora_id)
    if current is None:
        raise InvalidFeedback(f"adapter {lora_id} has no version to train from; re-create it")
    start = TrainFrom(
        version=current.version, state_path=current.state_path, sampler_path=current.sampler_path
    )

    async def still_wanted(step: int) -> None:
        """Before each step: an adapter rolled back or deleted since training started would
        refuse the result, so the training stops here, not after its last step."""
        try:
            now = await asyncio.to_thread(store.get_adapter, lora_id)
        except AdapterNotFound:
            now = None
        except DatabaseUnavailable:
            return  # cannot tell now: the registration decides
        if now is None or not now.unchanged_since(adapter):
            raise Conflict(
                f"adapter {lora_id} was rolled back, or deleted, while this request trained; "
                f"its training stopped before step {step + 1} of {config.steps_per_batch}. "
                "Send the feedback again"
            )

    trained = await engine.distill(samples, config, start, replay, before_step=still_wanted)
    try:
        version = await asyncio.to_thread(
            functools.partial(
                store.add_version,
                lora_id,
                trained.state_path,
                trained.sampler_path,
                feedback_id,
                {**trained.metrics, "timings": trained.timings},
                trained_from=adapter,
                worker=worker,
                claimed=claimed,
                request_metrics=describe(trained) if describe is not None else None,
                learned=learned,
                memory_limit=memory_limit,
            )
        )
    except DatabaseUnavailable:
        # The commit may have gone through before the connection was lost: keep the files
        # (the sweep removes them later if no version references them).
        raise
    except BaseException:
        await delete_checkpoints(engine.service, [trained.state_path, trained.sampler_path])
        raise
    return version, trained
