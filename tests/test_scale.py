"""Beyond one box, for real: API replicas (`claas serve --no-train`) and `claas worker`
processes on one real PostgreSQL (`conftest.postgres`), the tiny model, real SIGKILLs.

No fakes: every process is a real `python -m claas.cli`, the database is Debian's PostgreSQL,
and what the test checks it reads from that database.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from postgres import PostgresCluster
from serving import HELLO, free_port, save_tiny_model, wait_healthy
from sqlalchemy import select

from claas.errors import DatabaseUnavailable
from claas.records import PENDING
from claas.store import Store
from claas.store.tables import feedback

pytestmark = pytest.mark.heavy

GUARD = 600.0  # seconds: the whole run must finish well within it on 2 loaded cores
LEASE = 4.0


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=30)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture(scope="module")
def tiny_dir(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(model_cache, tmp_path_factory.mktemp("tiny-model"))


class Cluster:
    """The processes of one deployment: what they share is the database URL and the
    checkpoint root; each has its own data dir (model cache, logs)."""

    def __init__(self, root: Path, model_dir: Path, database: str) -> None:
        self.root, self.model_dir = root, model_dir
        self.env = {
            **os.environ,
            "CLAAS_DATABASE_URL": database,
            "CLAAS_CHECKPOINT_DIR": str(root / "checkpoints"),
            "CLAAS_LEASE_SECONDS": str(LEASE),
            "CLAAS_POLL_SECONDS": "0.2",
            "CLAAS_MAX_PENDING_FEEDBACK_PER_OWNER": "64",
            "OMP_NUM_THREADS": "1",
        }
        self.processes: list[Process] = []
        # One client for every call (threads share it): `httpx.post` builds a client, and
        # loads the CA bundle, on every call.
        self.http = httpx.Client()  # httpx's default timeout, as `httpx.post` had

    def _spawn(self, name: str, args: list[str]) -> Process:
        log = self.root / f"{name}.log"
        env = {**self.env, "CLAAS_DATA_DIR": str(self.root / name)}
        with log.open("wb") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "claas.cli", *args, "--model", str(self.model_dir)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def api(self, name: str) -> str:
        port = free_port()
        process = self._spawn(name, ["serve", "--no-train", "--port", str(port)])
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process.popen, timeout=180, output=process.output)
        return url

    def worker(self, name: str) -> tuple[Process, str]:
        """A started worker, and its name in the database (`host:pid:suffix`)."""
        process = self._spawn(name, ["worker"])
        deadline = time.monotonic() + 180
        while "claas worker " not in (text := process.output()):
            assert process.popen.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        line = next(x for x in text.splitlines() if x.startswith("claas worker "))
        return process, line.split()[2]

    def close(self) -> None:
        for process in self.processes:
            process.kill()
        self.http.close()


@pytest.fixture
def cluster(tmp_path: Path, tiny_dir: Path, postgres: PostgresCluster) -> Iterator[Cluster]:
    deployment = Cluster(tmp_path, tiny_dir, postgres.database())
    yield deployment
    deployment.close()


def rows(store: Store) -> list[Any]:
    """Every feedback row with its arrival order and claim, read from the database (retried
    while it restarts)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            with store._reading() as db:
                return list(db.execute(select(feedback).order_by(feedback.c.seq)).all())
        except DatabaseUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.5)


