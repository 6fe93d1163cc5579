"""Training services: in-process `local` and hosted Tinker, both with Tinker's client API."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any


async def delete_checkpoints(service: Any, paths: Sequence[str]) -> None:
    """Best-effort removal of checkpoints through the service's `RestClient`.

    Used to clean up after a failed request: a missing file must not stop the rest, and the
    caller's original error matters more than a cleanup error.
    """
    if not paths:
        return
    rest = service.create_rest_client()
    for path in paths:
        with contextlib.suppress(Exception):
            await rest.delete_checkpoint_from_tinker_path(path)
