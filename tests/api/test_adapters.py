"""An adapter's life over HTTP: train, roll back, export, list, delete, and the metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serving import LiveServer, chat, create, train_once


def test_adapter_lifecycle_over_http(server: LiveServer) -> None:
    create(server, "alice/life")
    answer = chat(server, "alice/life").json()
    done = train_once(server, answer["id"])
    assert done["version"] == 2
    rolled = server.client.post("/v1/adapters/alice/life/rollback", json={"version": 1}).json()
    assert rolled["current_version"] == 1
    assert (
        server.runtime.store.get_rollout(chat(server, "alice/life").json()["id"]).adapter_version
        == 1
    )
    archive = server.client.get("/v1/adapters/alice/life/export", params={"version": 2})
    assert archive.status_code == 200 and archive.content[:2] == b"PK"
    listed = server.client.get("/v1/adapters", params={"prefix": "alice/"}).json()["data"]
    assert [a["lora_id"] for a in listed] == ["alice/life"]
    assert server.client.delete("/v1/adapters/alice/life").json()["versions_removed"] == 2
    assert server.client.get("/v1/adapters/alice/life").status_code == 404
    assert not any((server.runtime.settings.data_dir / "checkpoints").glob("*/weights/*"))
    metrics = server.client.get("/metrics").text
    assert 'claas_http_requests_total{method="POST",route="/v1/feedback",status="200"}' in metrics
    assert "claas_feedback_queue_depth 0.0" in metrics
    assert "claas_feedback_train_seconds_count 1.0" in metrics
    health = server.client.get("/v1/health").json()
    assert health["database_ok"] and health["model_loaded"] and health["queue_depth"] == 0


def test_cli_manages_adapters_and_feedback(server: LiveServer, tmp_path: Path) -> None:
    def claas(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "claas.cli", *args, "--url", server.url],
            capture_output=True,
            text=True,
            timeout=300,
        )

    created = claas("adapters", "create", "alice/cli", "--rank", "4")
    assert created.returncode == 0, created.stderr
    assert json.loads(created.stdout)["current_version"] == 1
    answer = chat(server, "alice/cli").json()
    done = train_once(server, answer["id"])
    status = claas("feedback", "status", done["feedback_id"])
    assert json.loads(status.stdout)["version"] == 2
    listed = json.loads(claas("adapters", "list", "--prefix", "alice/").stdout)
    assert [a["lora_id"] for a in listed["data"]] == ["alice/cli"]
    versions = json.loads(claas("adapters", "versions", "alice/cli").stdout)["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    assert (
        json.loads(claas("adapters", "rollback", "alice/cli", "1").stdout)["current_version"] == 1
    )
    zip_path = tmp_path / "cli.zip"
    exported = claas("adapters", "export", "alice/cli", "-o", str(zip_path))
    assert exported.returncode == 0 and zip_path.read_bytes()[:2] == b"PK"
    missing = claas("adapters", "versions", "alice/none")
    assert missing.returncode == 1 and "create it first" in missing.stderr
    assert claas("adapters", "delete", "alice/cli").returncode == 0
