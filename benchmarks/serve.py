"""The API end to end: a real `claas serve` on the embedded SmolLM2 (CPU), measured over HTTP.

The script starts its own server on a free loopback port with a temporary data dir (the model's
safetensors cache is linked in from the default data dir, so nothing is converted again), waits
for /v1/health, and measures in one run:
- one streamed chat (128 tokens, greedy): time to first token and decode tokens/s;
- 4 concurrent chats against one: total tokens/s, as a ratio;
- one feedback step (default TrainingConfig, on a ~100-token answer), split into queue, train and
  swap (from the feedback's reply to the first chat served by the new adapter version);
- a short chat while a feedback step trains, against the same chat when the server is idle.

    .venv/bin/python benchmarks/serve.py
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from claas.settings import EMBEDDED_MODEL, default_data_dir

ADAPTER = "bench/assistant"
STARTUP_SECONDS = 300.0
REQUEST_SECONDS = 600.0
TRAIN_SECONDS = 900.0
LONG_PROMPT = "Write a detailed essay on the history of the printing press and its effects."
PROMPTS = [
    LONG_PROMPT,
    "Explain in detail how a steam engine works, step by step.",
    "Describe the water cycle thoroughly, with examples from everyday life.",
    "Tell a long story about a lighthouse keeper who finds a message in a bottle.",
]
SHORT_PROMPT = "What is the capital of France?"
FEEDBACK = "Way too long. Answer in one short sentence."


@dataclass(frozen=True)
class Chat:
    seconds: float  # wall time of the whole request
    completion_tokens: int
    completion_id: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`claas serve` on CPU, with the default data dir's model cache linked into `data_dir`."""
    cached_models = default_data_dir() / "models"
    if cached_models.is_dir():
        (data_dir / "models").symlink_to(cached_models, target_is_directory=True)
    env = {**os.environ, "CLAAS_DATA_DIR": str(data_dir), "CLAAS_DEVICE": "cpu"}
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "claas.cli", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_until(what: str, ready: Callable[[], bool], seconds: float, poll: float = 0.05) -> None:
    deadline = time.perf_counter() + seconds
    while not ready():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not happen within {seconds:.0f} s")
        time.sleep(poll)


def wait_healthy(client: httpx.Client, server: subprocess.Popen[bytes], log: Path) -> float:
    start = time.perf_counter()

    def healthy() -> bool:
        if server.poll() is not None:
            raise RuntimeError(f"claas serve exited ({server.returncode}):\n{log.read_text()}")
        try:
            return client.get("/v1/health").status_code == 200
        except httpx.TransportError:
            return False

    wait_until("a healthy server", healthy, STARTUP_SECONDS, poll=0.2)
    return time.perf_counter() - start


def chat_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def chat(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> Chat:
    start = time.perf_counter()
    response = client.post("/v1/chat/completions", json=chat_body(model, prompt, max_tokens))
    seconds = time.perf_counter() - start
    response.raise_for_status()
    body = response.json()
    return Chat(seconds, body["usage"]["completion_tokens"], body["id"])


def stream(client: httpx.Client, model: str, prompt: str, max_tokens: int) -> tuple[float, Chat]:
    """(time to first token, the whole chat) of one SSE stream; tokens from the usage chunk."""
    body = {**chat_body(model, prompt, max_tokens), "stream": True}
    first: float | None = None
    usage: dict[str, int] | None = None
    chunk_id = ""
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']['message']}")
            chunk_id = chunk["id"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    seconds = time.perf_counter() - start
    if first is None or usage is None:
        raise RuntimeError("the stream carried no text or no usage chunk")
    return first, Chat(seconds, usage["completion_tokens"], chunk_id)


def feedback(
    client: httpx.Client, completion_id: str, training: dict[str, Any], wait: bool
) -> dict[str, Any]:
    item: dict[str, Any] = {"completion_id": completion_id, "feedback": FEEDBACK}
    if training:
        item["training"] = training
    response = client.post(
        "/v1/feedback", params={"wait": str(wait).lower()}, json={"items": [item]}
    )
    response.raise_for_status()
    return dict(response.json())


def feedback_status(client: httpx.Client, feedback_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/feedback/{feedback_id}")
    response.raise_for_status()
    return dict(response.json())


def current_version(client: httpx.Client) -> int | None:
    response = client.get(f"/v1/adapters/{ADAPTER}")
    response.raise_for_status()
    version = response.json()["current_version"]
    return None if version is None else int(version)


def median_chat(client: httpx.Client, model: str, repeats: int) -> float:
    return statistics.median(chat(client, model, SHORT_PROMPT, 16).seconds for _ in range(repeats))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="claas-bench-") as tmp:
        data_dir, port = Path(tmp), free_port()
        log = data_dir / "server.log"
        server = start_server(data_dir, port, log)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_SECONDS) as c:
                startup = wait_healthy(c, server, log)
                run(c, startup)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)


