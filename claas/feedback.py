"""The durable feedback queue: from a feedback request to a new adapter version.

The second half of the data flow (docs/architecture.md). A request names rollouts (by
completion id, or by adapter + prompt text + response text) and carries the user's feedback. It
is validated completely before anything is queued, then written to SQLite as `queued`, so it
survives a restart; `running` requests found at start-up are queued again.

Per adapter, requests run strictly in arrival order, one at a time. Requests for the same adapter
and training config that queued up while a step was running are coalesced into one batch (up to
`max_coalesce`), which is reported on each of them as `coalesced_into`. A finished request has
already registered its version in the store, so the next chat is served by it: the engine
returns the trained checkpoint, and `train_and_register` makes it the adapter's next version.

**Memory.** When a request has trained, what it taught (each sample's conversation up to the
answer, its feedback and example) is kept as the adapter's memory, in the same transaction that
marks it done (at most `memory_items` per adapter, the oldest forgotten first). Each later batch
(one request, or the requests coalesced with it) re-teaches `TrainingConfig.replay` items of it,
chosen by `choose_replay`, on fresh answers from the version being trained, each with its own
feedback in the teacher's prompt: on-policy replay, so a new preference does not push out what
earlier feedback taught. Memory is deleted with its adapter, what later versions taught is
forgotten when the adapter is rolled back, and users list and forget items through the API.

    queue = FeedbackQueue(store, engine, max_coalesce=8, purge_interval=600)
    queue.start()  # and, every purge_interval seconds, expired rollouts are purged
    request = await queue.admit(items, owner=None)  # None: no owner scoping (the admin)
    done = await queue.wait(request.id)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from claas.errors import (
    ClaasError,
    ClaimLost,
    DatabaseUnavailable,
    FeedbackNotFound,
    InvalidFeedback,
    NothingToTrain,
    RolloutNotFound,
    ServiceClosed,
    TooManyRequests,
)
from claas.ids import (
    LORA_ID_PATTERN,
    check_owner,
    parse_lora_id,
    rollout_missing,
    text_hash,
    validate_lora_id,
    visible_to,
)
from claas.records import PENDING, AdapterVersion, FeedbackRequest, MemoryItem, Rollout
from claas.sdpo.config import (
    ExampleText,
    FeedbackSample,
    FeedbackText,
    Lesson,
    ReplayChoice,
    TrainedCheckpoint,
    TrainFrom,
    TrainingConfig,
    lesson_key,
)
from claas.sdpo.engine import SDPOEngine
from claas.sdpo.prompts import MAX_TEXT_CHARS, Utf8Text
from claas.services.protocol import delete_checkpoints
from claas.store import NOTICE_QUEUED, Store

logger = logging.getLogger(__name__)

TERMINAL = ("done", "failed")


class FeedbackItem(BaseModel):
    """One piece of feedback on one rollout, named by `completion_id` or by
    `lora_id` + `prompt` + `response`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # what `_names_a_rollout` checks
            "anyOf": [
                {
                    "properties": {"completion_id": {"type": "string"}},
                    "required": ["completion_id"],
                },
                {
                    "properties": {
                        "lora_id": {"type": "string"},
                        "prompt": {"type": "string"},
                        "response": {"type": "string"},
                    },
                    "required": ["lora_id", "prompt", "response"],
                },
            ]
        },
    )

    completion_id: str | None = Field(
        None, max_length=200, description="The `id` of the chat completion (preferred, exact)."
    )
    choice_index: int = Field(0, ge=0, le=63, description="Which choice of that completion.")
    lora_id: str | None = Field(
        None, max_length=200, json_schema_extra={"pattern": LORA_ID_PATTERN}
    )
    prompt: Utf8Text | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="The user message text."
    )
    response: Utf8Text | None = Field(
        None, max_length=MAX_TEXT_CHARS, description="The answer's text."
    )
    feedback: FeedbackText
    example: ExampleText | None = Field(
        None,
        description="An answer you would have wanted. The teacher is shown it as an example "
        "(never trained on as a target), so what the model never says, a name, can be taught.",
    )
    training: TrainingConfig | None = None

    @model_validator(mode="after")
    def _names_a_rollout(self) -> FeedbackItem:
        by_text = None not in (self.lora_id, self.prompt, self.response)
        if self.completion_id is None and not by_text:
            raise ValueError(
                "name the rollout with completion_id, or with lora_id + prompt + response"
            )
        return self


@dataclass(frozen=True)
class ResolvedFeedback:
    lora_id: str
    items: list[dict[str, Any]]  # {"rollout_id", "feedback", "example" if given}
    training: TrainingConfig


