"""The adapter's memory, as the feedback queue uses it: what a batch taught is kept, and each
later batch re-teaches some of it (on-policy replay, so a new preference does not push out what
earlier feedback taught).

The store keeps the items (`claas.store.memory`); this module decides what a trained batch
adds (`remembered`) and which items a batch replays (`choose_replay`, `replay_for`).
"""

from __future__ import annotations

import itertools
import random
import time
import uuid
from collections.abc import Sequence

from claas.records import FeedbackRequest, MemoryItem
from claas.sdpo.config import FeedbackSample, Lesson, ReplayChoice, TrainingConfig, lesson_key
from claas.store import Store


def remembered(
    batch: Sequence[tuple[FeedbackRequest, Sequence[FeedbackSample]]],
) -> list[MemoryItem]:
    """What a trained batch taught, one memory item per sample: its conversation up to the
    answer, feedback and example (never the answer), under the request that taught it."""
    return [
        MemoryItem(
            id=f"mem-{uuid.uuid4().hex}",
            feedback_id=request.id,
            created_at=time.time(),
            **sample.model_dump(include=set(Lesson.model_fields)),
        )
        for request, samples in batch
        for sample in samples
    ]


def replay_for(
    store: Store, head: FeedbackRequest, samples: Sequence[FeedbackSample], config: TrainingConfig
) -> list[Lesson]:
    """The memory items a batch re-teaches (`choose_replay`), seeded by its head request."""
    if not config.replay:
        return []
    memory = store.memory(head.lora_id)
    chosen = choose_replay(
        memory, samples, config.replay, config.replay_choice, random.Random(head.id)
    )
    return [
        Lesson.model_validate(item.model_dump(include=set(Lesson.model_fields))) for item in chosen
    ]


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
