"""The feedback queue's rules, against a real SQLite store and a stand-in engine.

No model is loaded: `StandInEngine` takes the place of `SDPOEngine`, so each test reads as one
rule of `claas.feedback.FeedbackQueue` (order, independence of adapters, coalescing, failing alone,
crashes, refused registration, resuming after a restart). A held step (`engine.hold`) keeps an
adapter busy while more requests queue up; no test depends on timing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from claas.errors import InvalidFeedback, ServiceClosed
from claas.feedback import FeedbackItem, FeedbackQueue
from claas.ids import text_hash
from claas.records import FeedbackRequest, Rollout
from claas.sdpo.config import (
    FeedbackSample,
    Lesson,
    TrainedCheckpoint,
    TrainFrom,
    TrainingConfig,
)
from claas.sdpo.engine import SDPOEngine
from claas.store import Store

ALICE = "alice/assistant"
BOB = "bob/helper"
GUARD = 30.0  # seconds: only so that a broken queue fails a test instead of hanging it
REFUSE = "REFUSE"  # feedback with this marker is refused by the stand-in's `check`
CRASH = "CRASH"  # feedback with this marker makes the stand-in's `distill` raise
CLOSING = "CLOSING"  # feedback with this marker meets a training service that shuts down


# -- the stand-in engine ----------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One `distill` call as the stand-in saw it."""

    lora_id: str
    feedback: list[str]
    start_version: int
    config: TrainingConfig
    replayed: list[str]  # the replayed lessons' feedback


class StandInRestClient:
    def __init__(self, deleted: list[str]) -> None:
        self.deleted = deleted

    async def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> None:
        self.deleted.append(tinker_path)


class StandInService:
    def __init__(self) -> None:
        self.deleted: list[str] = []

    def create_rest_client(self) -> StandInRestClient:
        return StandInRestClient(self.deleted)


class StandInEngine:
    """A stand-in for SDPOEngine: no model; it records the batches it is given and returns a
    fake checkpoint.

    - `check` refuses (InvalidFeedback) any sample whose feedback contains REFUSE;
    - `distill` records (lora_id, feedback texts, start version, config), then waits while the
      adapter is held (`hold`), then raises if a feedback contains CRASH (a RuntimeError) or
      CLOSING (ServiceClosed), else returns
      checkpoints `local://stand-in/{n}/state` and `.../sampler` for its n-th call, as if
      the adapter changed after its last step (it has no steps, so `before_step` is never
      called; tests/api/test_isolation.py checks that hook on the real engine);
    - `most_at_once[lora_id]` is the most `distill` calls of one adapter ever in flight together;
    - `service.deleted` lists the checkpoint paths deleted through the rest client.
    """

    def __init__(self) -> None:
        self.service = StandInService()
        self.batches: list[Batch] = []
        self.returned: list[TrainedCheckpoint] = []
        self.most_at_once: dict[str, int] = {}
        self._in_flight: dict[str, int] = {}
        self._gates: dict[str, asyncio.Event] = {}
        self._progress = asyncio.Condition()

    def hold(self, lora_id: str) -> asyncio.Event:
        """Hold the adapter's next steps open inside `distill` until the event is set."""
        gate = self._gates[lora_id] = asyncio.Event()
        return gate

    async def started(self, count: int) -> None:
        """Until `distill` has been entered `count` times in all."""
        async with asyncio.timeout(GUARD), self._progress:
            await self._progress.wait_for(lambda: len(self.batches) >= count)

    async def check(
        self, samples: Sequence[FeedbackSample], config: TrainingConfig
    ) -> list[FeedbackSample]:
        for sample in samples:
            if REFUSE in sample.feedback:
                raise InvalidFeedback(f"the stand-in refuses {sample.feedback!r}")
        return list(samples)

    async def distill(
        self,
        samples: Sequence[FeedbackSample],
        config: TrainingConfig,
        start: TrainFrom,
        replay: Sequence[Lesson] = (),
        before_step: Callable[[int], Awaitable[None]] | None = None,
    ) -> TrainedCheckpoint:
        lora_id = samples[0].lora_id
        feedback = [s.feedback for s in samples]
        self._in_flight[lora_id] = self._in_flight.get(lora_id, 0) + 1
        self.most_at_once[lora_id] = max(
            self.most_at_once.get(lora_id, 0), self._in_flight[lora_id]
        )
        try:
            replayed = [lesson.feedback for lesson in replay]
            self.batches.append(Batch(lora_id, feedback, start.version, config, replayed))
            n = len(self.batches)
            async with self._progress:
                self._progress.notify_all()
            gate = self._gates.get(lora_id)
            if gate is not None:
                await gate.wait()
            for _ in range(3):  # give a second step of the same adapter the chance to overlap
                await asyncio.sleep(0)
            if any(CRASH in text for text in feedback):
                raise RuntimeError("the stand-in's accelerator fell over")
            if any(CLOSING in text for text in feedback):
                raise ServiceClosed("the stand-in's training service is closed")
        finally:
            self._in_flight[lora_id] -= 1
        trained = TrainedCheckpoint(
            lora_id=lora_id,
            trained_from=start.version,
            state_path=f"local://stand-in/{n}/state",
            sampler_path=f"local://stand-in/{n}/sampler",
            divergence_mode=config.divergence_mode,
            metrics={"divergence_mode": config.divergence_mode},
            steps=[],
            teacher_texts=[],
            timings={},
        )
        self.returned.append(trained)
        return trained


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "claas.db") as opened:
        yield opened


