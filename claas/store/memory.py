"""The store's memory: what each adapter was taught, replayed by its later requests.

One item per prompt and feedback text (the conversation up to the answer, its prompt tokens, the
feedback and example; never the answer), keyed by `claas.sdpo.config.lesson_key`: the same
lesson taught again is one item, with the newest example. It is written with the request that
taught it (`mark_done`, `add_version`), at most `limit` items per adapter, the oldest forgotten
first.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from claas.ids import memory_missing, text_hash, validate_lora_id
from claas.records import MemoryItem
from claas.sdpo.config import lesson_key
from claas.store.database import Database, record
from claas.store.tables import memory


class MemoryStore(Database):
    """The part of `Store` that keeps, lists and forgets adapters' memory."""

    def remember(self, items: Sequence[MemoryItem], limit: int | None = None) -> None:
        """Keep taught lessons. The same prompt taught with the same feedback again is one item
        (its example, request and time are the newest); beyond `limit` items per adapter the
        oldest are forgotten."""
        if not items:
            return
        dialect = postgresql if self.backend == "postgresql" else sqlite
        with self._transaction() as db:
            for item in items:
                validate_lora_id(item.lora_id)
                row = item.model_dump() | {
                    "lesson_hash": text_hash(
                        lesson_key(item.prompt_format, item.messages, item.feedback)
                    )
                }
                statement = dialect.insert(memory).values(**row)
                db.execute(
                    statement.on_conflict_do_update(
                        index_elements=["lora_id", "lesson_hash"],
                        set_={
                            "feedback_id": statement.excluded.feedback_id,
                            "example": statement.excluded.example,
                            "created_at": statement.excluded.created_at,
                        },
                    )
                )
            if limit is not None:
                for lora_id in {item.lora_id for item in items}:
                    kept = (
                        select(memory.c.id)
                        .where(memory.c.lora_id == lora_id)
                        .order_by(memory.c.created_at.desc(), memory.c.id.desc())
                        .limit(limit)
                    )
                    db.execute(
                        delete(memory).where(memory.c.lora_id == lora_id, memory.c.id.not_in(kept))
                    )

    def memory(self, lora_id: str, limit: int | None = None, offset: int = 0) -> list[MemoryItem]:
        """The adapter's memory, newest first (`limit` None: all of it)."""
        validate_lora_id(lora_id)
        rows = self._all(
            select(memory)
            .where(memory.c.lora_id == lora_id)
            .order_by(memory.c.created_at.desc(), memory.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        return [record(MemoryItem, r) for r in rows]

    def count_memory(self, lora_id: str) -> int:
        return self._count(
            select(func.count()).select_from(memory).where(memory.c.lora_id == lora_id)
        )

    def forget(self, lora_id: str, memory_id: str | None = None) -> int:
        """Delete one memory item of the adapter (MemoryNotFound if it has none by that id), or
        with `memory_id` None all of them; returns how many."""
        validate_lora_id(lora_id)
        condition = memory.c.lora_id == lora_id
        if memory_id is not None:
            condition = and_(condition, memory.c.id == memory_id)
        with self._transaction() as db:
            removed = int(db.execute(delete(memory).where(condition)).rowcount)
        if memory_id is not None and removed == 0:
            raise memory_missing(memory_id)
        return removed
