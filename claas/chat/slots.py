"""Per-owner limits on running generations: one client must not be able to tie up the decoder
with work it starts and abandons (CLAAS_MAX_CONCURRENT_GENERATIONS_PER_OWNER).

    slot = chat.generations.take(owner)  # TooManyRequests (429) at the limit
    with slot:
        ...  # generate
"""

from __future__ import annotations

import threading

from claas.errors import TooManyRequests


class GenerationSlot:
    """One generation held against its owner's limit; `release` (or leaving the `with`) frees
    it, once, however often it is called."""

    def __init__(self, slots: GenerationSlots, owner: str) -> None:
        self._slots, self.owner = slots, owner
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots._release(self.owner)

    def __enter__(self) -> GenerationSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class GenerationSlots:
    """How many generations each owner has running: at most `limit` at once (None: no limit).
    One client must not be able to tie up the decoder with work it starts and abandons."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self._running: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, owner: str) -> GenerationSlot:
        """A slot for `owner`'s next generation; TooManyRequests (429) at the limit."""
        with self._lock:
            running = self._running.get(owner, 0)
            if self.limit is not None and running >= self.limit:
                raise TooManyRequests(
                    f"{owner or 'this caller'!r} has {running} generations running, the most "
                    "this server runs at once for one owner "
                    "(CLAAS_MAX_CONCURRENT_GENERATIONS_PER_OWNER); wait for one to finish and "
                    "retry",
                    headers={"Retry-After": "1"},
                )
            self._running[owner] = running + 1
        return GenerationSlot(self, owner)

    def running(self, owner: str) -> int:
        return self._running.get(owner, 0)

    def _release(self, owner: str) -> None:
        with self._lock:
            left = self._running[owner] - 1
            if left:
                self._running[owner] = left
            else:
                del self._running[owner]
