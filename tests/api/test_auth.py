"""API keys: each owner reaches only their own adapters; no keys means loopback only."""

from __future__ import annotations

import os
import subprocess
import sys

from serving import ADMIN, ALICE, BOB, LiveServer, bearer, chat, create


def test_api_keys_scope_owners(keyed: LiveServer) -> None:
    assert keyed.client.get("/v1/adapters").status_code == 401
    assert keyed.client.get("/v1/adapters", headers=bearer("x")).status_code == 401
    create(keyed, "alice/private", headers=ALICE)
    assert (
        keyed.client.post("/v1/adapters", json={"lora_id": "alice/stolen"}, headers=BOB).status_code
        == 403
    )
    assert keyed.client.get("/v1/adapters/alice/private", headers=BOB).status_code == 403
    assert chat(keyed, "alice/private", h=BOB).status_code == 403
    answer = chat(keyed, "alice/private", h=ALICE).json()
    cross = keyed.client.post(
        "/v1/feedback",
        json={"items": [{"completion_id": answer["id"], "feedback": "x"}]},
        headers=BOB,
    )
    assert cross.status_code == 404  # another owner's id looks like no id at all
    mine = keyed.client.post(
        "/v1/feedback",
        json={
            "items": [
                {
                    "completion_id": answer["id"],
                    "feedback": "x",
                    "training": {"steps_per_batch": 1},
                }
            ]
        },
        headers=ALICE,
    )
    assert mine.status_code == 202
    feedback_id = mine.json()["feedback_id"]
    assert keyed.client.get(f"/v1/feedback/{feedback_id}", headers=BOB).status_code == 404
    assert keyed.client.get(f"/v1/feedback/{feedback_id}", headers=ALICE).status_code == 200
    assert keyed.client.get("/v1/adapters", headers=BOB).json()["data"] == []
    listed = keyed.client.get("/v1/adapters", headers=ADMIN)
    assert [a["lora_id"] for a in listed.json()["data"]] == ["alice/private"]
    assert chat(keyed, keyed.runtime.base_model, h=BOB).status_code == 200
    for response in [keyed.client.get("/v1/adapters/alice/private", headers=BOB)]:
        assert "alice" in response.json()["error"]["message"]
    unknown = chat(keyed, "bob/nothing", h=BOB)  # 404 lists only bob's own names
    assert unknown.status_code == 404 and "alice" not in unknown.json()["error"]["message"]


def test_no_keys_means_loopback_only() -> None:
    """`claas serve --host 0.0.0.0` (the flag) with no API keys is refused, and the message
    says how to go on, --insecure included. tests/test_deploy.py checks the image's way in
    (CLAAS_HOST from the environment) and that a key lifts the refusal."""
    refused = subprocess.run(
        [sys.executable, "-m", "claas.cli", "serve", "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("CLAAS_")},
    )
    assert refused.returncode == 2
    assert "refusing to bind 0.0.0.0 without API keys" in refused.stderr
    assert "--insecure" in refused.stderr
