"""The service seam: what the engine, chat and adapters ask of a training service.

Both services implement it: the in-process `claas.services.local` and hosted Tinker
(`tinker.ServiceClient`). The Protocols below grow to cover exactly the calls claas makes.
"""

from __future__ import annotations


class StopGeneration(Exception):
    """Raised by an `on_token` callback to end generation early (a client went away)."""
