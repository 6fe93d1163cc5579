"""Typed domain errors.

Every layer raises these; the API maps each class to one HTTP status in one place. A message always
says what went wrong *and* what the user should do next.
"""


class ClaasError(Exception):
    """Base class of every claas domain error.

    `headers` are sent with the HTTP answer (for example `Retry-After` on a 429); `param` names
    the request field at fault, as OpenAI's errors do.
    """

    status_code = 500

    def __init__(
        self, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.param = param


class InvalidRequest(ClaasError):
    """Input that can never succeed as sent (bad shapes, bad ids, bad config)."""

    status_code = 422


class UnsupportedParameter(ClaasError):
    """An OpenAI request field this server cannot honour; refused, never silently ignored."""

    status_code = 400


class InvalidLoraId(InvalidRequest):
    """A `lora_id` that is not `owner/name` with the allowed characters."""


class InvalidFeedback(InvalidRequest):
    """A feedback request that cannot be trained on."""


class ContextTooLong(InvalidRequest):
    """A prompt (student or teacher) that does not fit the model's context window."""


class Forbidden(ClaasError):
    """The caller's API key does not reach the adapter it named."""

    status_code = 403


class QuotaExceeded(Forbidden):
    """An owner is at a limit the operator set (adapters per owner)."""


class TooManyRequests(ClaasError):
    """An owner has too much work queued; retry after the `Retry-After` seconds."""

    status_code = 429


class NotFound(ClaasError):
    status_code = 404


class AdapterNotFound(NotFound):
    pass


class VersionNotFound(NotFound):
    pass


class RolloutNotFound(NotFound):
    pass


class FeedbackNotFound(NotFound):
    pass


class MemoryNotFound(NotFound):
    pass


class CheckpointNotFound(NotFound):
    """A checkpoint path that does not exist or lies outside the storage dir."""


class ModelNotFound(NotFound):
    """A configured model that is not installed locally."""


class Conflict(ClaasError):
    status_code = 409


class AdapterExists(Conflict):
    pass


class ClaimLost(Conflict):
    """A worker's lease on a feedback batch ended before it registered the result: another
    worker trains the batch now, and this result is discarded."""


class NothingToTrain(Conflict):
    """Feedback on a rollout that came from the base model, which has no adapter to train."""


class TrainingFailed(ClaasError):
    status_code = 500


class DatabaseUnavailable(ClaasError):
    """The database did not answer (down, restarting, locked too long); nothing was changed.
    Retry after the `Retry-After` seconds."""

    status_code = 503


class ServiceClosed(ClaasError):
    """The service is shutting down and takes no new work; nothing was queued. Retry after the
    `Retry-After` seconds, when the server (or another replica) is back."""

    status_code = 503

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class IncompatibleDatabase(ClaasError):
    """A database written by a newer claas, whose schema this version does not know."""

    status_code = 500
