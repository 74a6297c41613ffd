"""All configuration, read once at the edge (CLI and app factory) and passed down as objects."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """lookalike's settings; each can be set as an environment variable ``LOOKALIKE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", extra="ignore")

    catalog: Path = Path("data/catalog")
    profile: Literal["default", "offline"] = "default"
    visual_model: str | None = Field(None, description="hub id or local dir for the visual space")
    clip_model: str | None = Field(None, description="hub id or local dir for the clip space")
    text_model: str | None = Field(None, description="hub id or local dir for the text space")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: auto)")
    dtype: Literal["fp32", "bf16"] = "fp32"

    batch_size: int = Field(32, ge=1, le=4096)
    decode_workers: int = Field(2, ge=1, le=64)
    faiss_gpu: bool = False

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    @field_validator("catalog")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    def model_overrides(self) -> dict[str, str]:
        """Per-space model names given by the user (hub ids or local directories)."""
        given = {"visual": self.visual_model, "clip": self.clip_model, "text": self.text_model}
        return {space: model for space, model in given.items() if model}
