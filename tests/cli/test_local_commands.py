"""The commands that run claas in their own process (`serve`, `worker`), as a user runs them:
what they tell before they load anything, the address `claas serve` prints, and its log lines.
tests/api/test_auth.py has the refusal to bind without keys, and tests/test_scale.py and
tests/api/test_restart.py run these commands through training and SIGKILLs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from serving import free_port, save_tiny_model, wait_healthy

pytestmark = pytest.mark.heavy

# Runs both commands in one fresh interpreter, then prints their exit codes and which of the
# heavy libraries got imported.
PROBE = """
import sys
from claas.cli import main
codes = [main([command, "--model", sys.argv[1]]) for command in ("serve", "worker")]
print(codes, sorted(name for name in ("torch", "transformers") if name in sys.modules))
"""


def test_a_model_that_is_not_here_is_told_before_torch_is_imported(tmp_path: Path) -> None:
    """`claas serve` and `claas worker` with a --model that names nothing on this machine exit
    with 2 and the message that says what to do, without importing torch or transformers (the
    seconds those take would only delay the answer)."""
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()  # a directory, but without config.json
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAAS_")}
    for model, says in [
        (str(tmp_path / "no-such-model"), "there is no model directory at"),
        (str(not_a_model), "has no config.json, so it is not a Hugging Face model directory"),
        ("someone/not-cached", "is neither a local directory nor in the local Hugging Face"),
    ]:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, model],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "CLAAS_DATA_DIR": str(tmp_path / "data")},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "[2, 2] []", done.stdout + done.stderr
        assert done.stderr.count(says) == 2, done.stderr


@dataclass(frozen=True)
class Served:
    """One `claas serve` run to its end: what it printed, and its stderr, a JSON record a line."""

    first_line: str  # stdout's first line, the address it serves at
    health: int  # GET /v1/health at that address, while it ran
    records: list[dict[str, Any]]


def serve(model_dir: Path, root: Path, level: str, port: int) -> Served:
    """`claas serve --log-level level --port port` in a bare environment (PATH and its data dir:
    nothing of this one's CLAAS_ settings); one GET /v1/models, then SIGTERM."""
    stderr = root / f"stderr-{level}.log"
    with (
        stderr.open("wb") as sink,
        subprocess.Popen(  # the block's end closes its stdout and waits for it
            [
                *(sys.executable, "-m", "claas.cli", "serve", "--model", str(model_dir)),
                *("--port", str(port), "--log-level", level),
            ],
            env={
                "CLAAS_DATA_DIR": str(root / f"data-{level}"),
                "PATH": "/usr/bin:/bin",
                "PYTHONUNBUFFERED": "1",
            },
            stdout=subprocess.PIPE,
            stderr=sink,
            text=True,
        ) as process,
    ):
        try:
            assert process.stdout is not None
            first_line = process.stdout.readline()  # printed once the port is bound
            match = re.search(r" at (http://127\.0\.0\.1:\d+) ", first_line)
            assert match, (first_line, stderr.read_text())
            url = match.group(1)
            wait_healthy(url, process, timeout=120, output=stderr.read_text)
            with httpx.Client(base_url=url, timeout=10) as client:
                health = client.get("/v1/health").status_code
                assert client.get("/v1/models").status_code == 200
            # The request's line is written just after the response.
            deadline = time.monotonic() + 30
            while '"/v1/models"' not in stderr.read_text():
                assert time.monotonic() < deadline, stderr.read_text()
                time.sleep(0.05)
        finally:
            process.terminate()
            process.wait(timeout=60)
    lines = [line for line in stderr.read_text().splitlines() if line.strip()]
    return Served(first_line, health, [json.loads(line) for line in lines])  # every line: JSON


@pytest.fixture(scope="module")
def served(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Served]:
    """Two servers, started at once (each is seconds of imports): at info on `--port 0`, and
    at debug on a port picked here."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_model(model_cache, root / "tiny")
    with ThreadPoolExecutor(2) as pool:
        at_info = pool.submit(serve, model_dir, root, "info", 0)
        at_debug = pool.submit(serve, model_dir, root, "debug", free_port())
        return {"info": at_info.result(), "debug": at_debug.result()}


def test_serve_prints_the_address_it_really_bound(served: dict[str, Served]) -> None:
    """`--port 0` lets the system pick a port: the line printed names that port, not 0, and
    the server answers there."""
    line = served["info"].first_line
    match = re.search(r" at http://127\.0\.0\.1:(\d+) ", line)
    assert match and int(match.group(1)) > 0, line
    assert served["info"].health == 200


def test_claas_serve_writes_json_lines_at_its_log_level(served: dict[str, Served]) -> None:
    """Every stderr line is JSON, the start-up line and one line per request are there, and
    debug lines only at debug."""
    at_info, at_debug = served["info"].records, served["debug"].records
    assert any(r["logger"] == "claas.serve" and "ready" in r["message"] for r in at_info)
    models = [r for r in at_info if r["logger"] == "claas.http" and r["path"] == "/v1/models"]
    assert len(models) == 1 and models[0]["status"] == 200
    assert not any(r["level"] == "debug" for r in at_info)
    assert not any(r["logger"] == "uvicorn.access" for r in at_info)  # no second request line
    assert any(r["level"] == "debug" and r.get("path") == "/v1/health" for r in at_debug)