def make_adapter(store: Store, lora_id: str) -> str:
    """An adapter at version 1 with one rollout to give feedback on; returns the rollout id."""
    store.create_adapter(lora_id, "SmolLM2-135M-Instruct", 8, 16.0, ["q_proj", "v_proj"])
    store.add_version(
        lora_id, f"local://{lora_id}/state/1", f"local://{lora_id}/sampler/1", None, {}
    )
    rollout_id = f"chatcmpl-{lora_id.replace('/', '-')}"
    store.add_rollout(
        Rollout(
            id=rollout_id,
            lora_id=lora_id,
            adapter_version=1,
            model=lora_id,
            messages=[{"role": "user", "content": "hi"}],
            prompt_tokens=[1, 2, 3],
            response_tokens=[4, 5],
            behavior_logprobs=[-0.25, -1.5],
            sampling_params={"temperature": 0.7},
            response_text="hello there",
            prompt_hash=text_hash("hi"),
            response_hash=text_hash("hello there"),
            created_at=time.time(),
            expires_at=None,
        )
    )
    return rollout_id


def items(
    rollout_id: str, feedback: str, config: TrainingConfig | None = None
) -> list[FeedbackItem]:
    return [FeedbackItem(completion_id=rollout_id, feedback=feedback, training=config)]


@asynccontextmanager
async def serving(
    store: Store, engine: StandInEngine, max_coalesce: int = 8
) -> AsyncIterator[FeedbackQueue]:
    queue = FeedbackQueue(store, cast(SDPOEngine, engine), max_coalesce=max_coalesce)
    queue.start()
    try:
        yield queue
    finally:
        await queue.stop()


async def finished(
    queue: FeedbackQueue, requests: Sequence[FeedbackRequest]
) -> list[FeedbackRequest]:
    return [await queue.wait(r.id, timeout=GUARD) for r in requests]


# -- the rules --------------------------------------------------------------------------------


def test_one_adapter_trains_in_arrival_order_one_step_at_a_time_each_on_the_next_version(
    store: Store,
) -> None:
    rollout = make_adapter(store, ALICE)
    engine = StandInEngine()

    async def body() -> None:
        async with serving(store, engine, max_coalesce=1) as queue:
            gate = engine.hold(ALICE)
            first = await queue.admit(items(rollout, "r0"), owner=None)
            await engine.started(1)  # r0 is training; the rest queue up behind it
            rest = [await queue.admit(items(rollout, f"r{i}"), owner=None) for i in range(1, 6)]
            assert store.count_feedback(lora_id=ALICE, statuses=["queued"]) == 5
            gate.set()
            done = await finished(queue, [first, *rest])

        assert [b.feedback for b in engine.batches] == [[f"r{i}"] for i in range(6)]
        assert [b.start_version for b in engine.batches] == [1, 2, 3, 4, 5, 6]
        # memory: each request replays the two most recently taught other feedback texts
        assert [b.replayed for b in engine.batches] == [
            [f"r{j}" for j in range(i - 1, max(i - 3, -1), -1)] for i in range(6)
        ]
        assert engine.most_at_once[ALICE] == 1
        assert [(r.status, r.version, r.coalesced_into) for r in done] == [
            ("done", 2 + i, None) for i in range(6)
        ]
        versions = store.list_versions(ALICE)
        assert [v.version for v in versions] == [1, 2, 3, 4, 5, 6, 7]
        assert [v.feedback_id for v in versions[1:]] == [r.id for r in done]
        assert [v.state_path for v in versions[1:]] == [c.state_path for c in engine.returned]
        assert store.get_adapter(ALICE).current_version == 7

    asyncio.run(body())


