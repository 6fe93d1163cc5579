"""Structured logs and the scheduled purge of expired rollouts, against a real server.

Each test reads the JSON lines a real server writes (claas's `JsonFormatter` on a handler of its
own), parses every one of them with a strict JSON parser, and asserts on their fields: one
`claas.http` line per request with its status and owner and never a key; one `claas.feedback`
line per finished feedback request with its metrics and timings, or its error; an unhandled
exception as one error line with its traceback. The purge tests watch the rows of the real
SQLite file: an expired rollout disappears while the server runs, also after a purge failed.

A log line is written just after its response is sent, so a test waits for the line it expects
(`LogCapture.wait_for`, bounded by GUARD so a missing line fails instead of hanging).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import logging.config
import sqlite3
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import uvicorn
from serving import (
    ADMIN,
    ADMIN_KEY,
    ALICE,
    BOB,
    OWNER_KEYS,
    LiveServer,
    bearer,
    chat,
    create,
    make_server,
    train_once,
)

from claas.api.app import create_app
from claas.feedback import FeedbackQueue
from claas.logs import JsonFormatter, configure_logging, current_request_id, uvicorn_logging
from claas.models import LoadedModel
from claas.runtime import Runtime
from claas.sdpo.engine import SDPOEngine
from claas.settings import Settings
from claas.store import Store

GUARD = 60.0  # seconds: only so that a missing log line fails a test instead of hanging it
WRONG_KEY = "sk-not-a-key-of-this-server"
SECRETS = [*OWNER_KEYS, ADMIN_KEY, WRONG_KEY]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_json(line: str) -> dict[str, Any]:
    """One log line, parsed as strict JSON (NaN or Infinity would be refused)."""
    parsed = json.loads(line, parse_constant=_no_constant)
    assert isinstance(parsed, dict), line
    return parsed


class LogCapture:
    """claas's JSON lines as the server writes them: a handler on the root logger with claas's
    formatter, and the `claas` loggers at debug for the test's length."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setFormatter(JsonFormatter())

    def text(self) -> str:
        return self.stream.getvalue()  # each record is one write: whole lines only

    def lines(self, logger: str | None = None) -> list[dict[str, Any]]:
        parsed = [strict_json(line) for line in self.text().splitlines() if line]
        return [p for p in parsed if logger is None or p["logger"] == logger]

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], count: int = 1
    ) -> list[dict[str, Any]]:
        """The lines that satisfy `predicate`, once there are at least `count` of them."""
        deadline = time.monotonic() + GUARD
        while len(found := [line for line in self.lines() if predicate(line)]) < count:
            assert time.monotonic() < deadline, f"no such log line in:\n{self.text()}"
            time.sleep(0.02)
        return found

    def request(self, request_id: str) -> dict[str, Any]:
        """The one `claas.http` line of the request with this id (waited for)."""
        (line,) = self.wait_for(
            lambda line: line["logger"] == "claas.http" and line["request_id"] == request_id
        )
        return line


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    capture = LogCapture()
    root, claas_logger = logging.getLogger(), logging.getLogger("claas")
    level = claas_logger.level
    root.addHandler(capture.handler)
    claas_logger.setLevel(logging.DEBUG)
    yield capture
    root.removeHandler(capture.handler)
    claas_logger.setLevel(level)


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """Undo `configure_logging` after the test: it changes process-wide logging state."""
    names = ["claas", "uvicorn", "uvicorn.error", "uvicorn.access"]
    saved = [
        (lg, list(lg.handlers), lg.level, lg.propagate)
        for lg in [logging.getLogger(), *map(logging.getLogger, names)]
    ]
    showwarning = warnings.showwarning
    yield
    logging.captureWarnings(False)
    warnings.showwarning = showwarning
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


# -- the formatter ------------------------------------------------------------------------------


