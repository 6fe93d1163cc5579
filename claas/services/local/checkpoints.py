"""Checkpoints of the local service: `local://<run>/<kind>/<name>` paths and atomic PEFT dirs.

A checkpoint is a directory in PEFT format (`adapter_config.json` + `adapter_model.safetensors`),
so vLLM and `PeftModel.from_pretrained` load it as is. A training-state checkpoint (`weights`)
also holds `optimizer.pt`; a sampler checkpoint (`sampler_weights`) does not. Every checkpoint
is written into a temp dir beside its final place and renamed into it, so a reader never sees a
half-written one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from claas.errors import CheckpointNotFound, InvalidRequest

SCHEME = "local://"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
OPTIMIZER_STATE = "optimizer.pt"
CLAAS_META = "claas_checkpoint.json"
CheckpointKind = Literal["weights", "sampler_weights"]
KINDS: tuple[CheckpointKind, ...] = ("weights", "sampler_weights")
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:16]}"


def check_segment(value: str, what: str) -> str:
    if not _SEGMENT.fullmatch(value):
        raise InvalidRequest(
            f"checkpoint {what} {value!r} is not allowed: use letters, digits, '_' and '-' "
            "(no dots or slashes), starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class CheckpointPath:
    run_id: str
    kind: CheckpointKind
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.run_id}/{self.kind}/{self.name}"

    @classmethod
    def parse(cls, path: str) -> CheckpointPath:
        parts = path.removeprefix(SCHEME).split("/") if path.startswith(SCHEME) else []
        if len(parts) != 3 or parts[1] not in KINDS:
            raise CheckpointNotFound(
                f"{path!r} is not a local checkpoint path; expected "
                f"'{SCHEME}<run>/weights/<name>' or '{SCHEME}<run>/sampler_weights/<name>', "
                "as returned by save_state / save_weights_for_sampler"
            )
        try:
            run_id, name = check_segment(parts[0], "run"), check_segment(parts[2], "name")
        except InvalidRequest as error:
            raise CheckpointNotFound(f"{path!r}: {error}") from error
        kind: CheckpointKind = "weights" if parts[1] == "weights" else "sampler_weights"
        return cls(run_id, kind, name)

    def directory(self, root: Path) -> Path:
        """The checkpoint's directory, guaranteed to lie inside `root`."""
        resolved = (root / self.run_id / self.kind / self.name).resolve()
        if not resolved.is_relative_to(root.resolve()):
            raise CheckpointNotFound(f"{self} points outside the storage dir; refusing it")
        return resolved


def lora_config_dict(
    base_model: str, rank: int, lora_alpha: float, target_modules: list[str]
) -> dict[str, Any]:
    """A minimal PEFT `adapter_config.json` for a LoRA on a causal LM."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }


def write_checkpoint(
    root: Path,
    path: CheckpointPath,
    adapter_config: dict[str, Any],
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    meta: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint atomically: temp dir, fsync, rename. Returns its directory."""
    final = path.directory(root)
    if final.exists() and not overwrite:
        raise InvalidRequest(
            f"checkpoint {path} already exists; choose another name or pass overwrite=True"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{path.name}-"))
    try:
        (staging / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))
        save_file(
            {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()},
            staging / ADAPTER_WEIGHTS,
            metadata={"format": "pt"},
        )
        if optimizer_state is not None:
            torch.save(optimizer_state, staging / OPTIMIZER_STATE)
        (staging / CLAAS_META).write_text(json.dumps(meta, indent=2))
        for file in staging.iterdir():
            with file.open("rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        _fsync_dirs(final.parent, final.parent.parent, root)  # make the rename durable
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _fsync_dirs(*directories: Path) -> None:
    for directory in directories:
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


@dataclass(frozen=True)
class LoadedCheckpoint:
    adapter_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    meta: dict[str, Any]


def require_checkpoint(root: Path, path: CheckpointPath, with_optimizer: bool) -> Path:
    """The checkpoint's directory, after a cheap check that its files exist."""
    directory = path.directory(root)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise CheckpointNotFound(
            f"checkpoint {path} does not exist; list the adapter's versions to find a valid one"
        )
    if with_optimizer and not (directory / OPTIMIZER_STATE).is_file():
        raise CheckpointNotFound(
            f"checkpoint {path} has no optimizer state (sampler weights?); load a "
            "save_state() checkpoint, or use create_training_client_from_state"
        )
    return directory


def read_checkpoint(root: Path, path: CheckpointPath, with_optimizer: bool) -> LoadedCheckpoint:
    directory = require_checkpoint(root, path, with_optimizer)
    optimizer_state = None
    if with_optimizer:
        optimizer_state = torch.load(directory / OPTIMIZER_STATE, weights_only=True)
    meta_file = directory / CLAAS_META
    return LoadedCheckpoint(
        adapter_config=json.loads((directory / ADAPTER_CONFIG).read_text()),
        weights=load_file(directory / ADAPTER_WEIGHTS),
        optimizer_state=optimizer_state,
        meta=json.loads(meta_file.read_text()) if meta_file.is_file() else {},
    )


def delete_checkpoint_dir(directory: Path) -> None:
    """Remove one checkpoint dir, then its kind and run dirs once they are empty."""
    shutil.rmtree(directory, ignore_errors=True)
    for parent in (directory.parent, directory.parent.parent):
        try:
            parent.rmdir()
        except OSError:  # not empty (other checkpoints, or a staging dir in use)
            break


def sweep_unreferenced(
    root: Path, referenced: set[str], older_than: float | None = None
) -> list[Path]:
    """Remove what a crash leaves under `root`: staging dirs, and checkpoints no version uses.

    A SIGKILL between writing a version's checkpoints and committing the version leaves whole
    checkpoint dirs that nothing points at, and one during a write leaves a `.name-*` staging
    dir. With `older_than` None, call this at start-up, before anything writes, with every path
    the store references. Where other processes write to `root` too (workers sharing it), pass
    `older_than` seconds: only what was last modified longer ago than that goes, so a version
    another worker is writing or about to register is left alone.
    """
    removed: list[Path] = []
    cutoff = None if older_than is None else time.time() - older_than
    if not root.is_dir():
        return removed
    for run in sorted(p for p in root.iterdir() if p.is_dir()):
        for kind in KINDS:
            kind_dir = run / kind
            if not kind_dir.is_dir():
                continue
            for entry in sorted(kind_dir.iterdir()):
                path = str(CheckpointPath(run.name, kind, entry.name))
                if entry.name.startswith(".") or path not in referenced:
                    if cutoff is not None and _modified(entry) > cutoff:
                        continue
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        for directory in (run / "weights", run / "sampler_weights", run):
            with contextlib.suppress(OSError):  # not empty, or not there
                directory.rmdir()
    return removed


def _modified(entry: Path) -> float:
    """The newest modification time in `entry` (a staging dir is written file by file)."""
    try:
        return max((p.stat().st_mtime for p in entry.rglob("*")), default=entry.stat().st_mtime)
    except OSError:  # removed meanwhile
        return time.time()
