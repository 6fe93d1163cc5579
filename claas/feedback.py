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
import itertools
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from claas.errors import (
    ClaasError,
    FeedbackNotFound,
    InvalidFeedback,
    NothingToTrain,
    RolloutNotFound,
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
from claas.store import Store

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
    ) -> None:
        self.store = store
        self.memory_items = memory_items  # kept per adapter for replay; 0: none kept or replayed
        self.engine = engine
        self.max_coalesce = max_coalesce
        self.max_pending_per_owner = max_pending_per_owner
        self.on_trained = on_trained
        self.on_version = on_version  # after a version is registered: e.g. load it for serving
        self.purge_interval = purge_interval  # seconds; None: purge only at start
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._scheduler: asyncio.Task[None] | None = None
        self._purger: asyncio.Task[None] | None = None

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
        resolved = self.resolve(items, owner)
        adapter_owner = parse_lora_id(resolved.lora_id)[0]
        pending = self.store.count_feedback(adapter_owner, statuses=PENDING)
        if self.max_pending_per_owner is not None and pending >= self.max_pending_per_owner:
            raise TooManyRequests(
                f"{adapter_owner!r} has {pending} feedback requests queued or running, the most "
                f"this server takes (CLAAS_MAX_PENDING_FEEDBACK_PER_OWNER); wait for some to "
                "finish (GET /v1/feedback/{id}) and retry",
                headers={"Retry-After": "30"},
            )
        samples = [self._sample(resolved.lora_id, item) for item in resolved.items]
        await self.engine.check(samples, resolved.training)
        return self.submit(resolved)

    def submit(self, resolved: ResolvedFeedback) -> FeedbackRequest:
        request = self.store.enqueue_feedback(
            resolved.lora_id, resolved.items, resolved.training.model_dump()
        )
        self._wake.set()
        return request

    async def wait(self, feedback_id: str, timeout: float | None = None) -> FeedbackRequest:
        """Until the request is done or failed. FeedbackNotFound if its adapter was deleted."""
        async with asyncio.timeout(timeout), self._changed:
            while (request := self.store.get_feedback(feedback_id)).status not in TERMINAL:
                await self._changed.wait()
        return request

    def depth(self) -> int:
        return self.store.queue_depth()

    # -- the worker -------------------------------------------------------------------------
    def start(self) -> None:
        """Resume what a previous process left, then serve the queue (call inside the loop).

        Expired rollouts are purged here too, since they can no longer receive feedback, and
        then every `purge_interval` seconds until `stop`.
        """
        if self._scheduler is not None:
            return  # started already
        requeued = self.store.requeue_running()
        purged = self.store.purge_expired_rollouts()
        logger.info(
            "feedback queue started: %d requests requeued, %d expired rollouts purged",
            requeued,
            purged,
            extra={"requeued": requeued, "purged_rollouts": purged, "queued": self.depth()},
        )
        self._scheduler = asyncio.create_task(self._schedule())
        if self.purge_interval is not None:
            self._purger = asyncio.create_task(self._purge_every(self.purge_interval))
        self._wake.set()

    async def stop(self) -> None:
        tasks = [
            t for t in [self._scheduler, self._purger, *self._running.values()] if t is not None
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._scheduler = self._purger = None

    async def _purge_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            # Off the event loop: a purge waits on SQLite's write lock, chats must not.
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

    async def _schedule(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            for lora_id in self.store.adapters_with_queued():
                if lora_id not in self._running:
                    self._running[lora_id] = asyncio.create_task(self._drain(lora_id))

    async def _drain(self, lora_id: str) -> None:
        """Run one adapter's queue in arrival order until it is empty."""
        try:
            while batch := self._next_batch(lora_id):
                await self._train(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug, not a request's fault: keep serving the other adapters
            logger.exception(
                "feedback worker for %s stopped; it restarts on the next request", lora_id
            )
        finally:
            self._running.pop(lora_id, None)
            self._wake.set()  # anything that arrived meanwhile

    def _next_batch(self, lora_id: str) -> list[FeedbackRequest]:
        queued = self.store.queued_for(lora_id, self.max_coalesce)
        if not queued:
            return []
        head = queued[0]
        batch = [head]
        for request in queued[1:]:  # only a contiguous run with the same config
            if request.training != head.training:
                break
            batch.append(request)
        return batch

    async def _train(self, batch: list[FeedbackRequest]) -> None:
        """Train one batch. A request that cannot be trained fails alone, before the step.

        The adapter may be deleted while its step runs: its requests are then gone with it,
        and there is nothing left to mark.
        """
        config = TrainingConfig.model_validate(batch[0].training)
        ready: list[tuple[FeedbackRequest, list[FeedbackSample]]] = []
        for request in batch:
            try:
                samples = [self._sample(request.lora_id, item) for item in request.items]
                await self.engine.check(samples, config)
            except ClaasError as error:
                message = f"{type(error).__name__}: {error}"
                marked = self._mark(self.store.mark_failed, [request.id], message)
                self._log_finished([request], "failed" if marked else "deleted", error=message)
                await self.notify()  # its waiters learn now, not after the batch's step
                continue
            ready.append((request, samples))
        if not ready:
            await self.notify()
            return
        head, ids = ready[0][0], [request.id for request, _ in ready]
        requests = [request for request, _ in ready]
        if not self._mark(self.store.mark_running, ids):
            self._log_finished(requests, "deleted")
            await self.notify()
            return
        for follower, _ in ready[1:]:
            self._mark(self.store.mark_coalesced, follower.id, head.id)
        started = time.perf_counter()
        try:
            samples = [sample for _, request_samples in ready for sample in request_samples]
            replay = await asyncio.to_thread(self._replay, head, samples, config)
            version, trained = await train_and_register(
                self.engine, self.store, samples, config, feedback_id=head.id, replay=replay
            )
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
            metrics = {
                **trained.metrics,
                "timings": trained.timings,
                "steps": [s.model_dump() for s in trained.steps],
                "teacher_texts": trained.teacher_texts,
                "coalesced": len(ready),
                "coalesced_ids": ids,
            }
            marked = self._mark(
                self.store.mark_done, ids, version.version, metrics, learned, self.memory_items
            )
            self._log_finished(
                requests,
                "done" if marked else "deleted",
                version=version,
                trained=trained,
                seconds=time.perf_counter() - started,
            )
            await self._announce(version)
        except asyncio.CancelledError:
            raise  # shutting down: the requests stay `running` and are requeued at start-up
        except Exception as error:
            # A domain error says what to do; anything else is a bug or a broken service, whose
            # traceback is logged.
            unexpected = not isinstance(error, ClaasError)
            message = f"{type(error).__name__}: {error}"
            if unexpected:
                message = f"training failed ({message}); the adapter stays on its last good version"
            marked = self._mark(self.store.mark_failed, ids, message)
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
    def _mark(update: Callable[..., None], *args: Any) -> bool:
        """Record a status change; False if the requests were deleted with their adapter."""
        try:
            update(*args)
        except FeedbackNotFound:
            return False
        return True

    async def notify(self) -> None:
        """Wake `wait`ers: a request finished, failed, or was deleted with its adapter."""
        async with self._changed:
            self._changed.notify_all()

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
) -> tuple[AdapterVersion, TrainedCheckpoint]:
    """Train the adapter's current version on `samples` and register the result as the next.

    The adapter as it was when training started goes with the registration: if it was rolled
    back, or deleted and re-created, meanwhile, the store refuses the result (`Conflict`) and
    the checkpoints just written are removed, so nothing half-registered remains.
    """
    if not samples:
        raise InvalidFeedback("no samples given; send at least one feedback item")
    lora_id = validate_lora_id(samples[0].lora_id)
    adapter = store.get_adapter(lora_id)
    current = store.latest_version(lora_id)
    if current is None:
        raise InvalidFeedback(f"adapter {lora_id} has no version to train from; re-create it")
    start = TrainFrom(
        version=current.version, state_path=current.state_path, sampler_path=current.sampler_path
    )
    trained = await engine.distill(samples, config, start, replay)
    try:
        version = store.add_version(
            lora_id,
            trained.state_path,
            trained.sampler_path,
            feedback_id,
            {**trained.metrics, "timings": trained.timings},
            trained_from=adapter,
        )
    except BaseException:
        await delete_checkpoints(engine.service, [trained.state_path, trained.sampler_path])
        raise
    return version, trained