def test_two_adapters_train_independently_a_held_step_does_not_block_the_other(
    store: Store,
) -> None:
    alice_rollout = make_adapter(store, ALICE)
    bob_rollout = make_adapter(store, BOB)
    engine = StandInEngine()

    async def body() -> None:
        async with serving(store, engine) as queue:
            gate = engine.hold(ALICE)
            held = await queue.admit(items(alice_rollout, "alice 1"), owner=None)
            await engine.started(1)
            bob_done = []  # two steps of bob's, one after the other, while alice's is held
            for text in ("bob 1", "bob 2"):
                request = await queue.admit(items(bob_rollout, text), owner=None)
                bob_done += await finished(queue, [request])
            assert [(r.status, r.version) for r in bob_done] == [("done", 2), ("done", 3)]
            assert store.get_feedback(held.id).status == "running"
            assert store.get_adapter(ALICE).current_version == 1
            gate.set()
            (alice_done,) = await finished(queue, [held])

        assert (alice_done.status, alice_done.version) == ("done", 2)
        assert engine.batches[0].lora_id == ALICE
        assert {b.lora_id for b in engine.batches[1:]} == {BOB}
        assert engine.most_at_once == {ALICE: 1, BOB: 1}

    asyncio.run(body())


def test_same_config_requests_that_queue_during_a_step_coalesce_up_to_max_and_share_a_version(
    store: Store,
) -> None:
    rollout = make_adapter(store, ALICE)
    engine = StandInEngine()
    usual = TrainingConfig(steps_per_batch=1)
    other = TrainingConfig(steps_per_batch=2)

    async def body() -> None:
        async with serving(store, engine, max_coalesce=3) as queue:
            gate = engine.hold(ALICE)
            head = await queue.admit(items(rollout, "r0", usual), owner=None)
            await engine.started(1)
            plan = [("r1", usual), ("r2", usual), ("r3", usual), ("r4", usual)]
            plan += [("r5", other), ("r6", usual)]
            queued = [await queue.admit(items(rollout, t, c), owner=None) for t, c in plan]
            gate.set()
            r0, r1, r2, r3, r4, r5, r6 = await finished(queue, [head, *queued])

        # r1..r3 fill one batch (max_coalesce=3); r4 cannot join r6 across r5's other config.
        assert [(b.feedback, b.start_version) for b in engine.batches] == [
            (["r0"], 1),
            (["r1", "r2", "r3"], 2),
            (["r4"], 3),
            (["r5"], 4),
            (["r6"], 5),
        ]
        assert [b.config for b in engine.batches] == [usual, usual, usual, other, usual]
        assert [r.version for r in (r0, r1, r2, r3, r4, r5, r6)] == [2, 3, 3, 3, 4, 5, 6]
        assert all(r.status == "done" for r in (r0, r1, r2, r3, r4, r5, r6))
        assert [r.coalesced_into for r in (r0, r1, r2, r3, r4, r5, r6)] == [
            None,
            None,
            r1.id,
            r1.id,
            None,
            None,
            None,
        ]
        for request in (r1, r2, r3):
            assert request.metrics["coalesced"] == 3
            assert request.metrics["coalesced_ids"] == [r1.id, r2.id, r3.id]
        assert r4.metrics["coalesced"] == 1
        assert store.get_version(ALICE, 3).feedback_id == r1.id  # the leader's id

    asyncio.run(body())


def test_a_request_the_engine_refuses_at_check_time_fails_alone_and_its_batch_trains(
    store: Store,
) -> None:
    rollout = make_adapter(store, ALICE)
    engine = StandInEngine()

    async def body() -> None:
        async with serving(store, engine) as queue:
            # Admission runs the same check: a request refused there is never queued.
            with pytest.raises(InvalidFeedback, match=REFUSE):
                await queue.admit(items(rollout, f"{REFUSE} at the door"), owner=None)
            assert store.count_feedback(statuses=["queued"]) == 0

            gate = engine.hold(ALICE)
            head = await queue.admit(items(rollout, "r0"), owner=None)
            await engine.started(1)
            # Queued past admission (as when the engine's verdict changes while it waits).
            texts = [f"{REFUSE} r1", "r2", f"{REFUSE} r3", "r4"]
            resolved = [queue.resolve(items(rollout, t), owner=None) for t in texts]
            queued = [
                store.enqueue_feedback(r.lora_id, r.items, r.training.model_dump())
                for r in resolved
            ]
            gate.set()
            r0, r1, r2, r3, r4 = await finished(queue, [head, *queued])

        assert [b.feedback for b in engine.batches] == [["r0"], ["r2", "r4"]]
        for refused in (r1, r3):
            assert refused.status == "failed" and refused.version is None
            assert refused.error is not None
            assert refused.error.startswith("InvalidFeedback: the stand-in refuses")
            assert REFUSE in refused.error
        assert [(r.status, r.version) for r in (r0, r2, r4)] == [
            ("done", 2),
            ("done", 3),
            ("done", 3),
        ]
        assert r2.coalesced_into is None and r4.coalesced_into == r2.id
        assert r2.metrics["coalesced_ids"] == [r2.id, r4.id]

    asyncio.run(body())


