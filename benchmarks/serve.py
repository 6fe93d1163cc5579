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

`--backend vllm` measures the local backend and the vLLM backend side by side in one run instead:
vLLM is started with tests/vllm_server.py (on CLAAS_TEST_VLLM_PORT; stopped by its pid at the
end, even on error) unless `--vllm-url` names a running one, and two `claas serve` are started,
one with default inference and one with `CLAAS_INFERENCE=vllm`. The figures, alternated between
the two `--repeats` times (median, with the range): tokens/s of one streamed 128-token chat (on
the base model, and on an adapter); total tokens/s of 4 concurrent chats on 4 different
adapters; and the swap, from a feedback's reply to the first token served by the version it
trained. See benchmarks/vllm.md.

    .venv/bin/python benchmarks/serve.py --backend vllm [--vllm-url URL] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, redirect_stdout, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from claas.settings import EMBEDDED_MODEL, default_data_dir

ADAPTER = "bench/assistant"
STARTUP_SECONDS = 300.0
REQUEST_SECONDS = 600.0
TRAIN_SECONDS = 900.0
STEP_REPEATS = 5  # 8-step feedback steps alone and with a chat, alternated
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


def start_server(
    data_dir: Path, port: int, log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`claas serve` on CPU, with the default data dir's model cache linked into `data_dir`."""
    cached_models = default_data_dir() / "models"
    if cached_models.is_dir():
        (data_dir / "models").symlink_to(cached_models, target_is_directory=True)
    env = {
        **os.environ,
        "CLAAS_DATA_DIR": str(data_dir),
        "CLAAS_DEVICE": "cpu",
        # one owner ("bench") runs up to 8 chats at once here
        "CLAAS_MAX_CONCURRENT_GENERATIONS_PER_OWNER": "64",
        **(extra_env or {}),
    }
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
    body = {
        **chat_body(model, prompt, max_tokens),
        "stream": True,
        "stream_options": {"include_usage": True},
    }
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


@dataclass(frozen=True)
class Step:
    seconds: float  # finished_at - started_at
    finished_at: float


def long_step(client: httpx.Client, lora_id: str, meanwhile: Callable[[str], None]) -> Step:
    """An 8-step feedback step on a new adapter (so every such step does the same work: the
    same greedy answer, the same feedback); `meanwhile(feedback_id)` runs 1 s after it started
    (chats sent while it trains)."""
    client.post("/v1/adapters", json={"lora_id": lora_id}).raise_for_status()
    answer = chat(client, lora_id, LONG_PROMPT, 100)
    pending = feedback(client, answer.completion_id, {"steps_per_batch": 8}, wait=False)
    feedback_id = pending["feedback_id"]
    wait_until(
        "the feedback step to start",
        lambda: feedback_status(client, feedback_id)["status"] != "queued",
        TRAIN_SECONDS,
        poll=0.01,
    )
    time.sleep(1.0)
    meanwhile(feedback_id)
    wait_until(
        "the feedback step to finish",
        lambda: feedback_status(client, feedback_id)["status"] in ("done", "failed"),
        TRAIN_SECONDS,
        poll=0.05,
    )
    done = feedback_status(client, feedback_id)
    if done["status"] != "done":
        raise RuntimeError(f"feedback did not finish: {done}")
    return Step(done["finished_at"] - done["started_at"], done["finished_at"])


def median_chat(client: httpx.Client, model: str, repeats: int) -> float:
    return statistics.median(chat(client, model, SHORT_PROMPT, 16).seconds for _ in range(repeats))


@contextmanager
def claas_server(
    extra_env: dict[str, str] | None = None,
) -> Iterator[tuple[httpx.Client, float]]:
    """A healthy `claas serve` (client, seconds to healthy) on a temp data dir; stopped on exit."""
    with tempfile.TemporaryDirectory(prefix="claas-bench-") as tmp:
        data_dir, port = Path(tmp), free_port()
        log = data_dir / "server.log"
        server = start_server(data_dir, port, log, extra_env)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_SECONDS) as c:
                startup = wait_healthy(c, server, log)
                yield c, startup
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=["local", "vllm", "batching"],
        default="local",
        help="local: the figures of the docstring (default); vllm: local and vLLM side by side; "
        "batching: concurrent chats on different adapters against one (with --vllm-url: vLLM's "
        "figures beside them)",
    )
    parser.add_argument(
        "--vllm-url", help="a running vLLM server to use (default: start one, tests/vllm_server.py)"
    )
    parser.add_argument(
        "--vllm-model",
        default=VLLM_SERVED_NAME,
        help=f"vLLM's --served-model-name of the base model (default {VLLM_SERVED_NAME})",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="with --backend vllm: runs of each figure"
    )
    args = parser.parse_args()
    if args.backend == "vllm":
        compare(args.vllm_url, args.vllm_model, max(1, args.repeats))
        return
    if args.backend == "batching":
        batching(args.vllm_url, args.vllm_model, max(1, args.repeats))
        return
    with claas_server() as (client, startup):
        run(client, startup)


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

    # Chats while a longer feedback step trains: TTFT against idle, and the step against the
    # same step alone.
    idle_ttft = statistics.median(
        stream(client, ADAPTER, SHORT_PROMPT, 16)[0] for _ in range(STEP_REPEATS)
    )
    idle = median_chat(client, ADAPTER, 3)
    one_ttft: list[float] = []

    def one_chat(_: str) -> None:
        one_ttft.append(stream(client, ADAPTER, SHORT_PROMPT, 16)[0])

    # The step's time varies by tens of percent from run to run here: alternate, take medians.
    alone_runs, with_one_runs = [], []
    for i in range(STEP_REPEATS):
        alone_runs.append(long_step(client, f"bench/step-alone-{i}", lambda _: None).seconds)
        with_one_runs.append(long_step(client, f"bench/step-one-chat-{i}", one_chat).seconds)
    alone, with_one = statistics.median(alone_runs), statistics.median(with_one_runs)
    busy: list[tuple[float, float, float]] = []  # (wall end, TTFT, seconds) while training

    def back_to_back(feedback_id: str) -> None:
        deadline = time.perf_counter() + TRAIN_SECONDS
        while len(busy) < 5 and time.perf_counter() < deadline:
            if feedback_status(client, feedback_id)["status"] != "running":
                break
            ttft_busy, chatted = stream(client, ADAPTER, SHORT_PROMPT, 16)
            busy.append((time.time(), ttft_busy, chatted.seconds))

    with_five = long_step(client, "bench/step-back-to-back", back_to_back)
    overlapped = [(t, c) for end, t, c in busy if end <= with_five.finished_at]
    if not one_ttft or not overlapped:
        raise RuntimeError("no chat finished while the feedback step was training")
    during_ttft = statistics.median(t for t, _ in overlapped)
    during = statistics.median(c for _, c in overlapped)

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
        ("8-step feedback step, alone", f"{alone:.2f} s", f"median of {STEP_REPEATS}"),
        ("TTFT, short chat, idle", f"{idle_ttft * 1e3:.0f} ms", f"median of {STEP_REPEATS}"),
        (
            "TTFT, one chat mid-step",
            f"{statistics.median(one_ttft) * 1e3:.0f} ms",
            f"{statistics.median(one_ttft) / idle_ttft:.2f}x idle; the step took "
            f"{with_one:.2f} s ({with_one / alone:.2f}x alone); medians of {STEP_REPEATS}",
        ),
        (
            "TTFT, chats back to back",
            f"{during_ttft * 1e3:.0f} ms",
            f"{during_ttft / idle_ttft:.2f}x idle (median of {len(overlapped)}); the step "
            f"took {with_five.seconds:.2f} s ({with_five.seconds / alone:.2f}x alone)",
        ),
        (
            "short chat, back to back",
            f"{during * 1e3:.0f} ms",
            f"{during / idle:.2f}x idle, whole chat",
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
        "Feedback queue: started_at - created_at; train: finished_at - started_at (teacher\n"
        "scoring, steps, saving the version). Swap: feedback reply to the end of the\n"
        "first 16-token chat on the new version (includes the version check); its ratio to a\n"
        "warm chat is the cost of loading the new adapter weights.\n"
        "Short chat: 16 tokens, streamed. While training: an 8-step feedback step (each on a\n"
        "new adapter: the same answer and feedback each time) runs alone and with one chat\n"
        "sent 1 s into it, in turn, 5 times each (medians); then with chats sent back to back\n"
        "(the median of those that finished before the step).\n"
        "The step's time is finished_at - started_at."
    )


