"""An adapter's life over HTTP: train, roll back, export, list, delete, and the metrics."""

from __future__ import annotations

import json
from typing import Any

import pytest
from serving import LiveServer, chat, create, train_once

from claas.cli import main


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


def test_cli_lists_and_rolls_back_a_trained_adapter(
    server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """The `claas adapters` commands on an adapter with two versions, in-process through
    `claas.cli.main` as tests/cli/test_cli.py runs them. That file covers the other commands;
    there the adapter has only version 1, so a rollback moves nothing."""

    def claas(*args: str) -> tuple[int, Any, str]:
        code = main([*args, "--url", server.url])
        out, err = capsys.readouterr()
        return code, json.loads(out) if out else None, err

    create(server, "alice/cli")
    done = train_once(server, chat(server, "alice/cli").json()["id"])
    assert done["version"] == 2
    code, versions, _ = claas("adapters", "versions", "alice/cli")
    assert code == 0 and [v["version"] for v in versions["versions"]] == [1, 2]
    assert versions["current_version"] == 2
    code, rolled, _ = claas("adapters", "rollback", "alice/cli", "1")
    assert code == 0 and rolled["current_version"] == 1
    assert server.client.get("/v1/adapters/alice/cli").json()["current_version"] == 1
    code, _, err = claas("adapters", "versions", "alice/none")
    assert code == 1 and "create it first" in err
