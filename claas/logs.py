"""Structured logs: every record as one JSON object per line, through the standard `logging`.

claas's loggers live under `claas.` (`claas.http`: one line per HTTP request; `claas.feedback`:
one line per finished feedback request and the rollout purges; `claas.serve`: start-up and
shutdown). A record's `extra` fields become keys of its line, next to `ts`, `level`, `logger` and
`message`; a record logged with an exception carries `exception` and `traceback`; a record
logged while an HTTP request is handled carries that request's `request_id`.

    configure_logging("info")  # once per process, before uvicorn.Config
    config = uvicorn.Config(app, host=host, port=port, **uvicorn_logging("info"))

uvicorn's own records (start-up, errors) then go through the same formatter, and its access log
is off: the `claas.http` line is the one line per request.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import sys
from contextvars import ContextVar
from typing import Any, Literal, TextIO

LogLevel = Literal["debug", "info", "warning", "error"]
_LEVELS: dict[LogLevel, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# The id of the HTTP request being handled (set by the API's request-log middleware).
current_request_id: ContextVar[str | None] = ContextVar("claas_request_id", default=None)

# What every LogRecord has; anything else on a record came from `extra` and is logged as a key.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_DROPPED = frozenset({"color_message"})  # uvicorn's ANSI-coloured copy of its message


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (UTC, ISO 8601), level, logger, message, then extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _DROPPED and not key.startswith("_"):
                entry[key] = value
        request_id = current_request_id.get()
        if request_id is not None:
            entry.setdefault("request_id", request_id)
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            entry["exception"] = f"{type(error).__name__}: {error}"
            entry["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return json.dumps(entry, default=str, allow_nan=False)
        except ValueError:  # a NaN or infinite metric: strict JSON has no such number
            return json.dumps(_finite(entry), default=str)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan", "inf", "-inf"
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


class _ClaasHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs (found again and replaced on a second call)."""


def configure_logging(level: LogLevel = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send every record to `stream` (default stderr) as JSON lines; returns the handler.

    claas's and uvicorn's loggers log at `level`; other libraries only at warning or above (or
    `level` if higher), and Python warnings (`warnings.warn`) become records too. uvicorn's
    access log is silenced: claas logs each request itself. Call it again to change the level
    or the stream: the previous handler is replaced.
    """
    number = _LEVELS[level]
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _ClaasHandler)]:
        root.removeHandler(old)
    handler = _ClaasHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root.addHandler(handler)
    root.setLevel(max(number, logging.WARNING))
    logging.getLogger("claas").setLevel(number)
    for name in ("uvicorn", "uvicorn.error"):  # undo a uvicorn dictConfig: reach our handler
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(number)
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    logging.captureWarnings(True)
    return handler


def uvicorn_logging(level: LogLevel = "info") -> dict[str, Any]:
    """`uvicorn.Config` arguments that leave logging to `configure_logging`: no dictConfig of
    uvicorn's own, its records at `level`, its access log off."""
    return {"log_config": None, "log_level": level, "access_log": False}
