"""The README's quickstart, run verbatim with bash and curl against a real server."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from serving import LiveServer

REPO = Path(__file__).resolve().parents[2]


def readme_quickstart() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert match, "README has no bash block under ## Quickstart"
    return match.group(1)


def test_readme_quickstart_runs_verbatim(server: LiveServer, tmp_path: Path) -> None:
    script = readme_quickstart()
    assert script.count("curl ") == 4
    script = script.replace("http://127.0.0.1:8000", server.url)
    script = script.replace("/tmp/claas-chat.json", str(tmp_path / "chat.json"))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    outputs = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    created, first, feedback, second = outputs
    assert created["lora_id"] == "alice/assistant" and created["current_version"] == 1
    assert first["model"] == "alice/assistant" and first["choices"][0]["message"]["content"]
    assert feedback["status"] == "done" and feedback["version"] == 2, feedback
    assert feedback["metrics"]["divergence_mode"] == "topk_gjs"
    assert second["choices"][0]["message"]["content"]
    rollout = server.runtime.store.get_rollout(second["id"])
    assert rollout.adapter_version == 2  # served by the new version at once
