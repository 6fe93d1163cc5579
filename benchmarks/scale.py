"""Load through two API replicas and a worker on PostgreSQL, against one `claas serve`.

N simulated users, each with an adapter of its own, chat (and after every few answers give
feedback) for a fixed time, through the public HTTP API, against two deployments started here in
turn on the same model:

- **one box**: one `claas serve` (API and training in one process, SQLite), the embedded default;
- **scaled**: two `claas serve --no-train` replicas and one `claas worker`, on a PostgreSQL
  cluster this script starts (Debian's package, in a temp dir, on a free loopback port), users
  spread over the replicas round-robin, each feedback sent through the replica that did *not*
  serve the answer.

After the load window it waits for every accepted feedback request to finish, then prints per
deployment: chats, p50 and p95 chat latency, feedback accepted, trained (done), failed and lost
(accepted but never finished), feedback trained per minute, and errors (any answer that is not
2xx, or a connection error); then the scaled deployment's ratios to one box. Both deployments
share this machine's cores, so the ratios show what the extra processes cost on one box, not
what more machines buy.

    .venv/bin/python benchmarks/scale.py [--users 8] [--seconds 120] [--feedback-every 3]

Uses `tests/postgres.py` to run the cluster. Each process gets OMP_NUM_THREADS=1 unless set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from postgres import PostgresCluster, free_port

PROMPTS = [
    "Explain how a rainbow forms.",
    "Why do we need sleep?",
    "How does a bicycle stay upright?",
    "What is a good name for a cat?",
]
FEEDBACK = "Way too long. Answer in one short sentence."
TRAINING = {"steps_per_batch": 2}  # short steps, so the window trains many requests


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    accepted: list[tuple[str, str]] = field(default_factory=list)  # (replica url, feedback id)
    errors: list[str] = field(default_factory=list)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "claas.cli", *args], env=env, stdout=out, stderr=out
        )


async def ready(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url} exited:\n{log.read_text()[-2000:]}")
            try:
                if (await client.get(f"{url}/v1/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError(f"{url} did not start")


async def user(
    index: int, replicas: list[str], seconds: float, every: int, tally: Tally, bar: tqdm[Any]
) -> None:
    lora_id = f"user{index}/bot"
    home = replicas[index % len(replicas)]
    async with httpx.AsyncClient(timeout=600) as client:
        created = await client.post(f"{home}/v1/adapters", json={"lora_id": lora_id, "rank": 8})
        if created.status_code != 201:
            tally.errors.append(f"create {created.status_code}: {created.text[:200]}")
            return
        deadline = time.monotonic() + seconds
        turn = 0
        while time.monotonic() < deadline:
            served_by = replicas[(index + turn) % len(replicas)]
            body = {
                "model": lora_id,
                "messages": [{"role": "user", "content": PROMPTS[turn % len(PROMPTS)]}],
                "max_tokens": 24,
                "temperature": 0.7,
            }
            started = time.perf_counter()
            try:
                answer = await client.post(f"{served_by}/v1/chat/completions", json=body)
            except httpx.HTTPError as error:
                tally.errors.append(f"chat {type(error).__name__}")
                continue
            if answer.status_code != 200:
                tally.errors.append(f"chat {answer.status_code}: {answer.text[:200]}")
                continue
            tally.latencies.append(time.perf_counter() - started)
            bar.update()
            turn += 1
            if turn % every:
                continue
            through = replicas[(index + turn) % len(replicas)]  # the other replica, if two
            item = {
                "completion_id": answer.json()["id"],
                "feedback": FEEDBACK,
                "training": TRAINING,
            }
            sent = await client.post(f"{through}/v1/feedback", json={"items": [item]})
            if sent.status_code != 202:
                tally.errors.append(f"feedback {sent.status_code}: {sent.text[:200]}")
                continue
            tally.accepted.append((through, sent.json()["feedback_id"]))


async def drain(tally: Tally, timeout: float) -> dict[str, int]:
    """Wait until every accepted request is done or failed; count each final status."""
    statuses: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=30) as client:
        while time.monotonic() < deadline:
            for url, feedback_id in tally.accepted:
                if statuses.get(feedback_id) in ("done", "failed"):
                    continue
                reply = await client.get(f"{url}/v1/feedback/{feedback_id}")
                statuses[feedback_id] = reply.json()["status"] if reply.status_code == 200 else "?"
            if all(statuses.get(i) in ("done", "failed") for _, i in tally.accepted):
                break
            await asyncio.sleep(1)
    counts = {"done": 0, "failed": 0, "lost": 0}
    for _, feedback_id in tally.accepted:
        status = statuses.get(feedback_id)
        counts[status if status in ("done", "failed") else "lost"] += 1
    return counts


async def load(
    name: str, replicas: list[str], users: int, seconds: float, every: int
) -> dict[str, Any]:
    tally = Tally()
    with tqdm(desc=f"{name}: chats", unit="chat") as bar:
        await asyncio.gather(*(user(i, replicas, seconds, every, tally, bar) for i in range(users)))
    started = time.monotonic()
    counts = await drain(tally, timeout=1800)
    drained = time.monotonic() - started
    latencies = sorted(tally.latencies)
    return {
        "deployment": name,
        "chats": len(latencies),
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
        "accepted": len(tally.accepted),
        **counts,
        "per_minute": 60 * counts["done"] / (seconds + drained),
        "errors": len(tally.errors),
        "first_errors": tally.errors[:3],
    }


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def one_box(root: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "one-box.log"
    process = spawn(["serve", "--port", str(port)], {**env, "CLAAS_DATA_DIR": str(root)}, log)
    try:
        await ready(url, process, log)
        return await load("one box", [url], args.users, args.seconds, args.feedback_every)
    finally:
        stop([process])


async def scaled(root: Path, env: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    cluster = PostgresCluster.start()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        shared = {**env, "CLAAS_DATA_DIR": str(root), "CLAAS_DATABASE_URL": cluster.database()}
        urls = []
        for name in ("api-1", "api-2"):
            port = free_port()
            log = root / f"{name}.log"
            processes.append(spawn(["serve", "--no-train", "--port", str(port)], shared, log))
            urls.append(f"http://127.0.0.1:{port}")
            await ready(urls[-1], processes[-1], log)
        processes.append(spawn(["worker"], shared, root / "worker.log"))
        return await load("scaled", urls, args.users, args.seconds, args.feedback_every)
    finally:
        stop(processes)
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=120.0, help="the load window")
    parser.add_argument("--feedback-every", type=int, default=3, help="chats per feedback")
    args = parser.parse_args()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "CLAAS_MAX_PENDING_FEEDBACK_PER_OWNER": "256",
        "CLAAS_LOG_LEVEL": "warning",
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="claas-scale-") as tmp:
        # One data dir for both (the model cache is converted once); their databases differ.
        rows.append(asyncio.run(one_box(Path(tmp), env, args)))
        rows.append(asyncio.run(scaled(Path(tmp), env, args)))
    print(
        f"\n{args.users} users, {args.seconds:.0f} s of load, feedback after every "
        f"{args.feedback_every} chats ({TRAINING}), on {os.cpu_count()} cores\n"
    )
    header = "| deployment | chats | p50 s | p95 s | feedback accepted | done | failed | lost |"
    print(header + " trained/min | errors |")
    print("|---" * 10 + "|")
    for row in rows:
        print(
            f"| {row['deployment']} | {row['chats']} | {row['p50']:.2f} | {row['p95']:.2f} | "
            f"{row['accepted']} | {row['done']} | {row['failed']} | {row['lost']} | "
            f"{row['per_minute']:.1f} | {row['errors']} |"
        )
    single, scale = rows
    print(
        f"\nscaled / one box: p50 {scale['p50'] / single['p50']:.2f}x, p95 "
        f"{scale['p95'] / single['p95']:.2f}x, feedback trained per minute "
        f"{scale['per_minute'] / max(single['per_minute'], 1e-9):.2f}x"
    )
    for row in rows:
        if row["first_errors"]:
            print(f"{row['deployment']} errors (first 3): {row['first_errors']}")


if __name__ == "__main__":
    main()
