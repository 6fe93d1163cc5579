"""The commands that run claas in their own process (`serve`, `worker`): what they tell before
they load anything. tests/api/test_auth.py has the refusal to bind without keys, and
tests/test_logs.py and tests/test_scale.py run these commands to the end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
