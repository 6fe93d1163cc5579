"""Shared fixtures: the real embedded model and the tiny random Llama, each loaded once.

The model cache lives in `<repo>/.cache/models` (override with CLAAS_TEST_MODEL_CACHE), so the
one-time GGUF conversion is shared by every test of a run and by later runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import settings

# pytest-xdist's controller loads this file too, and only then starts the workers; it runs no
# test. So the fixtures import claas (torch, transformers: 9 CPU-seconds) when they first run,
# in a worker, and the workers do not wait for the controller to import what it never uses.
if TYPE_CHECKING:
    from postgres import PostgresCluster
    from serving import LiveServer

    from claas.models import LoadedModel

REPO = Path(__file__).resolve().parent.parent

# CI replays the same property-test examples every run (a failure there is then reproducible);
# local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The `heavy` modules first, each in its collected order. `make test` hands the files out
    in this order (`--dist loadfile --no-loadscope-reorder`), so the two workers start on the
    long files and end on short ones together, not one worker alone on a long file at the end
    (xdist's own order, by count of tests, put the one- and two-test files last)."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(scope="session")
def model_cache() -> Path:
    return Path(os.environ.get("CLAAS_TEST_MODEL_CACHE", REPO / ".cache" / "models"))


@pytest.fixture(scope="session")
def tiny(model_cache: Path) -> LoadedModel:
    """Tiny random Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer."""
    from claas.models import tiny_llama

    return tiny_llama(model_cache, seed=0)


@pytest.fixture(scope="session")
def smol(model_cache: Path) -> LoadedModel:
    """The real embedded SmolLM2-135M-Instruct, on CPU."""
    from claas.models import load_model
    from claas.settings import EMBEDDED_MODEL

    return load_model(EMBEDDED_MODEL, model_cache, device="cpu")


@pytest.fixture
def server(tmp_path: Path, model_cache: Path) -> Iterator[LiveServer]:
    """A real server on 127.0.0.1 with the tiny model and a fresh data dir."""
    from serving import make_server

    live = make_server(tmp_path, model_cache, max_tokens_cap=256)
    yield live
    live.close()


@pytest.fixture
def keyed(tmp_path: Path, model_cache: Path) -> Iterator[LiveServer]:
    """A real server with the tiny model whose API keys are two owners' and an admin's
    (`serving.OWNER_KEYS`, `serving.ADMIN_KEY`): without a key, nothing is answered."""
    from serving import ADMIN_KEY, OWNER_KEYS, make_server

    live = make_server(tmp_path, model_cache, api_keys=OWNER_KEYS, admin_key=ADMIN_KEY)
    yield live
    live.close()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[LiveServer]:
    """One keyed server for a whole test module, for tests that each work on adapters of
    their own and so cannot see one another."""
    from serving import ADMIN_KEY, OWNER_KEYS, make_server

    live = make_server(
        tmp_path_factory.mktemp("shared"),
        model_cache,
        api_keys=OWNER_KEYS,
        admin_key=ADMIN_KEY,
        max_tokens_cap=256,
    )
    yield live
    live.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """One real PostgreSQL server for the whole run (Debian's package), stopped by its pid."""
    from postgres import PostgresCluster

    cluster = PostgresCluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database on each backend: a SQLite file, or a new database on the real
    PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'claas.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.database()