def test_an_engine_crash_fails_the_batch_keeps_the_last_good_version_and_the_next_request_trains(
    store: Store,
) -> None:
    rollout = make_adapter(store, ALICE)
    engine = StandInEngine()

    async def body() -> None:
        async with serving(store, engine) as queue:
            crashed = await queue.admit(items(rollout, f"{CRASH} please"), owner=None)
            (crashed,) = await finished(queue, [crashed])
            assert crashed.status == "failed" and crashed.version is None
            assert crashed.error is not None
            assert "RuntimeError: the stand-in's accelerator fell over" in crashed.error
            assert "the adapter stays on its last good version" in crashed.error
            assert store.get_adapter(ALICE).current_version == 1
            assert [v.version for v in store.list_versions(ALICE)] == [1]

            (after,) = await finished(
                queue, [await queue.admit(items(rollout, "after"), owner=None)]
            )

        assert (after.status, after.version) == ("done", 2)
        assert [(b.feedback, b.start_version) for b in engine.batches] == [
            ([f"{CRASH} please"], 1),
            (["after"], 1),
        ]
        assert engine.service.deleted == []  # the crash returned no checkpoint to delete

    asyncio.run(body())


def test_a_training_service_that_shuts_down_leaves_the_request_claimed_not_failed(
    store: Store,
) -> None:
    """ServiceClosed is not the request's fault: it stays claimed (running, no error), to be
    trained again once its lease ends, as when the database goes away."""
    rollout = make_adapter(store, ALICE)
    engine = StandInEngine()

    async def body() -> None:
        async with serving(store, engine) as queue:
            trained = asyncio.Event()
            queue.on_trained = lambda head, seconds: trained.set()
            request = await queue.admit(items(rollout, f"{CLOSING} now"), owner=None)
            async with asyncio.timeout(GUARD):
                await trained.wait()
            after = store.get_feedback(request.id)
            assert (after.status, after.error, after.version) == ("running", None, None)
            assert store.get_adapter(ALICE).current_version == 1

    asyncio.run(body())


def test_a_refused_registration_deletes_the_new_checkpoints_and_fails_the_request(
    store: Store,
) -> None:
    rollout = make_adapter(store, ALICE)
    store.add_version(ALICE, "local://alice/state/2", "local://alice/sampler/2", None, {})
    engine = StandInEngine()

    async def body() -> None:
        async with serving(store, engine) as queue:
            gate = engine.hold(ALICE)
            request = await queue.admit(items(rollout, "trained from v2"), owner=None)
            await engine.started(1)
            store.rollback(ALICE, 1)  # while the step runs: its result no longer applies
            gate.set()
            (failed,) = await finished(queue, [request])
            assert failed.status == "failed" and failed.version is None
            assert failed.error is not None and failed.error.startswith("Conflict: ")
            assert "rolled back" in failed.error
            (checkpoint,) = engine.returned
            assert engine.service.deleted == [checkpoint.state_path, checkpoint.sampler_path]
            assert store.get_adapter(ALICE).current_version == 1
            assert [v.version for v in store.list_versions(ALICE)] == [1, 2]

            (again,) = await finished(
                queue, [await queue.admit(items(rollout, "again"), owner=None)]
            )

        assert engine.batches[1].start_version == 1  # trains from the version rolled back to
        assert (again.status, again.version) == ("done", 3)  # numbers are never reused
        assert len(engine.service.deleted) == 2  # the good result's checkpoints are kept

    asyncio.run(body())


def test_requests_left_running_by_a_previous_process_are_queued_again_at_start(
    tmp_path: Path,
) -> None:
    path = tmp_path / "claas.db"
    engine = StandInEngine()

    async def previous_process() -> tuple[str, str]:
        with Store(path) as store:
            rollout = make_adapter(store, ALICE)
            queue = FeedbackQueue(store, cast(SDPOEngine, engine))  # never started
            interrupted = await queue.admit(items(rollout, "interrupted"), owner=None)
            behind = await queue.admit(items(rollout, "behind it"), owner=None)
            store.mark_running(interrupted.id)  # it was training when the process died
            return interrupted.id, behind.id

    interrupted_id, behind_id = asyncio.run(previous_process())
    assert engine.batches == []

    async def next_process() -> None:
        with Store(path) as store:
            assert store.get_feedback(interrupted_id).status == "running"
            async with serving(store, engine, max_coalesce=1) as queue:
                interrupted = await queue.wait(interrupted_id, timeout=GUARD)
                behind = await queue.wait(behind_id, timeout=GUARD)
            assert (interrupted.status, interrupted.version) == ("done", 2)
            assert (behind.status, behind.version) == ("done", 3)

    asyncio.run(next_process())
    assert [(b.feedback, b.start_version) for b in engine.batches] == [
        (["interrupted"], 1),
        (["behind it"], 2),
    ]