class FeedbackQueue:
    """Admits feedback into the store's queue and, with `train`, trains it as a worker.

    The queue itself is the database: any number of processes admit requests and any number of
    workers claim batches (`Store.claim`), each under a lease its heartbeat extends every third
    of `lease_seconds`. A worker finds requests queued by other processes every `poll_seconds`
    and its own at once; it trains at most `max_batches` batches at a time.
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

    # -- validation, before anything is queued ---------------------------------------------
    def resolve(self, items: Sequence[FeedbackItem], owner: str | None) -> ResolvedFeedback:
        """Find each item's rollout and check the batch; raise a domain error otherwise.

        `owner` is the caller's (None: the admin, or a server without keys). An adapter the
        caller names is checked before any lookup (403), so a guessed prompt and response
        reveal nothing; a rollout found by completion id that belongs to another owner is
        answered exactly like one that does not exist.
        """
        if not items:
            raise InvalidFeedback("send at least one feedback item")
        rollouts = [self._rollout(item, owner) for item in items]
        for rollout in rollouts:
            if rollout.lora_id is None:
                raise NothingToTrain(
                    f"rollout {rollout.id} came from the base model {rollout.model!r}, which has "
                    "no adapter to train; chat with an adapter (model 'owner/name') and give "
                    "feedback on that answer"
                )
        lora_ids = sorted({r.lora_id for r in rollouts if r.lora_id})
        if len(lora_ids) != 1:
            raise InvalidFeedback(
                f"the items name rollouts of different adapters {lora_ids}; send one request "
                "per adapter"
            )
        configs = {item.training or TrainingConfig() for item in items}
        if len(configs) != 1:
            raise InvalidFeedback(
                "the items carry different training configs; use one config per request"
            )
        self.store.get_adapter(lora_ids[0])  # the adapter still exists
        return ResolvedFeedback(
            lora_id=lora_ids[0],
            items=[
                {"rollout_id": r.id, "feedback": item.feedback}
                | ({"example": item.example} if item.example is not None else {})
                for r, item in zip(rollouts, items, strict=True)
            ],
            training=configs.pop(),
        )

    def _rollout(self, item: FeedbackItem, owner: str | None) -> Rollout:
        if item.completion_id is not None:
            rollout_id = item.completion_id
            if item.choice_index:
                rollout_id = f"{item.completion_id}.{item.choice_index}"
            rollout = self.store.get_rollout(rollout_id)
            if rollout.lora_id is not None and not visible_to(owner, rollout.lora_id):
                raise rollout_missing(rollout_id)
            return rollout
        assert item.lora_id is not None and item.prompt is not None and item.response is not None
        lora_id = validate_lora_id(item.lora_id)
        check_owner(owner, lora_id)  # before the lookup: a 403 says nothing of the texts
        return self.store.find_rollout(lora_id, text_hash(item.prompt), text_hash(item.response))

    # -- queueing ---------------------------------------------------------------------------
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
        samples = await asyncio.to_thread(self._samples_of, resolved.lora_id, resolved.items)
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
                if request.status in TERMINAL:
                    return request
                async with self._changed:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), self.poll_seconds)

    def depth(self) -> int:
        return self.store.count_feedback(statuses=("queued",))

    # -- the worker -------------------------------------------------------------------------
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

    async def _train(self, batch: list[FeedbackRequest]) -> None:
        """Train one batch. A request that cannot be trained fails alone, before the step.

        The adapter may be deleted while its step runs: its requests are then gone with it,
        and there is nothing left to mark.
        """
        config = TrainingConfig.model_validate(batch[0].training)
        ready: list[tuple[FeedbackRequest, list[FeedbackSample]]] = []
        for request in batch:
            try:
                samples = await asyncio.to_thread(self._samples, request)
                await self.engine.check(samples, config)
            except (DatabaseUnavailable, ServiceClosed) as error:  # not the request's fault
                self._log_finished([request], "interrupted", error=str(error))  # the lease ends
                return
            except ClaasError as error:
                message = f"{type(error).__name__}: {error}"
                marked = await self._mark(
                    self.store.mark_failed, [request.id], message, worker=self.worker
                )
                self._log_finished([request], "failed" if marked else "deleted", error=message)
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
            replay = await asyncio.to_thread(self._replay, head, samples, config)
            learned = (
                [
                    MemoryItem(
                        id=f"mem-{uuid.uuid4().hex}",
                        feedback_id=request.id,
                        created_at=time.time(),
                        **sample.model_dump(include=set(Lesson.model_fields)),
                    )
                    for request, request_samples in ready
                    for sample in request_samples
                ]
                if self.memory_items
                else []
            )

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
            self._log_finished(
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
            self._log_finished(requests, "reclaimed", error=str(error))
        except (DatabaseUnavailable, ServiceClosed) as error:
            # Not the request's fault (the database went, or the training service is shutting
            # down): it stays claimed, and once the lease ends it is trained again (or found
            # done, if its version was registered before the database went).
            self._log_finished(requests, "interrupted", error=str(error))
        except Exception as error:
            # A domain error says what to do; anything else is a bug or a broken service, whose
            # traceback is logged.
            unexpected = not isinstance(error, ClaasError)
            message = f"{type(error).__name__}: {error}"
            if unexpected:
                message = f"training failed ({message}); the adapter stays on its last good version"
            marked = await self._mark(self.store.mark_failed, ids, message, worker=self.worker)
            self._log_finished(
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

    def _replay(
        self, head: FeedbackRequest, samples: Sequence[FeedbackSample], config: TrainingConfig
    ) -> list[Lesson]:
        """The memory items this batch re-teaches (`choose_replay`), seeded by the request."""
        if not (self.memory_items and config.replay):
            return []
        memory = self.store.memory(head.lora_id)
        chosen = choose_replay(
            memory, samples, config.replay, config.replay_choice, random.Random(head.id)
        )
        return [
            Lesson.model_validate(item.model_dump(include=set(Lesson.model_fields)))
            for item in chosen
        ]

    @staticmethod
    def _log_finished(
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

    def _samples(self, request: FeedbackRequest) -> list[FeedbackSample]:
        return self._samples_of(request.lora_id, request.items)

    def _samples_of(self, lora_id: str, items: Sequence[dict[str, Any]]) -> list[FeedbackSample]:
        return [self._sample(lora_id, item) for item in items]

    def _sample(self, lora_id: str, item: dict[str, Any]) -> FeedbackSample:
        try:
            rollout = self.store.get_rollout(item["rollout_id"])
        except RolloutNotFound as error:
            raise InvalidFeedback(f"{error} (it expired while queued)") from error
        return FeedbackSample(
            lora_id=lora_id,
            messages=rollout.messages,
            prompt_tokens=rollout.prompt_tokens,
            response_tokens=rollout.response_tokens,
            behavior_logprobs=rollout.behavior_logprobs,
            feedback=item["feedback"],
            example=item.get("example"),
            prompt_format=rollout.prompt_format,
        )


def default_worker_name() -> str:
    """Unique per process: the host, the pid and a random suffix (a pid is reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def choose_replay(
    memory: Sequence[MemoryItem],
    batch: Sequence[Lesson],
    count: int,
    choice: ReplayChoice,
    rng: random.Random,
) -> list[MemoryItem]:
    """At most `count` items of `memory` (newest first) to re-teach beside `batch`.

    Lessons the batch teaches anyway are left out. `preferences` rehearses what *other* feedback
    taught: one item per feedback text not in the batch, the most recently taught texts first
    and, once each has one, round again; `recent` takes the newest items; `spread` takes items
    evenly over the memory's history, oldest to newest. Within a feedback text, and where the
    spread falls between items, the choice is `rng`'s.
    """
    taught = {lesson_key(s.prompt_format, s.messages, s.feedback) for s in batch}
    pool = [m for m in memory if lesson_key(m.prompt_format, m.messages, m.feedback) not in taught]
    if count <= 0 or not pool:
        return []
    if choice == "recent":
        return pool[:count]
    if choice == "spread":
        oldest_first = pool[::-1]
        if len(oldest_first) <= count:
            return oldest_first
        edges = [round(i * len(oldest_first) / count) for i in range(count + 1)]
        return [oldest_first[rng.randrange(a, b)] for a, b in itertools.pairwise(edges)]
    current = {s.feedback for s in batch}
    groups: dict[str, list[MemoryItem]] = {}
    for item in pool:  # newest first, so the groups are in order of their latest teaching
        if item.feedback not in current:
            groups.setdefault(item.feedback, []).append(item)
    for items in groups.values():
        rng.shuffle(items)
    chosen: list[MemoryItem] = []
    for rank in range(max((len(g) for g in groups.values()), default=0)):
        chosen += [items[rank] for items in groups.values() if rank < len(items)]
    return chosen[:count]


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
    trained = await engine.distill(samples, config, start, replay)
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