def test_a_record_is_one_strict_json_line_with_its_extras_request_id_and_traceback() -> None:
    formatter = JsonFormatter()
    logger = logging.getLogger("claas.test")
    record = logger.makeRecord(
        "claas.test",
        logging.WARNING,
        __file__,
        1,
        "loss %s\nnext line",
        ("went bad",),
        None,
        extra={"metrics": {"loss": float("nan"), "tokens": 3}, "path": Path("/x")},
    )
    token = current_request_id.set("req-7")
    try:
        line = formatter.format(record)
    finally:
        current_request_id.reset(token)
    assert "\n" not in line
    parsed = strict_json(line)
    assert parsed["level"] == "warning" and parsed["logger"] == "claas.test"
    assert parsed["message"] == "loss went bad\nnext line"
    assert parsed["metrics"] == {"loss": "nan", "tokens": 3}
    assert parsed["path"] == "/x" and parsed["request_id"] == "req-7"
    assert parsed["ts"].endswith("Z")
    assert "exception" not in parsed and "traceback" not in parsed

    try:
        raise KeyError("missing")
    except KeyError as error:
        exc_info = (KeyError, error, error.__traceback__)
        failed = logger.makeRecord("claas.test", logging.ERROR, __file__, 1, "boom", (), exc_info)
    parsed = strict_json(formatter.format(failed))
    assert parsed["exception"] == "KeyError: 'missing'"
    assert "Traceback (most recent call last)" in parsed["traceback"]
    assert 'raise KeyError("missing")' in parsed["traceback"]
    assert "request_id" not in parsed  # no request is being handled


# -- HTTP requests ------------------------------------------------------------------------------


