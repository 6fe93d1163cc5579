"""The store's adapters and their versions.

An adapter is one row per `owner/name`, with its LoRA shape and `current_version`, the version
that is served and trained from (None until the first version exists). Versions are numbered 1,
2, 3, … per adapter, never reused, each pointing at the checkpoint paths of its training state
and its sampler weights.

The weights are not here: they live in the checkpoint root. The atomicity rule: a new version's
files are written to a temp dir and renamed into place by the caller *first*; only then is the
version committed here (`add_version`), in one transaction that also moves the adapter's
`current_version` and, for a worker, finishes the requests it trained. A crash therefore never
leaves "latest" pointing at a half-written version.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from claas.errors import AdapterExists, AdapterNotFound, ClaimLost, Conflict, VersionNotFound
from claas.ids import validate_lora_id
from claas.records import Adapter, AdapterVersion, MemoryItem
from claas.store.database import as_ids, record, starts_with
from claas.store.memory import MemoryStore
from claas.store.notify import NOTICE_FINISHED, notify
from claas.store.tables import adapter_versions, adapters, feedback, memory, rollouts


class AdapterStore(MemoryStore):
    """The part of `Store` that creates, versions, rolls back and deletes adapters."""

    def create_adapter(
        self,
        lora_id: str,
        base_model: str,
        rank: int,
        lora_alpha: float,
        target_modules: Sequence[str],
    ) -> Adapter:
        adapter = Adapter(
            lora_id=validate_lora_id(lora_id),
            base_model=base_model,
            rank=rank,
            lora_alpha=lora_alpha,
            target_modules=list(target_modules),
            created_at=time.time(),
            current_version=None,
        )
        try:
            with self._transaction() as db:
                db.execute(insert(adapters).values(**adapter.model_dump()))
        except IntegrityError:
            raise AdapterExists(
                f"adapter {lora_id} already exists; use it, pick another name, or delete it first"
            ) from None
        return adapter

    def get_adapter(self, lora_id: str, *, lock: bool = False) -> Adapter:
        """The adapter; with `lock`, inside a write, its row stays locked until the write ends
        (PostgreSQL; SQLite's write lock covers the whole database already)."""
        validate_lora_id(lora_id)
        query = select(adapters).where(adapters.c.lora_id == lora_id)
        row = self._one(query.with_for_update() if lock else query)
        if row is None:
            raise AdapterNotFound(
                f"adapter {lora_id} does not exist; create it first with POST /v1/adapters "
                "or `claas adapters create`"
            )
        return record(Adapter, row)

    def list_adapters(self, prefix: str = "") -> list[Adapter]:
        """Adapters whose lora_id starts with `prefix`."""
        rows = self._all(
            select(adapters)
            .where(starts_with(adapters.c.lora_id, prefix))
            .order_by(adapters.c.lora_id)
        )
        return [record(Adapter, r) for r in rows]

    def count_adapters(self, owner: str) -> int:
        return self._count(
            select(func.count())
            .select_from(adapters)
            .where(starts_with(adapters.c.lora_id, f"{owner}/"))
        )

    def delete_adapter(self, lora_id: str) -> list[AdapterVersion]:
        """Delete the adapter with its versions, rollouts, feedback requests and memory.

        Returns the versions removed, so the caller can delete their checkpoint files. Its
        rollouts go too: an adapter re-created under the same name must not train on answers
        the deleted one gave.
        """
        with self._transaction() as db:
            self.get_adapter(lora_id, lock=True)  # raises AdapterNotFound
            versions = self.list_versions(lora_id)
            for table in (rollouts, feedback, memory, adapter_versions, adapters):
                db.execute(delete(table).where(table.c.lora_id == lora_id))
        return versions

    # -- versions ---------------------------------------------------------------------------
    def add_version(
        self,
        lora_id: str,
        state_path: str,
        sampler_path: str,
        feedback_id: str | None,
        metrics: dict[str, Any],
        trained_from: Adapter | None = None,
        worker: str | None = None,
        claimed: Sequence[str] = (),
        request_metrics: dict[str, Any] | None = None,
        learned: Sequence[MemoryItem] = (),
        memory_limit: int | None = None,
    ) -> AdapterVersion:
        """Register a version whose files are already in place, and make it current.

        The number is max(existing) + 1, so numbers are never reused, even after a rollback.
        `trained_from` is the adapter as it was when training started: if it was rolled back,
        or deleted and re-created, meanwhile, the result is refused (`Conflict`) rather than
        silently undoing that change. With `worker`, the requests `claimed` (the batch: its
        head `feedback_id` and the requests coalesced with it) must all still be claimed by it,
        and they are marked `done` with the new version, their `request_metrics`, and what they
        taught (`learned`, kept as in `remember`) in the same transaction: a worker whose lease
        ran out (another one trains the requests now) is refused (`ClaimLost`), so a request is
        trained into exactly one version, and a request is never seen done without its
        metrics.
        """
        with self._transaction() as db:
            adapter = self.get_adapter(lora_id, lock=True)
            if trained_from is not None and not adapter.unchanged_since(trained_from):
                raise Conflict(
                    f"adapter {lora_id} changed while this request trained (rolled back, or "
                    "deleted and re-created); its result was discarded. Send the feedback again"
                )
            latest = db.execute(
                select(func.coalesce(func.max(adapter_versions.c.version), 0)).where(
                    adapter_versions.c.lora_id == lora_id
                )
            ).scalar_one()
            version = AdapterVersion(
                lora_id=lora_id,
                version=int(latest) + 1,
                state_path=state_path,
                sampler_path=sampler_path,
                created_at=time.time(),
                feedback_id=feedback_id,
                metrics=metrics,
            )
            db.execute(insert(adapter_versions).values(**version.model_dump()))
            db.execute(
                update(adapters)
                .where(adapters.c.lora_id == lora_id)
                .values(current_version=version.version)
            )
            if worker is not None:
                batch = as_ids(claimed) or as_ids(feedback_id or [])
                finished = db.execute(
                    update(feedback)
                    .where(
                        feedback.c.id.in_(batch),
                        feedback.c.status == "running",
                        feedback.c.worker == worker,
                    )
                    .values(
                        status="done",
                        version=version.version,
                        finished_at=version.created_at,
                        metrics=request_metrics or {},
                        error=None,
                        lease_expires_at=None,
                    )
                )
                if finished.rowcount != len(batch):  # the transaction rolls back: no version
                    raise ClaimLost(
                        f"worker {worker} lost its claim on {batch} (its lease ended, and the "
                        "requests went back to the queue); its result was discarded"
                    )
                self.remember(learned, memory_limit)
                notify(db, NOTICE_FINISHED)
        return version

    def list_versions(self, lora_id: str) -> list[AdapterVersion]:
        """All versions of the adapter, oldest first."""
        with self._reading():
            self.get_adapter(lora_id)
            rows = self._all(
                select(adapter_versions)
                .where(adapter_versions.c.lora_id == lora_id)
                .order_by(adapter_versions.c.version)
            )
        return [record(AdapterVersion, r) for r in rows]

    def checkpoint_paths(self) -> set[str]:
        """Every checkpoint path a version references: what a sweep must keep."""
        rows = self._all(select(adapter_versions.c.state_path, adapter_versions.c.sampler_path))
        return {str(row.state_path) for row in rows} | {str(row.sampler_path) for row in rows}

    def get_version(self, lora_id: str, version: int) -> AdapterVersion:
        self.get_adapter(lora_id)
        row = self._one(
            select(adapter_versions).where(
                adapter_versions.c.lora_id == lora_id, adapter_versions.c.version == version
            )
        )
        if row is None:
            existing = [v.version for v in self.list_versions(lora_id)]
            raise VersionNotFound(
                f"adapter {lora_id} has no version {version}; its versions are {existing}"
            )
        return record(AdapterVersion, row)

    def latest_version(self, lora_id: str) -> AdapterVersion | None:
        """The current version: the one served and trained from (a rollback moves it)."""
        adapter = self.get_adapter(lora_id)
        if adapter.current_version is None:
            return None
        return self.get_version(lora_id, adapter.current_version)

    def rollback(self, lora_id: str, version: int) -> Adapter:
        """Serve and train from an existing `version` again; later versions are kept.

        Lessons last taught by the requests that made later versions are forgotten with them,
        so replay does not teach again what the rollback undid."""
        with self._transaction() as db:
            self.get_adapter(lora_id, lock=True)
            self.get_version(lora_id, version)
            later = select(feedback.c.id).join(
                adapter_versions,
                and_(
                    adapter_versions.c.lora_id == feedback.c.lora_id,
                    adapter_versions.c.feedback_id
                    == func.coalesce(feedback.c.coalesced_into, feedback.c.id),
                ),
            )
            later = later.where(feedback.c.lora_id == lora_id, adapter_versions.c.version > version)
            db.execute(
                delete(memory).where(memory.c.lora_id == lora_id, memory.c.feedback_id.in_(later))
            )
            db.execute(
                update(adapters)
                .where(adapters.c.lora_id == lora_id)
                .values(current_version=version)
            )
            return self.get_adapter(lora_id)
