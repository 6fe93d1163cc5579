"""The durable feedback queue: from a feedback request to a new adapter version.

The second half of the data flow (docs/architecture.md). A request names rollouts (by
completion id, or by adapter + prompt text + response text) and carries the user's feedback. It
is validated completely before anything is queued (`claas.feedback.items`), then written to the
store as `queued`, so it survives a restart; a claim whose worker died goes back to the queue.

Per adapter, requests run strictly in arrival order, one at a time. Requests for the same adapter
and training config that queued up while a step was running are coalesced into one batch (up to
`max_coalesce`), which is reported on each of them as `coalesced_into`. A finished request has
already registered its version in the store, so the next chat is served by it: the engine
returns the trained checkpoint, and `train_and_register` makes it the adapter's next version
(`claas.feedback.training`). Workers claim batches under leases (`claas.feedback.worker`).

**Memory.** When a request has trained, what it taught (each sample's conversation up to the
answer, its feedback and example) is kept as the adapter's memory, in the same transaction that
marks it done (at most `memory_items` per adapter, the oldest forgotten first). Each later batch
(one request, or the requests coalesced with it) re-teaches `TrainingConfig.replay` items of it,
chosen by `choose_replay`, on fresh answers from the version being trained, each with its own
feedback in the teacher's prompt: on-policy replay, so a new preference does not push out what
earlier feedback taught (`claas.feedback.memory`). Memory is deleted with its adapter, what later
versions taught is forgotten when the adapter is rolled back, and users list and forget items
through the API.

    queue = FeedbackQueue(store, engine, max_coalesce=8, purge_interval=600)
    queue.start()  # and, every purge_interval seconds, expired rollouts are purged
    request = await queue.admit(items, owner=None)  # None: no owner scoping (the admin)
    done = await queue.wait(request.id)
"""

from claas.feedback.items import FeedbackItem, ResolvedFeedback
from claas.feedback.memory import choose_replay
from claas.feedback.queue import FeedbackQueue
from claas.feedback.training import train_and_register
from claas.feedback.worker import default_worker_name

__all__ = [
    "FeedbackItem",
    "FeedbackQueue",
    "ResolvedFeedback",
    "choose_replay",
    "default_worker_name",
    "train_and_register",
]