def test_one_line_per_request_with_status_and_owner_and_never_a_key(
    tmp_path: Path, model_cache: Path, logs: LogCapture
) -> None:
    live = make_server(tmp_path, model_cache, api_keys=OWNER_KEYS, admin_key=ADMIN_KEY)
    try:
        sent: list[tuple[str, httpx.Response]] = []

        def call(method: str, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
            request_id = f"t-{len(sent)}"
            response = live.client.request(
                method, path, headers={**headers, "x-request-id": request_id}, **kw
            )
            assert response.headers["x-request-id"] == request_id  # sent back to the client
            sent.append((request_id, response))
            return response

        # (status, owner, auth, route template) each request must be logged with
        expected = [
            (201, "alice", "owner", "/v1/adapters"),
            (200, "alice", "owner", "/v1/models"),
            (200, "bob", "owner", "/v1/models"),
            (200, None, "admin", "/v1/models"),
            (401, None, "no_key", "/v1/models"),
            (401, None, "unknown_key", "/v1/models"),
            (403, "bob", "owner", "/v1/adapters"),
            (404, "alice", "owner", "/v1/feedback/{feedback_id}"),
            (404, None, "admin", None),
            (422, "alice", "owner", "/v1/chat/completions"),
        ]
        call("POST", "/v1/adapters", ALICE, json={"lora_id": "alice/a", "rank": 4})
        call("GET", "/v1/models", ALICE)
        call("GET", "/v1/models", BOB)
        call("GET", "/v1/models", ADMIN)
        call("GET", "/v1/models", {})
        call("GET", "/v1/models", bearer(WRONG_KEY))
        call("POST", "/v1/adapters", BOB, json={"lora_id": "alice/b", "rank": 4})
        call("GET", "/v1/feedback/fb-nope", ALICE)
        call("GET", "/no/such/route", ADMIN)
        call("POST", "/v1/chat/completions", ALICE, json={"model": "alice/a"})
        assert [r.status_code for _, r in sent] == [e[0] for e in expected]

        # The dashboard's sign-in form carries a key in its body, its page a key in a cookie.
        login = live.client.post("/dashboard/login", data={"key": "sk-alice", "next": "/dashboard"})
        assert login.status_code == 303
        page = live.client.get("/dashboard", headers={"x-request-id": "page"})
        assert page.status_code == 200
        # A header that does not look like an id is replaced by a new one.
        odd = live.client.get("/v1/models", headers={**ALICE, "x-request-id": "a b\tc"})
        new_id = odd.headers["x-request-id"]
        assert new_id != "a b\tc"

        for (request_id, _), (status, owner, auth, route) in zip(sent, expected, strict=True):
            line = logs.request(request_id)
            assert (line["status"], line["owner"], line["auth"], line["route"]) == (
                status,
                owner,
                auth,
                route,
            ), line
            assert line["level"] == "info" and line["client"] == "127.0.0.1"
            assert line["duration_ms"] >= 0 and line["bytes"] > 0
        assert logs.request(sent[7][0])["path"] == "/v1/feedback/fb-nope"
        assert logs.request(sent[8][0])["path"] == "/no/such/route"
        assert logs.request("page")["owner"] == "alice"
        assert logs.request(new_id)["status"] == 200

        (signin,) = logs.wait_for(lambda line: line.get("path") == "/dashboard/login")
        assert (signin["method"], signin["status"], signin["auth"]) == ("POST", 303, "no_key")
        assert len(logs.lines("claas.http")) == len(sent) + 3  # the sign-in, page and odd id
        text = logs.text()
        for secret in SECRETS:
            assert secret not in text
    finally:
        live.close()


def test_an_unhandled_exception_is_one_error_line_with_its_traceback(
    server: LiveServer, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    uvicorn_records: list[logging.LogRecord] = []
    uvicorn_spy = RecordList(uvicorn_records)
    logging.getLogger("uvicorn.error").addHandler(uvicorn_spy)

    def ping_that_breaks() -> bool:
        raise RuntimeError("the disk is on fire")

    # Inject one failure the routes do not expect: the database check of /v1/health raises.
    monkeypatch.setattr(server.runtime.store, "ping", ping_that_breaks)
    try:
        response = server.client.get("/v1/health", headers={"x-request-id": "broken"})
        assert response.status_code == 500
        assert response.json()["error"]["type"] == "InternalError"  # the app's own 500 body
        line = logs.request("broken")
        assert (line["level"], line["status"], line["route"]) == ("error", 500, "/v1/health")
        assert line["exception"] == "RuntimeError: the disk is on fire"
        assert "in ping_that_breaks" in line["traceback"]
        assert "claas/api/routes/system.py" in line["traceback"]

        # Logged once: neither Starlette nor uvicorn log it again; the metrics count it.
        metrics = server.client.get("/metrics").text
        (scrape,) = logs.wait_for(lambda line: line.get("path") == "/metrics")
        assert scrape["level"] == "debug"  # polled: below the default level
        assert 'claas_http_requests_total{method="GET",route="/v1/health",status="500"}' in (
            metrics
        )
        assert [r for r in uvicorn_records if r.exc_info] == []
        assert len([line for line in logs.lines() if "traceback" in line]) == 1
    finally:
        logging.getLogger("uvicorn.error").removeHandler(uvicorn_spy)


class RecordList(logging.Handler):
    """A spy on a logger: keeps its records (uvicorn's own loggers do not reach the root)."""

    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__()
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# -- feedback -----------------------------------------------------------------------------------


def test_a_finished_feedback_request_logs_its_metrics_and_timings(
    server: LiveServer, logs: LogCapture
) -> None:
    create(server, "alice/assistant")
    completion = chat(server, "alice/assistant").json()
    done = train_once(server, completion["id"])
    assert done["status"] == "done"
    stored = server.client.get(f"/v1/feedback/{done['feedback_id']}").json()

    (line,) = logs.wait_for(lambda line: line.get("feedback_id") == done["feedback_id"])
    assert (line["logger"], line["level"], line["status"]) == ("claas.feedback", "info", "done")
    assert (line["lora_id"], line["version"]) == ("alice/assistant", done["version"])
    assert (line["coalesced"], line["coalesced_into"], line["steps"]) == (1, None, 1)
    # The metrics and phase timings are those the request recorded in the store.
    metrics = stored["metrics"]
    assert line["metrics"] == {key: metrics[key] for key in line["metrics"]}
    assert {"loss", "tokens", "learning_rate"} <= set(line["metrics"])
    assert line["timings"] == pytest.approx(metrics["timings"], abs=1e-4)
    assert {"teacher_scoring", "train", "save"} <= set(line["timings"])
    assert line["train_seconds"] >= 0 and line["total_seconds"] >= 0
    assert "error" not in line


def test_a_feedback_request_that_breaks_logs_its_error_and_traceback(
    server: LiveServer, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def distill_that_breaks(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the accelerator fell off")

    # Inject one unexpected failure into training (not a domain error): it must be logged with
    # where it came from, while the request fails alone.
    monkeypatch.setattr(server.runtime.engine, "distill", distill_that_breaks)
    create(server, "alice/assistant")
    completion = chat(server, "alice/assistant").json()
    failed = train_once(server, completion["id"])
    assert failed["status"] == "failed"

    (line,) = logs.wait_for(lambda line: line.get("feedback_id") == failed["feedback_id"])
    assert (line["level"], line["status"], line["version"]) == ("error", "failed", None)
    assert "RuntimeError: the accelerator fell off" in line["error"]
    assert line["exception"] == "RuntimeError: the accelerator fell off"
    assert "in distill_that_breaks" in line["traceback"]
    assert "metrics" not in line


# -- configure_logging with uvicorn, as `claas serve` runs it ----------------------------------


def test_configure_logging_sends_claas_and_uvicorn_records_as_json_and_no_access_log(
    tmp_path: Path, tiny: LoadedModel, restored_logging: None
) -> None:
    # As an earlier uvicorn.Config with its default log_config leaves uvicorn's loggers: with
    # handlers of their own, not propagating. configure_logging takes them over.
    logging.config.dictConfig(uvicorn.config.LOGGING_CONFIG)
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    # uvicorn's access log is off even before uvicorn_logging turns it off: its records reach
    # no handler at all (the claas.http line is the one line per request).
    assert not logging.getLogger("uvicorn.access").hasHandlers()
    assert uvicorn_logging("info") == {"log_config": None, "log_level": "info", "access_log": False}
    runtime = Runtime.build(Settings(data_dir=tmp_path / "data", log_level="info"), loaded=tiny)
    config = uvicorn.Config(create_app(runtime), host="127.0.0.1", port=0, **uvicorn_logging())
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + GUARD
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        response = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"x-request-id": "m"})
        assert response.status_code == 200
        logging.getLogger("claas.test").debug("below the level: not written")
        logging.getLogger("uvicorn.access").info("an access line of uvicorn's: not written")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        runtime.close()

    lines = [strict_json(line) for line in stream.getvalue().splitlines()]  # every line is JSON
    by_logger: dict[str, list[dict[str, Any]]] = {}
    for line in lines:
        by_logger.setdefault(line["logger"], []).append(line)
    assert [line["request_id"] for line in by_logger["claas.http"]] == ["m"]
    assert "uvicorn.access" not in by_logger  # the claas.http line is the one line per request
    assert any("Uvicorn running on" in line["message"] for line in by_logger["uvicorn.error"])
    ready = next(line for line in by_logger["claas.serve"] if "ready" in line["message"])
    assert (ready["model"], ready["service"], ready["log_level"]) == ("tiny-llama", "local", "info")
    assert ready["owner_keys"] == 0 and ready["admin_key"] is False
    assert by_logger["claas.serve"][-1]["message"] == "claas stopped"
    assert "claas.test" not in by_logger
    (warned,) = by_logger["py.warnings"]
    assert "a library's warning" in warned["message"]


# -- the scheduled purge of expired rollouts ---------------------------------------------------


def rollout_rows(live: LiveServer) -> int:
    """Rows in the rollouts table of the server's SQLite file, expired or not (read directly:
    the store's own lookups already hide an expired rollout)."""
    path = live.runtime.settings.data_dir / "claas.db"
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        (count,) = db.execute("SELECT COUNT(*) FROM rollouts").fetchone()
    return int(count)


def purge_lines(logs: LogCapture) -> list[dict[str, Any]]:
    return [
        line
        for line in logs.lines("claas.feedback")
        if "purged_rollouts" in line or "purging" in line["message"]
    ]


def test_an_expired_rollout_is_purged_while_serving(
    tmp_path: Path, model_cache: Path, logs: LogCapture
) -> None:
    live = make_server(tmp_path, model_cache, rollout_ttl_seconds=3.0, purge_interval_seconds=0.2)
    try:
        create(live, "alice/assistant")
        assert chat(live, "alice/assistant").status_code == 200
        assert rollout_rows(live) == 1  # stored, and not expired yet
        deadline = time.monotonic() + GUARD
        while rollout_rows(live) > 0:
            assert time.monotonic() < deadline, "the expired rollout was never purged"
            time.sleep(0.05)
        (purged,) = logs.wait_for(lambda line: line.get("purged_rollouts") == 1)
        assert (purged["logger"], purged["level"]) == ("claas.feedback", "info")
        assert purged["message"] == "purged 1 expired rollouts"
    finally:
        live.close()


class PurgeFailingOnce:
    """A spy on the real `Store.purge_expired_rollouts` that raises a database error on its first
    call (as a locked or full disk would), then purges for real; counts its calls."""

    def __init__(self, purge: Callable[[], int]) -> None:
        self.purge = purge
        self.calls = 0
        self.purged: list[int] = []

    def __call__(self) -> int:
        self.calls += 1
        if self.calls == 1:
            raise sqlite3.OperationalError("database is locked")
        removed = self.purge()
        self.purged.append(removed)
        return removed


def test_a_purge_that_fails_is_logged_and_the_next_purge_still_runs(
    tmp_path: Path, model_cache: Path, logs: LogCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = make_server(tmp_path, model_cache, rollout_ttl_seconds=3.0, purge_interval_seconds=0.2)
    try:
        spy = PurgeFailingOnce(live.runtime.store.purge_expired_rollouts)
        # Installed once the server runs: the purge at start-up has been done already.
        monkeypatch.setattr(live.runtime.store, "purge_expired_rollouts", spy)
        (failure,) = logs.wait_for(lambda line: "purging" in line["message"])
        create(live, "alice/assistant")
        assert chat(live, "alice/assistant").status_code == 200
        assert rollout_rows(live) == 1
        deadline = time.monotonic() + GUARD
        while rollout_rows(live) > 0:
            assert time.monotonic() < deadline, "no purge ran after the failed one"
            time.sleep(0.05)
        logs.wait_for(lambda line: line.get("purged_rollouts") == 1)

        assert (failure["logger"], failure["level"]) == ("claas.feedback", "error")
        assert failure["exception"] == "OperationalError: database is locked"
        assert "Traceback (most recent call last)" in failure["traceback"]
        assert failure["retry_in_seconds"] == 0.2
        assert spy.calls >= 3 and 1 in spy.purged  # the failure, then purges, one of them ours
        lines = purge_lines(logs)
        assert lines.index(failure) < next(
            i for i, line in enumerate(lines) if line.get("purged_rollouts") == 1
        )
    finally:
        live.close()


class CountingStore:
    """A stand-in for `Store` with only what the queue's start, purge and stop call: no model
    or engine is needed to watch the purge task start and stop."""

    def __init__(self) -> None:
        self.purges = 0

    def reclaim(self, *_: object) -> int:
        return 0

    def count_feedback(self, **_: object) -> int:
        return 0

    def claim(self, *_: object) -> list[object]:
        return []

    def listen(self, _: object) -> None:
        return None

    def purge_expired_rollouts(self) -> int:
        self.purges += 1
        return 0


def test_the_purge_runs_every_interval_until_the_queue_stops() -> None:
    async def scenario() -> tuple[int, int]:
        store = CountingStore()
        queue = FeedbackQueue(cast(Store, store), cast(SDPOEngine, None), purge_interval=0.05)
        queue.start()
        deadline = time.monotonic() + GUARD
        while store.purges < 4:  # the one at start, then three scheduled
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await queue.stop()
        stopped_at = store.purges
        await asyncio.sleep(0.3)  # six intervals: a purge task still alive would run again
        return stopped_at, store.purges

    stopped_at, later = asyncio.run(scenario())
    assert later == stopped_at
