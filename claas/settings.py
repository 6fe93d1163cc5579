"""All of claas's configuration, in one pydantic-settings class.

Values come, highest priority first, from: explicit arguments (the CLI), `CLAAS_*` environment
variables, an optional YAML file named by `CLAAS_CONFIG`, then the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

EMBEDDED_MODEL = "SmolLM2-135M-Instruct"


def default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "share"
    return base / "claas"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLAAS_", extra="forbid")

    model: str = Field(
        EMBEDDED_MODEL,
        description=(
            "Base model: the embedded default, a local Hugging Face model directory, "
            "or a Hugging Face id already in the local HF cache."
        ),
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Where the database, adapters and model cache live.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Torch device; auto picks CUDA when present, else CPU."
    )
    packed_weights: bool = Field(
        True,
        description="CPU, float32: chat decoding runs the linear layers on a second copy of "
        "their weights in oneDNN's layout (about 2x faster at a few rows; the copy doubles the "
        "linear weights' memory, and is skipped when it would not fit).",
    )
    service: Literal["local", "tinker"] = Field(
        "local", description="Training service: in-process (local) or hosted Tinker."
    )
    inference: Literal["local", "vllm"] = Field(
        "local",
        description="Who samples chat answers: the training service itself (local), or a vLLM "
        "server run outside claas (vllm, with --vllm-url); training is unchanged either way.",
    )
    vllm_url: str | None = Field(None, description="The vLLM server (with --inference vllm).")
    vllm_api_key: str | None = Field(None, description="Its API key, if it was started with one.")
    vllm_model: str | None = Field(
        None,
        description="vLLM's name of the base model (its --served-model-name); default: "
        "the base model's name.",
    )
    vllm_keep_loaded: int = Field(
        8, ge=1, le=1024, description="Adapter versions kept loaded in vLLM (least recent out)."
    )
    tinker_base_model: str | None = Field(
        None, description="Base model name on hosted Tinker (with --service tinker)."
    )
    allowed_base_models: list[str] = Field(
        default_factory=list,
        description="Base models adapters may be created on (default: the served model).",
    )

    host: str = Field("127.0.0.1", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind (0 picks a free one).")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description='API key -> owner, e.g. CLAAS_API_KEYS=\'{"sk-alice": "alice"}\'. A key '
        "reaches only its owner's adapters, rollouts and feedback.",
    )
    admin_key: str | None = Field(None, description="API key that reaches every owner.")
    insecure: bool = Field(
        False, description="Allow binding a non-loopback address without API keys."
    )

    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body.")
    max_messages: int = Field(256, ge=1, description="Most messages in one chat request.")
    max_tokens_cap: int = Field(2048, ge=1, description="Largest max_tokens a request may ask.")
    max_samples: int = Field(8, ge=1, le=64, description="Largest n of one chat request.")
    rollout_ttl_seconds: float = Field(
        7 * 24 * 3600.0, gt=0, description="How long a rollout can receive feedback."
    )
    max_coalesce: int = Field(
        8, ge=1, le=64, description="Most queued feedback requests trained as one batch."
    )
    purge_interval_seconds: float = Field(
        600.0, gt=0, description="How often expired rollouts are purged while serving."
    )
    memory_items: int = Field(
        256,
        ge=0,
        le=100_000,
        description="Lessons (prompt + feedback) each adapter remembers for replay, oldest "
        "forgotten first; 0 keeps none and replays none. Listed and forgotten under "
        "/v1/adapters/{owner}/{name}/memory, deleted with the adapter.",
    )
    # Beyond one box (README "Beyond one box"): a shared database, a shared checkpoint root,
    # API replicas that only queue feedback, and `claas worker` processes that train it.
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the database every process shares, e.g. "
        "postgresql+psycopg://claas:secret@db:5432/claas; default: the SQLite file "
        "<data_dir>/claas.db (one machine).",
    )
    checkpoint_dir: Path | None = Field(
        None,
        description="Where adapter versions are written, a filesystem every process mounts "
        "(NFS, a ReadWriteMany volume) when they run on several machines; default: "
        "<data_dir>/checkpoints.",
    )
    train: bool = Field(
        True,
        description="Train feedback in this process. False (`claas serve --no-train`): an API "
        "replica that queues feedback for `claas worker` processes.",
    )
    lease_seconds: float = Field(
        30.0,
        ge=2.0,
        le=3600.0,
        description="How long a worker's claim on a feedback batch lasts without a heartbeat "
        "(one every third of it); a worker that dies gives its batch back after this.",
    )
    poll_seconds: float = Field(
        1.0,
        gt=0,
        le=60.0,
        description="How often a worker looks for feedback queued by other processes, and a "
        "waiting request (?wait=true) re-reads its status on SQLite (PostgreSQL notifies).",
    )
    max_training_batches: int = Field(
        4,
        ge=1,
        le=64,
        description="Most feedback batches (each of one adapter) one process trains at once.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Level of the JSON log lines (stderr): claas's and uvicorn's."
    )

    # Per-owner quotas: one API key must not be able to fill the disk or the training queue.
    max_adapters_per_owner: int = Field(
        20, ge=1, description="Most adapters one owner may have (403 beyond it)."
    )
    max_lora_rank: int = Field(
        64, ge=1, le=256, description="Largest LoRA rank an adapter may ask for (422 beyond it)."
    )
    max_pending_feedback_per_owner: int = Field(
        32,
        ge=1,
        description="Most feedback requests one owner may have queued or running (429 beyond it).",
    )
    max_concurrent_generations_per_owner: int = Field(
        4,
        ge=1,
        description="Most chats and completions one owner may have generating at once, "
        "streamed or not (429 beyond it); base-model chats without an API key count as one "
        "owner.",
    )

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def database(self) -> str:
        """The database's URL: `database_url`, or the SQLite file in the data dir."""
        return self.database_url or f"sqlite:///{self.data_dir / 'claas.db'}"

    @property
    def checkpoints(self) -> Path:
        return self.checkpoint_dir or self.data_dir / "checkpoints"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get("CLAAS_CONFIG")
        if config_file:
            sources += (YamlConfigSettingsSource(settings_cls, yaml_file=config_file),)
        return sources