# -- --backend vllm: the local backend and vLLM side by side -----------------------------------
REPO = Path(__file__).resolve().parent.parent
VLLM_SERVED_NAME = "SmolLM2-135M-Instruct"  # tests/vllm_server.py's --served-model-name
USERS = [f"bench/user{i}" for i in range(len(PROMPTS))]  # one adapter per concurrent chat
SWAP_ADAPTER = "bench/swap"


@dataclass(frozen=True)
class Side:
    name: str
    client: httpx.Client
    startup: float


@dataclass(frozen=True)
class Swap:
    seconds: float  # feedback reply -> reply of a 1-token chat on the new version
    warm: float  # the same chat again, median of 3
    train: float  # finished_at - started_at
    reply_lag: float  # finished_at -> the feedback's reply (vLLM: loading the version into it)


def load_vllm_server() -> Any:
    """tests/vllm_server.py as a module (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location("vllm_server", REPO / "tests" / "vllm_server.py")
    if spec is None or spec.loader is None:
        raise RuntimeError("cannot load tests/vllm_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False  # our child (vllm_server.start ran in this process), reaped now
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (from /proc): the engine core vLLM forks, and its helpers."""
    found: list[int] = []
    todo = [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            try:
                pids = [int(p) for p in children.read_text().split()]
            except OSError:
                continue
            found += pids
            todo += pids
    return found


def stop_pid(pid: int) -> None:
    """SIGTERM to `pid` (SIGKILL after 30 s), then SIGKILL to any of its children left."""
    children = descendants(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(pid):
            break
        with suppress(ProcessLookupError):
            os.kill(pid, sig)
        with suppress(TimeoutError):
            wait_until(f"pid {pid} to exit", lambda: not alive(pid), 30.0, poll=0.2)
    for child in children:
        if alive(child):
            with suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


@contextmanager
def own_vllm() -> Iterator[tuple[str, str]]:
    """(URL, served name) of a vLLM that tests/vllm_server.py starts; stopped by its pid on exit."""
    server = load_vllm_server()
    pid_file = Path(server.STATE) / "server.pid"
    if pid_file.exists():
        other = int(pid_file.read_text())
        if alive(other):
            raise RuntimeError(
                f"{pid_file} names a running vLLM (pid {other}) that this run did not start; "
                "stop it (tests/vllm_server.py stop) or pass --vllm-url"
            )
        pid_file.unlink()  # stale: its process is gone
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as vLLM: TIME_WAIT is fine
        try:
            sock.bind(("127.0.0.1", server.PORT))
        except OSError:
            raise RuntimeError(
                f"port {server.PORT} is taken: set CLAAS_TEST_VLLM_PORT to a free port, or pass "
                "--vllm-url"
            ) from None
    pid: int | None = None
    try:
        with redirect_stdout(sys.stderr):  # it prints the URL; stdout is the table
            url = server.start(STARTUP_SECONDS)
        pid = int(pid_file.read_text())
        yield url, server.SERVED_NAME
    finally:
        if pid is None and pid_file.exists():  # start failed after writing it
            pid = int(pid_file.read_text())
        if pid is not None:
            stop_pid(pid)
            if pid_file.exists() and pid_file.read_text().strip() == str(pid):
                pid_file.unlink()
            progress(f"stopped vLLM (pid {pid}); its log: {Path(server.STATE) / 'server.log'}")


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def warm(client: httpx.Client, models: list[str]) -> None:
    for model in models:
        chat(client, model, SHORT_PROMPT, 1)


def one_stream(client: httpx.Client, model: str) -> tuple[float, float, int]:
    """(tokens/s over the whole stream, TTFT, tokens) of one streamed 128-token greedy chat."""
    ttft, streamed = stream(client, model, LONG_PROMPT, 128)
    return streamed.completion_tokens / streamed.seconds, ttft, streamed.completion_tokens


def concurrent_users(client: httpx.Client) -> tuple[float, int]:
    """(total tokens/s, tokens) of 4 concurrent 128-token chats, each on its own adapter."""
    warm(client, USERS)  # each adapter loaded (vLLM: in its LoRA cache) before the clock starts
    start = time.perf_counter()
    with ThreadPoolExecutor(len(USERS)) as pool:
        chats = list(pool.map(lambda u, p: chat(client, u, p, 128), USERS, PROMPTS))
    seconds = time.perf_counter() - start
    tokens = sum(c.completion_tokens for c in chats)
    return tokens / seconds, tokens


def swap(client: httpx.Client) -> Swap:
    """One default feedback step on SWAP_ADAPTER, then the first token of the version it made."""
    answered = chat(client, SWAP_ADAPTER, LONG_PROMPT, 100)
    done = feedback(client, answered.completion_id, {}, wait=True)
    done_at, done_wall = time.perf_counter(), time.time()
    if done["status"] != "done":
        raise RuntimeError(f"feedback did not finish: {done}")
    pinned = f"{SWAP_ADAPTER}@{done['version']}"  # the new version, without asking which it is
    chat(client, pinned, SHORT_PROMPT, 1)
    seconds = time.perf_counter() - done_at
    again = statistics.median(chat(client, pinned, SHORT_PROMPT, 1).seconds for _ in range(3))
    return Swap(
        seconds,
        again,
        done["finished_at"] - done["started_at"],
        done_wall - done["finished_at"],
    )


def compare(vllm_url: str | None, vllm_model: str, repeats: int) -> None:
    # A SIGTERM unwinds like Ctrl-C, so the servers (and vLLM) are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        if vllm_url is None:
            progress("starting vLLM (tests/vllm_server.py) ...")
            vllm_url, vllm_model = stack.enter_context(own_vllm())
        progress("starting claas serve (local inference) ...")
        local = Side("local", *stack.enter_context(claas_server({"CLAAS_INFERENCE": "local"})))
        progress(f"starting claas serve (vLLM inference, {vllm_url}) ...")
        vllm_env = {
            "CLAAS_INFERENCE": "vllm",
            "CLAAS_VLLM_URL": vllm_url,
            "CLAAS_VLLM_MODEL": vllm_model,
        }
        vllm = Side("vllm", *stack.enter_context(claas_server(vllm_env)))
        inference = vllm.client.get("/v1/health").json().get("inference") or {}
        if inference.get("status") != "ok":
            raise RuntimeError(f"the vLLM-backed claas does not serve from vLLM: {inference}")
        measure(local, vllm, vllm_url, repeats)


def measure(local: Side, vllm: Side, vllm_url: str, repeats: int) -> None:
    sides = (local, vllm)
    for side in sides:
        for lora_id in [*USERS, SWAP_ADAPTER]:
            side.client.post("/v1/adapters", json={"lora_id": lora_id}).raise_for_status()
        warm(side.client, [EMBEDDED_MODEL, *USERS, SWAP_ADAPTER])  # first kernels, first loads

    # Alternate the two (and which goes first), so a busy spell on the machine hits both.
    streams: dict[str, list[tuple[float, float, int]]] = {s.name: [] for s in sides}
    adapter_streams: dict[str, list[tuple[float, float, int]]] = {s.name: [] for s in sides}
    users: dict[str, list[tuple[float, int]]] = {s.name: [] for s in sides}
    swaps: dict[str, list[Swap]] = {s.name: [] for s in sides}
    for i in range(repeats):
        order = sides if i % 2 == 0 else sides[::-1]
        for side in order:
            streams[side.name].append(one_stream(side.client, EMBEDDED_MODEL))
            adapter_streams[side.name].append(one_stream(side.client, USERS[0]))
            progress(
                f"run {i + 1}/{repeats} {side.name}: 1 stream {streams[side.name][-1][0]:.1f}, "
                f"on an adapter {adapter_streams[side.name][-1][0]:.1f}"
            )
        for side in order:
            users[side.name].append(concurrent_users(side.client))
            progress(f"run {i + 1}/{repeats} {side.name}: 4 users {users[side.name][-1][0]:.1f}")
    for i in range(repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            swaps[side.name].append(swap(side.client))
            progress(f"run {i + 1}/{repeats} {side.name}: swap {swaps[side.name][-1].seconds:.3f}")

    def cell(values: list[float], digits: int) -> str:
        middle = f"{statistics.median(values):.{digits}f}"
        if len(values) == 1:
            return middle
        return f"{middle} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    def row(
        name: str, values: Callable[[str], list[float]], digits: int, higher_wins: bool
    ) -> tuple[str, str, str, str, str]:
        here, there = values("local"), values("vllm")
        ratio = statistics.median(here) / statistics.median(there)
        vllm_wins = ratio < 1 if higher_wins else ratio > 1
        gain = 1 / ratio if higher_wins else ratio
        faster = f"vllm {gain:.2f}x" if vllm_wins else f"local {1 / gain:.2f}x"
        return name, cell(here, digits), cell(there, digits), f"{ratio:.2f}", faster

    rows = [
        row("(a) 1 stream, tok/s", lambda n: [s[0] for s in streams[n]], 1, True),
        row("(a) same, on an adapter", lambda n: [s[0] for s in adapter_streams[n]], 1, True),
        row("(b) 4 users, total tok/s", lambda n: [u[0] for u in users[n]], 1, True),
        row("(c) swap, ms", lambda n: [w.seconds * 1e3 for w in swaps[n]], 0, False),
        row("TTFT, 1 stream, ms", lambda n: [s[1] * 1e3 for s in streams[n]], 0, False),
        row("1-token chat, warm, ms", lambda n: [w.warm * 1e3 for w in swaps[n]], 0, False),
        row("feedback train, s", lambda n: [w.train for w in swaps[n]], 2, False),
        row("train done -> reply, ms", lambda n: [w.reply_lag * 1e3 for w in swaps[n]], 0, False),
        row(
            "claas start to healthy, s",
            lambda n: [{"local": local, "vllm": vllm}[n].startup],
            1,
            False,
        ),
    ]
    tokens = {
        n: [sorted({run[-1] for run in runs[n]}) for runs in (streams, adapter_streams, users)]
        for n in streams
    }
    print(
        f"claas serve, {EMBEDDED_MODEL} on CPU, {os.cpu_count()} cores, over HTTP on loopback: "
        f"local inference vs vLLM ({vllm_url}); {repeats} runs of each, alternated; "
        "median (min-max)"
    )
    widths = [max(len(r[i]) for r in [*rows, HEADER]) for i in range(len(HEADER))]
    for name, *cells in [HEADER, *rows]:
        print(
            f"{name:{widths[0]}s}", *(f"{c:>{w}s}" for c, w in zip(cells, widths[1:], strict=True))
        )
    print(
        f"\ncompletion tokens per run (local, vllm): 1 stream {tokens['local'][0]}, "
        f"{tokens['vllm'][0]}; on an adapter {tokens['local'][1]}, {tokens['vllm'][1]}; 4 users "
        f"{tokens['local'][2]}, {tokens['vllm'][2]}\n"
        "(a) one streamed chat, 128 tokens greedy, on the base model and on an (untrained)\n"
        "adapter: completion tokens / the whole stream's time (claas gets vLLM's answer whole\n"
        "and sends it as one chunk, so vLLM's TTFT is the whole answer).\n"
        "(b) 4 concurrent 128-token chats, each on its own (untrained, version 1) adapter, all\n"
        "warmed first: total completion tokens / wall time.\n"
        "(c) from the reply of a feedback step (wait=true) to the reply of a 1-token chat on\n"
        "owner/name@N, the version it trained; 'warm' is that chat again. With vLLM the version\n"
        "is loaded into vLLM before the feedback replies: that is in 'train done -> reply'.\n"
        "local/vllm: the ratio of the medians (below 1 on tok/s, above 1 on times: vLLM wins)."
    )


HEADER = ("figure", "local", "vllm", "local/vllm", "faster")


# ---------------------------------------------------------------------------------------------
# --backend batching: many users on one box
# ---------------------------------------------------------------------------------------------
BATCH_ADAPTERS = [f"bench/u{i}" for i in range(8)]


def together(client: httpx.Client, models: list[str]) -> float:
    """Total completion tokens/s of one 128-token greedy chat per model, all sent at once."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(len(models))]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        chats = list(pool.map(lambda m, p: chat(client, m, p, 128), models, prompts))
    return sum(c.completion_tokens for c in chats) / (time.perf_counter() - start)


def batching(vllm_url: str | None, vllm_model: str, repeats: int) -> None:
    """Concurrent chats on different adapters, as ratios to one chat, in one run: claas's local
    inference, and (with --vllm-url) the same claas with vLLM sampling, beside it."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        sides = [Side("local", *stack.enter_context(claas_server({"CLAAS_INFERENCE": "local"})))]
        if vllm_url is not None:
            env = {
                "CLAAS_INFERENCE": "vllm",
                "CLAAS_VLLM_URL": vllm_url,
                "CLAAS_VLLM_MODEL": vllm_model,
            }
            sides.append(Side("vllm", *stack.enter_context(claas_server(env))))
        figures: dict[str, dict[str, list[float]]] = {}
        for side in sides:
            for lora_id in BATCH_ADAPTERS:
                side.client.post("/v1/adapters", json={"lora_id": lora_id}).raise_for_status()
            warm(side.client, [EMBEDDED_MODEL, *BATCH_ADAPTERS])
            figures[side.name] = {"base": [], "adapter": [], "4": [], "8": []}
        for i in range(repeats):
            for side in sides if i % 2 == 0 else sides[::-1]:
                runs = figures[side.name]
                runs["base"].append(together(side.client, [EMBEDDED_MODEL]))
                runs["adapter"].append(together(side.client, BATCH_ADAPTERS[:1]))
                runs["4"].append(together(side.client, BATCH_ADAPTERS[:4]))
                runs["8"].append(together(side.client, BATCH_ADAPTERS[:8]))
                progress(
                    f"run {i + 1}/{repeats} {side.name}: "
                    + ", ".join(f"{k} {v[-1]:.1f} tok/s" for k, v in runs.items())
                )
    print(
        f"claas serve, {EMBEDDED_MODEL} on CPU ({os.cpu_count()} cores), 128-token greedy chats "
        f"over HTTP, each on its own (untrained) adapter; median of {repeats} runs"
    )
    for name, runs in figures.items():
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(
            f"{name:6s} one chat: base {med['base']:.1f} tok/s, on an adapter "
            f"{med['adapter']:.1f} tok/s (adapter / base {med['adapter'] / med['base']:.2f}); "
            f"4 chats on 4 adapters {med['4']:.1f} tok/s ({med['4'] / med['adapter']:.2f}x one); "
            f"8 on 8 {med['8']:.1f} tok/s ({med['8'] / med['adapter']:.2f}x one)"
        )
    if "vllm" in figures:
        local = {k: statistics.median(v) for k, v in figures["local"].items()}
        vllm = {k: statistics.median(v) for k, v in figures["vllm"].items()}
        print(
            f"local / vLLM tok/s: one chat base {local['base'] / vllm['base']:.2f}, on an "
            f"adapter {local['adapter'] / vllm['adapter']:.2f}, 4 on 4 adapters "
            f"{local['4'] / vllm['4']:.2f}, 8 on 8 {local['8'] / vllm['8']:.2f}"
        )


if __name__ == "__main__":
    main()
