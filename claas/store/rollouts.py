"""The store's rollouts: what the sampler produced, token for token, for feedback to name.

A rollout keeps the behavior log-probs that the importance ratios of a later training step need.
Feedback names it by id (the completion id) or by adapter and the `text_hash`es of its prompt
and response. It expires `expires_at` (None: never); an expired rollout is not found, and the
purge deletes it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from sqlalchemy import delete, insert, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from claas.errors import Conflict, RolloutNotFound
from claas.ids import rollout_missing, validate_lora_id
from claas.records import Rollout
from claas.store.database import Database, as_ids, record
from claas.store.tables import rollouts


def _unexpired() -> ColumnElement[bool]:
    return or_(rollouts.c.expires_at.is_(None), rollouts.c.expires_at > time.time())


class RolloutStore(Database):
    """The part of `Store` that records, finds and purges rollouts."""

    def add_rollout(self, rollout: Rollout) -> Rollout:
        """Record a sampled completion; its `id` is the caller's (e.g. "chatcmpl-…")."""
        if rollout.lora_id is not None:
            validate_lora_id(rollout.lora_id)
        try:
            with self._transaction() as db:
                db.execute(insert(rollouts).values(**rollout.model_dump()))
        except IntegrityError:
            raise Conflict(
                f"rollout {rollout.id!r} already exists; give each completion a new id"
            ) from None
        return rollout

    def get_rollout(self, rollout_id: str) -> Rollout:
        """The rollout, unless it expired (`expires_at <= now`) or never existed."""
        row = self._one(select(rollouts).where(rollouts.c.id == rollout_id, _unexpired()))
        if row is None:
            raise rollout_missing(rollout_id)
        return record(Rollout, row)

    def find_rollout(self, lora_id: str, prompt_hash: str, response_hash: str) -> Rollout:
        """The newest unexpired rollout of the adapter with these `text_hash`es."""
        validate_lora_id(lora_id)
        row = self._one(
            select(rollouts)
            .where(
                rollouts.c.lora_id == lora_id,
                rollouts.c.prompt_hash == prompt_hash,
                rollouts.c.response_hash == response_hash,
                _unexpired(),
            )
            .order_by(rollouts.c.created_at.desc(), rollouts.c.id.desc())
            .limit(1)
        )
        if row is None:
            raise RolloutNotFound(
                f"no unexpired rollout of {lora_id} has that prompt and response text (it expired "
                "or never existed); chat again and give feedback on the new completion id"
            )
        return record(Rollout, row)

    def purge_expired_rollouts(self, now: float | None = None) -> int:
        """Delete rollouts with `expires_at <= now`; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                delete(rollouts).where(
                    rollouts.c.expires_at.is_not(None),
                    rollouts.c.expires_at <= (time.time() if now is None else now),
                )
            )
            return int(cursor.rowcount)

    def rollouts_by_id(self, ids: Sequence[str]) -> dict[str, Rollout]:
        """The rollouts still stored under `ids`, expired or not: what a feedback request was
        about stays readable until a purge deletes it."""
        wanted = as_ids(ids)
        if not wanted:
            return {}
        rows = self._all(select(rollouts).where(rollouts.c.id.in_(wanted)))
        return {str(r.id): record(Rollout, r) for r in rows}