def test_two_replicas_and_two_workers_lose_nothing_through_sigkills_and_a_postgres_restart(
    cluster: Cluster, postgres: PostgresCluster
) -> None:
    # The four processes start at once: each is seconds of imports and model loading.
    with ThreadPoolExecutor(4) as starting:
        replicas_started = starting.map(cluster.api, ["api-a", "api-b"])
        workers_started = starting.map(cluster.worker, ["worker-1", "worker-2"])
        replicas, workers = list(replicas_started), list(workers_started)
    a, b = replicas
    lora_ids = [f"team/a{i}" for i in range(4)]
    for lora_id in lora_ids:
        assert (
            cluster.http.post(f"{a}/v1/adapters", json={"lora_id": lora_id, "rank": 4}).status_code
            == 201
        )
    # One answer per adapter from each replica; its feedback goes through the *other* replica.
    completion = {
        (lora_id, url): cluster.http.post(
            f"{url}/v1/chat/completions",
            json={"model": lora_id, "messages": HELLO, "max_tokens": 8},
            timeout=120,
        ).json()["id"]
        for lora_id in lora_ids
        for url in replicas
    }

    def send(n: int) -> str:
        lora_id, served_by = lora_ids[n % 4], replicas[(n // 4) % 2]
        through = b if served_by == a else a
        item = {
            "completion_id": completion[(lora_id, served_by)],
            "feedback": f"shorter, please ({n})",
            # Steps enough that a batch is still training between the test seeing it running
            # and killing its worker (milliseconds apart); more only add training time.
            "training": {"steps_per_batch": 6},
        }
        answer = cluster.http.post(f"{through}/v1/feedback", json={"items": [item]}, timeout=120)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["feedback_id"])

    # `?wait=true` on a replica that trains nothing returns once a worker has trained it
    # (woken by PostgreSQL's notice).
    waited = cluster.http.post(
        f"{a}/v1/feedback?wait=true",
        json={"items": [{"completion_id": completion[(lora_ids[0], b)], "feedback": "hi"}]},
        timeout=300,
    )
    assert waited.status_code == 200 and waited.json()["status"] == "done", waited.text
    assert waited.json()["version"] == 2
    with ThreadPoolExecutor(16) as pool:
        sent = list(pool.map(send, range(40)))
    store = Store(cluster.env["CLAAS_DATABASE_URL"])
    try:
        # SIGKILL a worker in the middle of a step: the first request seen running under it.
        names = {name: process for process, name in workers}
        deadline = time.monotonic() + GUARD
        while True:
            running = [r for r in rows(store) if r.status == "running" and r.worker in names]
            if running:
                break
            assert time.monotonic() < deadline, "no request was ever seen training"
            time.sleep(0.05)
        victim = running[0].worker
        killed = [r.id for r in running if r.worker == victim]
        names[victim].kill()
        survivor = next(name for name in names if name != victim)

        # SIGKILL replica B: A keeps serving, and B's requests are trained all the same.
        next(p for p in cluster.processes if p.name == "api-b").kill()
        chat = cluster.http.post(
            f"{a}/v1/chat/completions",
            json={"model": lora_ids[0], "messages": HELLO, "max_tokens": 4},
            timeout=120,
        )
        assert chat.status_code == 200, chat.text

        postgres.restart()  # every process loses its connections mid-run

        while True:
            final = rows(store)
            if not any(r.status in PENDING for r in final):
                break
            assert time.monotonic() < deadline, [(r.id, r.status) for r in final]
            time.sleep(0.5)
        assert cluster.http.get(f"{a}/v1/health", timeout=30).status_code == 200  # reconnected
    finally:
        store.close()

    by_id = {r.id: r for r in final if r.id != waited.json()["feedback_id"]}
    assert sorted(by_id) == sorted(sent)  # nothing lost, nothing invented
    assert [r.id for r in final if r.status != "done"] == []
    # The killed worker's batch was trained exactly once, by the other worker.
    assert all(by_id[i].worker == survivor and by_id[i].version for i in killed)
    for lora_id in lora_ids:
        mine = [r for r in final if r.lora_id == lora_id and r.id in by_id]  # arrival order
        versions = [r.version for r in mine]
        assert versions == sorted(versions), versions  # trained in arrival order
        made = sorted(set(versions))
        start = 3 if lora_id == lora_ids[0] else 2
        assert made == list(range(start, start + len(made)))  # contiguous: none trained twice
        listed = cluster.http.get(f"{a}/v1/adapters/{lora_id}").json()["versions"]
        first = [2] if lora_id == lora_ids[0] else []  # the request that was waited for
        assert [v["version"] for v in listed] == [1, *first, *made]
        heads = defaultdict(list)
        for r in mine:
            heads[r.version].append(r.coalesced_into or r.id)
        for version in listed[len(first) + 1 :]:  # each version is one batch, named by its head
            assert set(heads[version["version"]]) == {version["feedback_id"]}

    # What the killed worker left in the shared checkpoint root is swept by the live one.
    checkpoints = cluster.root / "checkpoints"
    with Store(cluster.env["CLAAS_DATABASE_URL"]) as reader:
        referenced = reader.checkpoint_paths()
    deadline = time.monotonic() + 120
    while (
        on_disk := {f"local://{p.relative_to(checkpoints)}" for p in checkpoints.glob("*/*/*")}
    ) != referenced:
        assert time.monotonic() < deadline, sorted(on_disk - referenced)
        time.sleep(0.5)


def test_a_replica_and_a_worker_on_one_sqlite_file(tmp_path: Path, tiny_dir: Path) -> None:
    """One machine, two processes, the default SQLite database in a shared data dir: the
    replica queues, the worker trains, and `?wait=true` on the replica returns by polling."""
    deployment = Cluster(tmp_path, tiny_dir, f"sqlite:///{tmp_path / 'shared.db'}")
    try:
        with ThreadPoolExecutor(2) as starting:  # at once, as on a fresh data dir
            worker = starting.submit(deployment.worker, "worker")
            url = deployment.api("api")
            worker.result()
        assert deployment.http.post(
            f"{url}/v1/adapters", json={"lora_id": "solo/a", "rank": 4}
        ).is_success
        answer = deployment.http.post(
            f"{url}/v1/chat/completions",
            json={"model": "solo/a", "messages": HELLO, "max_tokens": 8},
            timeout=120,
        ).json()["id"]
        for version in (2, 3):
            waited = deployment.http.post(
                f"{url}/v1/feedback?wait=true",
                json={"items": [{"completion_id": answer, "feedback": f"shorter {version}"}]},
                timeout=300,
            )
            assert waited.status_code == 200, waited.text
            assert (waited.json()["status"], waited.json()["version"]) == ("done", version)
        # The replica serves the worker's newest version on its next chat.
        again = deployment.http.post(
            f"{url}/v1/chat/completions",
            json={"model": "solo/a", "messages": HELLO, "max_tokens": 4},
            timeout=120,
        ).json()["id"]
        with Store(deployment.env["CLAAS_DATABASE_URL"]) as store:
            assert store.get_rollout(again).adapter_version == 3
    finally:
        deployment.close()
