"""What `claas.client` raises: the server's error answers as typed exceptions, and a wait that
ran out.

An error answer (`{"error": {"message", "type", "code"}}`) becomes a `ClaasAPIError` subclass
chosen by its HTTP status (`api_error`), carrying the server's message, which says what to do
next. These are client-side exceptions: the server's domain errors (`claas.errors`) are what
it raised, these are what a caller of the HTTP API catches. A server that cannot be reached
raises httpx's `TransportError`, as httpx does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from claas.client.models import FeedbackView


class ClaasAPIError(Exception):
    """An error answer of the server: `{"error": {"message", "type", "code"}}` as an exception.

    `status` is the HTTP status, `type` the server's error class (e.g. `AdapterNotFound`),
    `message` the server's own words, and `param` the field at fault when the server names one.
    """

    def __init__(self, status: int, type: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message
        self.param = param


class BadRequestError(ClaasAPIError):
    """400: the body could not be read, or asks for what the server does not do (`param`)."""


class RequestTooLargeError(ClaasAPIError):
    """413: the body is over the server's limit."""


class BadGatewayError(ClaasAPIError):
    """502: the server's inference backend (vLLM) answered with an error."""


class AuthenticationError(ClaasAPIError):
    """401: no API key, or one the server does not know."""


class PermissionDeniedError(ClaasAPIError):
    """403: the key does not reach this adapter's owner, or the owner is at a quota."""


class NotFoundError(ClaasAPIError):
    """404: no such adapter, version, completion or feedback request (for this key)."""


class ConflictError(ClaasAPIError):
    """409: the request conflicts with the current state (the adapter exists already, …)."""


class UnprocessableEntityError(ClaasAPIError):
    """422: a field is invalid; the message names it."""


class RateLimitError(ClaasAPIError):
    """429: the owner has too much feedback pending; retry after `retry_after` seconds."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        param: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status, type, message, param)
        self.retry_after = retry_after


class ServiceUnavailableError(ClaasAPIError):
    """503: the server is not ready, or its inference backend cannot be reached."""


_ERROR_CLASSES: dict[int, type[ClaasAPIError]] = {
    400: BadRequestError,
    413: RequestTooLargeError,
    502: BadGatewayError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    422: UnprocessableEntityError,
    503: ServiceUnavailableError,
}


class FeedbackTimeout(TimeoutError):
    """A wait for a feedback request ran out before it was trained; `feedback` is its status then.

    The request stays queued and is still trained: wait again, or read its status later.
    """

    def __init__(self, feedback: FeedbackView, waited: float) -> None:
        super().__init__(
            f"feedback request {feedback.feedback_id} is still {feedback.status} after "
            f"{waited:g} s; it will still be trained: wait again with a longer timeout, or read "
            "its status later"
        )
        self.feedback = feedback


def api_error(response: httpx.Response) -> ClaasAPIError:
    """The typed error for an error answer, with the server's message when the body has one."""
    try:
        detail = response.json()["error"]
        message, kind, param = str(detail["message"]), str(detail["type"]), detail.get("param")
    except (ValueError, KeyError, TypeError):  # not claas's error body: a proxy, a crash page
        message = response.text.strip() or response.reason_phrase
        kind, param = "HTTPError", None
    param = None if param is None else str(param)
    status = response.status_code
    if status == 429:
        return RateLimitError(
            status, kind, message, param, _seconds(response.headers.get("retry-after"))
        )
    return _ERROR_CLASSES.get(status, ClaasAPIError)(status, kind, message, param)


def _seconds(header: str | None) -> float | None:
    """`Retry-After` in seconds; None when absent or given as an HTTP date."""
    try:
        return float(header) if header is not None else None
    except ValueError:
        return None
