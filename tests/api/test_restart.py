"""A `claas serve` killed with SIGKILL while it trains: its queued feedback is trained after a
restart, and nothing is lost or duplicated.

The server that is killed runs as a subprocess (`claas serve`), so that SIGKILL ends it as a
crash would. The restart is a real server on the same data dir and model, in this process: a
second `claas serve` subprocess would only add seconds of imports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from serving import HELLO, LiveServer, finished, free_port, save_tiny_model, wait_healthy

from claas.models import load_model
from claas.settings import Settings
from claas.store import Store

pytestmark = pytest.mark.heavy

# A short lease: the batch the killed process was training is taken back 5 s after its last
# heartbeat, not 30 s.
LEASE_SECONDS = 5

# Enough steps that the first request is still training when the kill lands (a few ms after it
# is seen running; the test checks it was), few enough that training it again after the
# restart is quick.
STEPS = 16


def _start(model_dir: Path, data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "CLAAS_DATA_DIR": str(data_dir),
        "CLAAS_LEASE_SECONDS": str(LEASE_SECONDS),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "claas.cli",
            "serve",
            "--model",
            str(model_dir),
            "--port",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_healthy(f"http://127.0.0.1:{port}", process, timeout=120)
    return process


@pytest.fixture(scope="module")
def tiny_dir(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(model_cache, tmp_path_factory.mktemp("tiny-model"))


def test_restart_after_sigkill_resumes_queued_feedback(
    tiny_dir: Path, tmp_path: Path, model_cache: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = _start(tiny_dir, tmp_path, port)
    http = httpx.Client(base_url=url, timeout=60)  # one client: a new one loads the CA bundle
    try:
        http.post("/v1/adapters", json={"lora_id": "alice/durable", "rank": 4})
        answer = http.post(
            "/v1/chat/completions",
            json={"model": "alice/durable", "messages": HELLO, "max_tokens": 8},
        ).json()
        items = [
            {
                "completion_id": answer["id"],
                "feedback": "shorter",
                "training": {"steps_per_batch": STEPS},
            }
        ]
        first = http.post("/v1/feedback", json={"items": items}).json()
        second = http.post("/v1/feedback", json={"items": items}).json()
        deadline = time.monotonic() + 120
        while (
            http.get(f"/v1/feedback/{first['feedback_id']}", timeout=5).json()["status"] == "queued"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)  # each poll is a request the server answers: no more often
    finally:  # the kill, at once once the first request is seen training
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        http.close()
    settings = Settings(data_dir=tmp_path, lease_seconds=LEASE_SECONDS)
    store = Store(settings.database)
    try:  # killed mid-training: the first request still claimed, no version made yet
        assert store.get_feedback(first["feedback_id"]).status == "running"
        assert store.get_feedback(second["feedback_id"]).status in ("queued", "running")
        latest = store.latest_version("alice/durable")
        assert latest is not None and latest.version == 1
    finally:
        store.close()
    live = LiveServer(settings, load_model(str(tiny_dir), model_cache, device="cpu"))
    try:
        for feedback_id in (first["feedback_id"], second["feedback_id"]):
            status = finished(live.client, feedback_id)
            assert status["status"] == "done", status
        versions = live.client.get("/v1/adapters/alice/durable").json()["versions"]
        numbers = [v["version"] for v in versions]
        assert numbers == list(range(1, len(numbers) + 1)) and len(numbers) in (2, 3)
        made = {
            live.client.get(f"/v1/feedback/{f['feedback_id']}").json()["version"]
            for f in (first, second)
        }
        assert made == set(numbers[1:])  # every version belongs to a request: none duplicated
        checkpoints = tmp_path / "checkpoints"
        runs_on_disk = {p.parent.parent.name for p in checkpoints.glob("*/weights/*")}
        runs_in_db = {v["state_path"].split("/")[2] for v in versions}
        assert runs_in_db <= runs_on_disk
    finally:
        live.close()
