"""The durable state of claas, in SQLite (the embedded default) or PostgreSQL (shared by
API replicas and workers on other machines), through SQLAlchemy Core; Alembic migrates both.

It holds five kinds of record, each kept by one part of `Store`:
- **adapters** and their numbered **versions** (`claas.store.adapters`): one row per
  `owner/name` with the version that is served and trained from; versions 1, 2, 3, … never
  reused, each pointing at the checkpoint paths of its training state and sampler weights;
- **rollouts** (`claas.store.rollouts`): what the sampler produced, token for token, with the
  behavior log-probs that the importance ratios of a later training step need;
- **feedback requests** (`claas.store.queue`): the durable training queue, queued → running →
  done | failed in arrival order, claimed by workers under leases their heartbeat extends;
- **memory** (`claas.store.memory`): what each adapter was taught, replayed by later requests.

`claas.store.database` opens and migrates the database (`claas.store.migrate`) and gives the
parts their transactions; `claas.store.notify` tells other processes on PostgreSQL that feedback
was queued or finished. Adapter weights are not here: they live in the checkpoint root, and a
version is committed only once its files are in place, so a crash never leaves "latest" pointing
at a half-written version.

Every write is one short transaction. On SQLite it is `BEGIN IMMEDIATE`, which serialises
writers, processes included; on PostgreSQL the rows a decision reads are locked
(`SELECT … FOR UPDATE`, and `SKIP LOCKED` for claims, as job queues on Postgres do). A write
inside another write (on the same thread) joins it. The methods block: callers on an event loop
run them in a thread (`asyncio.to_thread`).

    with Store(Path("~/.local/share/claas/claas.db").expanduser()) as store:  # or a URL:
        # Store("postgresql+psycopg://claas@db/claas")
        store.create_adapter("alice/assistant", "SmolLM2-135M-Instruct", 32, 32.0, ["q_proj"])
        store.add_version("alice/assistant", "local://r/weights/v1", "local://r/sw/v1", None, {})
"""

from __future__ import annotations

from claas.store.adapters import AdapterStore
from claas.store.database import database_url
from claas.store.migrate import LEGACY_SQLITE_VERSION, head_revision
from claas.store.notify import CHANNEL, NOTICE_FINISHED, NOTICE_QUEUED, Notices
from claas.store.queue import FeedbackStore
from claas.store.rollouts import RolloutStore


class Store(AdapterStore, FeedbackStore, RolloutStore, Notices):
    """Adapters, versions, rollouts, the feedback queue and memory, in SQLite or PostgreSQL."""


__all__ = [
    "CHANNEL",
    "LEGACY_SQLITE_VERSION",
    "NOTICE_FINISHED",
    "NOTICE_QUEUED",
    "Store",
    "database_url",
    "head_revision",
]
