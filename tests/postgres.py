"""A real PostgreSQL for the tests: Debian's `postgresql` binaries, one cluster per test run.

`PostgresCluster.start` runs initdb in a temp dir and starts the server on a free loopback port
(as the `postgres` system user when the tests run as root, since initdb refuses root); `stop`
stops it by its pid. `database()` creates a fresh, empty database for one test and returns its
SQLAlchemy URL. `restart()` stops and starts the same cluster on the same port (the
"Postgres restarts mid-run" test).

    cluster = PostgresCluster.start()
    url = cluster.database()  # postgresql+psycopg://claas@127.0.0.1:PORT/test_1
    cluster.stop()
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from serving import free_port


def bin_dir() -> Path:
    """The newest installed PostgreSQL's bin dir (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError(
            "PostgreSQL is not installed: `make test` installs Debian's postgresql package "
            "(or run: apt-get install -y postgresql)"
        )
    return Path(initdb).resolve().parent


@dataclass
class PostgresCluster:
    root: Path
    port: int
    user: str | None  # the system user the server runs as (None: this process's)
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def start(cls) -> PostgresCluster:
        """initdb and start in a new temp dir of its own (the server's user must reach it, so
        not under pytest's private tmp dirs); `stop` removes it."""
        user = "postgres" if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="claas-postgres-"))
        if user is not None:
            record = pwd.getpwnam(user)
            os.chown(root, record.pw_uid, record.pw_gid)
        cluster = cls(root, free_port(), user)
        cluster._run(
            [str(bin_dir() / "initdb"), "-D", str(cluster.data), "-U", "claas", "-A", "trust"],
        )
        # Another process (a second pytest-xdist worker's cluster) may take the free port
        # before the server binds it: then another port.
        tries = 3
        while True:
            try:
                cluster._start()
                return cluster
            except subprocess.CalledProcessError:
                tries -= 1
                if tries == 0:
                    raise
                cluster.port = free_port()

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def admin_url(self) -> str:
        return f"postgresql://claas@127.0.0.1:{self.port}/postgres"

    def _run(self, command: list[str]) -> None:
        subprocess.run(
            command, check=True, capture_output=True, user=self.user, cwd=self.root, timeout=120
        )

    def _start(self) -> None:
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
        self._run(
            [
                str(bin_dir() / "pg_ctl"),
                "-D",
                str(self.data),
                "-o",
                options,
                "-l",
                str(self.root / "server.log"),
                "-w",
                "start",
            ]
        )

    def pid(self) -> int:
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self, remove: bool = True) -> None:
        """Stop the server by its pid (fast shutdown), wait for it to go, and (with `remove`)
        delete its dir."""
        self._stop()
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)

    def _stop(self) -> None:
        try:
            pid = self.pid()
        except (FileNotFoundError, ValueError):
            return
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        self._stop()
        self._start()

    def database(self) -> str:
        """A new empty database; its SQLAlchemy URL (psycopg 3)."""
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://claas@127.0.0.1:{self.port}/{name}"
