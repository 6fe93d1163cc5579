"""Who is calling: API keys to owners, compared in constant time.

`CLAAS_API_KEYS` maps each key to an owner, whose key reaches only adapters named `owner/...`;
`CLAAS_ADMIN_KEY` reaches every owner. With neither set the server is a single local user (and
`claas serve` binds loopback only). The API's Bearer auth and the dashboard's login both resolve
keys here, so the rule is written once.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from claas.errors import ClaasError
from claas.ids import check_owner, visible_to
from claas.settings import Settings

# The dashboard's cookie: a browser's key, set by its login form (HttpOnly, SameSite=Strict).
DASHBOARD_COOKIE = "claas_dashboard_key"


class Unauthorized(ClaasError):
    status_code = 401


@dataclass(frozen=True)
class Principal:
    owner: str | None  # None: the admin (or no keys configured: a single local user)

    def check(self, lora_id: str) -> None:
        """403 for an adapter the caller named but may not reach."""
        check_owner(self.owner, lora_id)

    def sees(self, lora_id: str | None) -> bool:
        """Whether a record of this adapter exists for the caller (else: answer 404)."""
        return visible_to(self.owner, lora_id)


def keys_configured(settings: Settings) -> bool:
    return bool(settings.api_keys) or settings.admin_key is not None


def principal_for_key(settings: Settings, key: str) -> Principal | None:
    """The caller a key stands for, or None for an unknown key.

    Every known key is compared, each in constant time, so the answer's timing tells nothing
    about any of them. The admin key wins over an owner's key of the same value.
    """
    given = key.encode("utf-8", "surrogateescape")
    owners = [owner for known, owner in settings.api_keys.items() if _same(given, known)]
    if settings.admin_key is not None and _same(given, settings.admin_key):
        return Principal(owner=None)
    return Principal(owner=owners[0]) if owners else None


def bearer_key(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (possibly empty); None for no such
    header."""
    if not authorization.startswith("Bearer "):
        return None
    return authorization.removeprefix("Bearer ").strip()


def bearer_principal(settings: Settings, authorization: str) -> Principal:
    """The caller of an API request from its `Authorization` header; 401 if none or unknown."""
    if not keys_configured(settings):
        return Principal(owner=None)
    key = bearer_key(authorization)
    if not key:
        raise Unauthorized("missing API key; send 'Authorization: Bearer <key>'")
    principal = principal_for_key(settings, key)
    if principal is None:
        raise Unauthorized("unknown API key; check the key, or ask the operator for one")
    return principal


def _same(given: bytes, known: str) -> bool:
    return hmac.compare_digest(given, known.encode("utf-8"))
