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
    service: Literal["local", "tinker"] = Field(
        "local", description="Training service: in-process (local) or hosted Tinker."
    )

    @property
    def model_cache_dir(self) -> Path:
        return self.data_dir / "models"

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