def run(client: httpx.Client, startup: float) -> None:
    base = EMBEDDED_MODEL
    chat(client, base, SHORT_PROMPT, 16)  # warm-up: first sampler, first kernels

    # One stream, and concurrency against one non-streamed chat of the same length.
    ttft, streamed = stream(client, base, LONG_PROMPT, 128)
    decode = (streamed.completion_tokens - 1) / (streamed.seconds - ttft)
    one = chat(client, base, LONG_PROMPT, 128)
    one_rate = one.completion_tokens / one.seconds
    start = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        many = list(pool.map(lambda p: chat(client, base, p, 128), PROMPTS))
    many_seconds = time.perf_counter() - start
    many_rate = sum(m.completion_tokens for m in many) / many_seconds

    # One feedback step with the default TrainingConfig, then the first chat on the new version.
    client.post("/v1/adapters", json={"lora_id": ADAPTER}).raise_for_status()
    answered = chat(client, ADAPTER, LONG_PROMPT, 100)
    before = median_chat(client, ADAPTER, 3)
    request_start = time.perf_counter()
    done = feedback(client, answered.completion_id, {}, wait=True)
    done_at = time.perf_counter()
    if done["status"] != "done":
        raise RuntimeError(f"feedback did not finish: {done}")
    queue_seconds = done["started_at"] - done["created_at"]
    train_seconds = done["finished_at"] - done["started_at"]
    if current_version(client) != done["version"]:
        raise RuntimeError("the adapter's current version is not the one feedback produced")
    first_new = chat(client, ADAPTER, SHORT_PROMPT, 16)
    swap_seconds = time.perf_counter() - done_at
    after = median_chat(client, ADAPTER, 3)
    timings = done["metrics"].get("timings", {})

    # A short chat while a longer feedback step trains, against the same chat when idle.
    idle = median_chat(client, ADAPTER, 3)
    answer = chat(client, ADAPTER, LONG_PROMPT, 100)
    pending = feedback(client, answer.completion_id, {"steps_per_batch": 8}, wait=False)
    feedback_id = pending["feedback_id"]
    wait_until(
        "the feedback step to start",
        lambda: feedback_status(client, feedback_id)["status"] != "queued",
        TRAIN_SECONDS,
        poll=0.01,
    )
    busy: list[tuple[float, float]] = []  # (wall end, seconds) of chats sent while training
    deadline = time.perf_counter() + TRAIN_SECONDS
    while len(busy) < 5 and time.perf_counter() < deadline:
        if feedback_status(client, feedback_id)["status"] != "running":
            break
        seconds = chat(client, ADAPTER, SHORT_PROMPT, 16).seconds
        busy.append((time.time(), seconds))
    wait_until(
        "the feedback step to finish",
        lambda: feedback_status(client, feedback_id)["status"] in ("done", "failed"),
        TRAIN_SECONDS,
        poll=0.1,
    )
    trained = feedback_status(client, feedback_id)
    overlapped = [s for end, s in busy if end <= (trained["finished_at"] or 0.0)]
    if not overlapped:
        raise RuntimeError("no chat finished while the feedback step was training")
    during = statistics.median(overlapped)
    long_train = trained["finished_at"] - trained["started_at"]

    rows = [
        ("server start to healthy", f"{startup:.1f} s", ""),
        ("TTFT, 1 stream", f"{ttft * 1e3:.0f} ms", ""),
        (
            "decode, 1 stream",
            f"{decode:.1f} tok/s",
            f"{streamed.completion_tokens} tok in {streamed.seconds:.2f} s",
        ),
        ("throughput, 1 chat", f"{one_rate:.1f} tok/s", f"{one.completion_tokens} tok"),
        (
            f"throughput, {len(many)} concurrent",
            f"{many_rate:.1f} tok/s",
            f"{many_rate / one_rate:.2f}x one chat",
        ),
        ("feedback queue", f"{queue_seconds * 1e3:.0f} ms", ""),
        (
            "feedback train (default)",
            f"{train_seconds:.2f} s",
            f"{answered.completion_tokens}-tok answer; round trip {done_at - request_start:.2f} s",
        ),
        (
            "feedback swap",
            f"{swap_seconds * 1e3:.0f} ms",
            f"first chat {first_new.seconds * 1e3:.0f} ms = "
            f"{first_new.seconds / after:.2f}x warm {after * 1e3:.0f} ms",
        ),
        (
            "short chat, idle",
            f"{idle * 1e3:.0f} ms",
            f"on version 1, before feedback: {before * 1e3:.0f} ms",
        ),
        (
            "short chat, while training",
            f"{during * 1e3:.0f} ms",
            f"{during / idle:.2f}x idle ({len(overlapped)} chats during a "
            f"{long_train:.1f} s, 8-step train)",
        ),
    ]
    print(f"claas serve, {EMBEDDED_MODEL} on CPU, {os.cpu_count()} cores, over HTTP on loopback")
    for name, value, ratio in rows:
        print(f"{name:28s} {value:>12s}  {ratio}")
    print("engine timings of the feedback step (s): ", end="")
    print(", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    print(
        "\nTTFT: request sent to first text chunk; decode: the stream's later tokens per second.\n"
        "Throughput: completion tokens / wall time (128-token greedy chats); the concurrent\n"
        "ratio is what batching or interleaving 4 chats gains over one at a time.\n"
        "Feedback queue: started_at - created_at; train: finished_at - started_at (teacher and\n"
        "student scoring, steps, saving the version). Swap: feedback reply to the end of the\n"
        "first 16-token chat on the new version (includes the version check); its ratio to a\n"
        "warm chat is the cost of loading the new adapter weights.\n"
        "Short chat: 16 tokens; 'while training' is the median of chats that finished before\n"
        "an 8-step feedback step did, against the idle median."
    )


if __name__ == "__main__":
    main()
