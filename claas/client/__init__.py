"""A typed Python client for what an OpenAI client does not cover: adapters, feedback, health.

Chat goes through any OpenAI client (`Client.openai()` returns one set up for this server);
this client manages the adapters that chat is served by and sends the feedback that trains them.
The whole loop, against `$CLAAS_URL` (default http://127.0.0.1:8000) with `$CLAAS_API_KEY`:

    from claas.client import Client, FeedbackItem

    with Client() as claas, claas.openai() as chat:  # both closed at the end of the block
        claas.adapters.create("alice/assistant")
        ask = [{"role": "user", "content": "Explain how a rainbow forms."}]
        first = chat.chat.completions.create(model="alice/assistant", messages=ask, max_tokens=64)
        done = claas.feedback.send_and_wait(
            FeedbackItem(completion_id=first.id, feedback="Way too long. One short sentence.")
        )
        print(f"{done.lora_id} is now at version {done.version}")
        again = chat.chat.completions.create(model="alice/assistant", messages=ask, max_tokens=64)
        print(again.choices[0].message.content)  # served by the new version

`AsyncClient` has the same methods, to be awaited. An error answer of the server raises a
`ClaasAPIError` subclass chosen by its status, carrying the server's message (which says what to
do next); a wait that runs out raises `FeedbackTimeout`; a server that cannot be reached raises
httpx's `TransportError`. `Client.score` reads the log-probability of a given answer.

The client imports neither torch nor the server, only the foundation modules `claas.errors`,
`claas.ids` and `claas.records` (plain pydantic), so a program that only talks to a server
loads it in a fraction of a second. Its parts: `models` (what is sent and answered), `errors`,
`calls` (each call as data), `sync` (`Client`) and `aio` (`AsyncClient`).
"""

from claas.client.aio import AsyncAdaptersAPI, AsyncClient, AsyncFeedbackAPI
from claas.client.calls import DEFAULT_URL
from claas.client.errors import (
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    ClaasAPIError,
    ConflictError,
    FeedbackTimeout,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnprocessableEntityError,
)
from claas.client.models import (
    AdapterDeleted,
    AdapterDetail,
    FeedbackAccepted,
    FeedbackItem,
    FeedbackView,
    Health,
    MemoryForgotten,
    MemoryItem,
    Score,
)
from claas.client.sync import AdaptersAPI, Client, FeedbackAPI
from claas.records import Adapter, AdapterVersion

__all__ = [
    "DEFAULT_URL",
    "Adapter",
    "AdapterDeleted",
    "AdapterDetail",
    "AdapterVersion",
    "AdaptersAPI",
    "AsyncAdaptersAPI",
    "AsyncClient",
    "AsyncFeedbackAPI",
    "AuthenticationError",
    "BadGatewayError",
    "BadRequestError",
    "ClaasAPIError",
    "Client",
    "ConflictError",
    "FeedbackAPI",
    "FeedbackAccepted",
    "FeedbackItem",
    "FeedbackTimeout",
    "FeedbackView",
    "Health",
    "MemoryForgotten",
    "MemoryItem",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTooLargeError",
    "Score",
    "ServiceUnavailableError",
    "UnprocessableEntityError",
]
