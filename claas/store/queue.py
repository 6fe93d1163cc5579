"""The store's feedback queue: durable training requests, their claims and their leases.

Each request's status goes queued → running → done | failed, in arrival order (the `seq`
column; clocks can go back). A worker *claims* an adapter's oldest requests (`claim`): they
become `running` under its name with a lease that its heartbeat extends (`extend_lease`); a lease
that ends (the worker died) puts them back in the queue (`reclaim`). On PostgreSQL the rows a
decision reads are locked (`SELECT … FOR UPDATE`, and `SKIP LOCKED` for claims, as job queues on
Postgres do); on SQLite the write lock serialises claims.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from claas.errors import AdapterNotFound, ClaimLost, FeedbackNotFound, InvalidRequest
from claas.ids import feedback_missing, validate_lora_id
from claas.records import FINISHED, FeedbackRequest, FeedbackStatus, MemoryItem
from claas.store.database import as_ids, record, starts_with
from claas.store.memory import MemoryStore
from claas.store.notify import NOTICE_FINISHED, NOTICE_QUEUED, notify
from claas.store.tables import adapter_versions, adapters, feedback


class FeedbackStore(MemoryStore):
    """The part of `Store` that queues, claims and finishes feedback requests."""

    def enqueue_feedback(
        self, lora_id: str, items: list[dict[str, Any]], training: dict[str, Any]
    ) -> FeedbackRequest:
        """Append a `queued` request; its place in line is its arrival (the `seq` column)."""
        request = FeedbackRequest(
            id=f"fb-{uuid.uuid4().hex}",
            lora_id=validate_lora_id(lora_id),
            status="queued",
            items=items,
            training=training,
            created_at=time.time(),
            started_at=None,
            finished_at=None,
            error=None,
            metrics={},
            version=None,
            coalesced_into=None,
        )
        with self._transaction() as db:
            # The adapter's row lock orders its requests: `seq` is taken and committed in
            # turn, so a claim never sees a later request before an earlier one.
            found = db.execute(
                select(adapters.c.lora_id).where(adapters.c.lora_id == lora_id).with_for_update()
            ).first()
            if found is None:
                raise AdapterNotFound(
                    f"adapter {lora_id} does not exist (was it just deleted?); nothing was queued"
                )
            db.execute(insert(feedback).values(**request.model_dump()))
            notify(db, NOTICE_QUEUED)
        return request

    def get_feedback(self, feedback_id: str) -> FeedbackRequest:
        row = self._one(select(feedback).where(feedback.c.id == feedback_id))
        if row is None:
            raise feedback_missing(feedback_id)
        return record(FeedbackRequest, row)

    def _feedback_filter(
        self, owner: str | None, lora_id: str | None, statuses: Sequence[FeedbackStatus]
    ) -> list[ColumnElement[bool]]:
        """Feedback rows of the adapters `owner` reaches (None: all), of one adapter, with
        some statuses (none given: any)."""
        clauses: list[ColumnElement[bool]] = []
        if owner is not None:
            clauses.append(starts_with(feedback.c.lora_id, f"{owner}/"))
        if lora_id is not None:
            clauses.append(feedback.c.lora_id == validate_lora_id(lora_id))
        if statuses:
            clauses.append(feedback.c.status.in_(list(statuses)))
        return clauses

    def list_feedback(
        self,
        *,
        owner: str | None = None,
        lora_id: str | None = None,
        statuses: Sequence[FeedbackStatus] = (),
        limit: int = 50,
        offset: int = 0,
    ) -> list[FeedbackRequest]:
        """Feedback requests of every adapter `owner` reaches (None: all), or of one adapter,
        newest (last to arrive) first."""
        rows = self._all(
            select(feedback)
            .where(*self._feedback_filter(owner, lora_id, statuses))
            .order_by(feedback.c.seq.desc())  # arrival order; clocks can go back
            .limit(limit)
            .offset(offset)
        )
        return [record(FeedbackRequest, r) for r in rows]

    def count_feedback(
        self,
        *,
        owner: str | None = None,
        lora_id: str | None = None,
        statuses: Sequence[FeedbackStatus] = (),
    ) -> int:
        """How many requests `list_feedback` would page through; ("queued",): the queue's
        depth."""
        return self._count(
            select(func.count())
            .select_from(feedback)
            .where(*self._feedback_filter(owner, lora_id, statuses))
        )

    def claim(
        self, worker: str, lease_seconds: float, max_batch: int, lora_id: str | None = None
    ) -> list[FeedbackRequest]:
        """Claim the next batch to train, as `worker`, for `lease_seconds`; [] if none.

        The batch is the oldest queued requests of one adapter, in arrival order, up to
        `max_batch` and only while they share a training config; the adapter is the one whose
        oldest queued request has waited longest among those with nothing running (`lora_id`:
        only that one). They become `running`, claimed by `worker` until the lease ends. Any
        number of workers may claim at once: an adapter another claim holds is skipped, so one
        adapter never trains two batches at a time and its requests run in arrival order.
        """
        now = time.time()
        with self._transaction() as db:
            busy = select(feedback.c.lora_id).where(feedback.c.status == "running")
            first = func.min(feedback.c.seq)
            candidates = db.execute(
                select(feedback.c.lora_id)
                .where(feedback.c.status == "queued", feedback.c.lora_id.not_in(busy))
                .where(feedback.c.lora_id.in_(select(adapters.c.lora_id)))
                .where(*([feedback.c.lora_id == lora_id] if lora_id is not None else []))
                .group_by(feedback.c.lora_id)
                .order_by(first)
                .limit(32)
            ).all()
            for (candidate,) in candidates:
                # Whoever holds the adapter's row is claiming it now: take the next adapter.
                locked = db.execute(
                    select(adapters.c.lora_id)
                    .where(adapters.c.lora_id == candidate)
                    .with_for_update(skip_locked=True)
                ).first()
                if locked is None:
                    continue
                running = db.execute(  # again, under the lock: a claim may have just committed
                    select(func.count())
                    .select_from(feedback)
                    .where(feedback.c.lora_id == candidate, feedback.c.status == "running")
                ).scalar_one()
                if running:
                    continue
                queued = [
                    record(FeedbackRequest, r)
                    for r in db.execute(
                        select(feedback)
                        .where(feedback.c.lora_id == candidate, feedback.c.status == "queued")
                        .order_by(feedback.c.seq)
                        .limit(max_batch)
                    ).all()
                ]
                if not queued:  # claimed and finished by another worker since the listing
                    continue
                batch = [queued[0]]
                for request in queued[1:]:  # a contiguous run with the same config
                    if request.training != batch[0].training:
                        break
                    batch.append(request)
                ids = [r.id for r in batch]
                db.execute(
                    update(feedback)
                    .where(feedback.c.id.in_(ids))
                    .values(
                        status="running",
                        started_at=now,
                        worker=worker,
                        lease_expires_at=now + lease_seconds,
                    )
                )
                return [
                    r.model_copy(update={"status": "running", "started_at": now}) for r in batch
                ]
        return []

    def extend_lease(self, worker: str, ids: Sequence[str], lease_seconds: float) -> int:
        """The heartbeat: `worker`'s claims on `ids` last `lease_seconds` from now; returns how
        many it still held (fewer than asked: the lease ran out and they were reclaimed)."""
        wanted = as_ids(ids)
        with self._transaction() as db:
            cursor = db.execute(
                update(feedback)
                .where(
                    feedback.c.id.in_(wanted),
                    feedback.c.status == "running",
                    feedback.c.worker == worker,
                )
                .values(lease_expires_at=time.time() + lease_seconds)
            )
            return int(cursor.rowcount)

    def reclaim(self, now: float | None = None, worker: str | None = None) -> int:
        """Requests whose claim ended go back to the queue; returns how many.

        A claim ends when its lease runs out (its worker died or hung), or, with `worker`, when
        it is that worker's (a worker that restarts under its old name). A request left
        `running` without a lease (by a release before leases) counts as ended. Its `seq`
        (arrival order) is unchanged, so it runs before anything newer, and its coalescing is
        undone. A request whose version was already registered (the worker died between
        registering and marking it done) is marked done with that version instead, so it is
        never trained twice.
        """
        now = time.time() if now is None else now
        ended = or_(feedback.c.lease_expires_at.is_(None), feedback.c.lease_expires_at <= now)
        if worker is not None:
            ended = or_(ended, feedback.c.worker == worker)
        leader = func.coalesce(feedback.c.coalesced_into, feedback.c.id)
        registered = (
            select(func.min(adapter_versions.c.version))
            .where(
                adapter_versions.c.lora_id == feedback.c.lora_id,
                adapter_versions.c.feedback_id == leader,
            )
            .scalar_subquery()
        )
        with self._transaction() as db:
            db.execute(
                update(feedback)
                .where(feedback.c.status == "running", ended, registered.is_not(None))
                .values(
                    status="done",
                    finished_at=now,
                    error=None,
                    version=registered,
                    worker=None,
                    lease_expires_at=None,
                )
            )
            cursor = db.execute(
                update(feedback)
                .where(feedback.c.status == "running", ended, registered.is_(None))
                .values(
                    status="queued",
                    started_at=None,
                    coalesced_into=None,
                    worker=None,
                    lease_expires_at=None,
                )
            )
            return int(cursor.rowcount)

    def mark_coalesced(self, feedback_id: str, into: str) -> None:
        """Record that `feedback_id` trains in the same step as the leader `into`.

        A coalesced request then finishes with its leader: the worker passes the whole batch's
        ids to `mark_done` / `mark_failed`.
        """
        with self._transaction() as db:
            leader = self.get_feedback(into)
            follower = self.get_feedback(feedback_id)
            if follower.lora_id != leader.lora_id:
                raise InvalidRequest(
                    f"cannot coalesce {feedback_id} ({follower.lora_id}) into {into} "
                    f"({leader.lora_id}); only requests of one adapter train together"
                )
            db.execute(
                update(feedback).where(feedback.c.id == feedback_id).values(coalesced_into=into)
            )

    def mark_running(
        self,
        ids: str | Sequence[str],
        worker: str | None = None,
        lease_seconds: float | None = None,
    ) -> None:
        """Mark requests running outside `claim`, by `worker` for `lease_seconds` (None: no
        lease, so the next `reclaim` gives them back)."""
        now = time.time()
        lease = None if lease_seconds is None else now + lease_seconds
        self._set_status(ids, "running", started_at=now, worker=worker, lease_expires_at=lease)

    def mark_done(
        self,
        ids: str | Sequence[str],
        version: int,
        metrics: dict[str, Any],
        learned: Sequence[MemoryItem] = (),
        memory_limit: int | None = None,
    ) -> None:
        """Finish the requests (a leader and its coalesced followers) with the version made,
        and remember what they taught in the same transaction (`remember`)."""
        with self._transaction():
            self._set_status(
                ids,
                "done",
                finished_at=time.time(),
                version=version,
                metrics=metrics,
                error=None,
                lease_expires_at=None,
            )
            self.remember(learned, memory_limit)

    def mark_failed(
        self,
        ids: str | Sequence[str],
        error: str,
        metrics: dict[str, Any] | None = None,
        worker: str | None = None,
    ) -> None:
        """Fail the requests. With `worker`, only those it still claims: a request whose claim
        ended belongs to whichever worker took it next (`ClaimLost` if none is left)."""
        wanted = as_ids(ids)
        if worker is not None:
            with self._transaction() as db:
                wanted = list(
                    db.execute(
                        select(feedback.c.id)
                        .where(
                            feedback.c.id.in_(wanted),
                            feedback.c.status == "running",
                            feedback.c.worker == worker,
                        )
                        .with_for_update()
                    ).scalars()
                )
                if not wanted:
                    raise ClaimLost(f"worker {worker} no longer claims {as_ids(ids)}")
                self._mark_failed(wanted, error, metrics)
            return
        self._mark_failed(wanted, error, metrics)

    def _mark_failed(self, ids: list[str], error: str, metrics: dict[str, Any] | None) -> None:
        self._set_status(
            ids,
            "failed",
            finished_at=time.time(),
            version=None,
            error=error,
            metrics=metrics or {},
            lease_expires_at=None,
        )

    def _set_status(self, ids: str | Sequence[str], status: FeedbackStatus, **values: Any) -> None:
        wanted = as_ids(ids)
        if not wanted:
            return
        with self._transaction() as db:
            cursor = db.execute(
                update(feedback).where(feedback.c.id.in_(wanted)).values(status=status, **values)
            )
            if status in FINISHED:
                notify(db, NOTICE_FINISHED)
            if cursor.rowcount != len(wanted):  # all or nothing: the transaction rolls back
                found = set(
                    db.execute(select(feedback.c.id).where(feedback.c.id.in_(wanted))).scalars()
                )
                missing = [i for i in wanted if i not in found]
                raise FeedbackNotFound(
                    f"feedback requests {missing} do not exist (was the adapter deleted?); "
                    "nothing was marked"
                )
