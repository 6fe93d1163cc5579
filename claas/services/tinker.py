"""Hosted Tinker: the distributed training service, once a user outgrows one machine.

The SDPO engine takes a real `tinker.ServiceClient` exactly as it takes the local service. This
module only builds one from claas settings; the SDK does the rest. Construction is lazy (no
network until the first call), so it is safe at start-up.

    service = build_service_client()          # reads CLAAS_TINKER_API_KEY or TINKER_API_KEY
    engine = SDPOEngine(service, store, base_model="Qwen/Qwen3-8B", max_context=32768)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import tinker

from claas.errors import InvalidRequest

API_KEY_VARIABLES = ("CLAAS_TINKER_API_KEY", "TINKER_API_KEY")


def tinker_api_key(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    for name in API_KEY_VARIABLES:
        if environ.get(name):
            return environ[name]
    raise InvalidRequest(
        "the tinker service needs an API key: set CLAAS_TINKER_API_KEY or TINKER_API_KEY "
        "(from the Tinker console), or run with --service local"
    )


def build_service_client(
    api_key: str | None = None,
    base_url: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tinker.ServiceClient:
    """A real `tinker.ServiceClient` for the engine."""
    return tinker.ServiceClient(
        api_key=api_key or tinker_api_key(environ),
        base_url=base_url,
        display_name="claas",
    )
