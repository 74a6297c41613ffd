"""All configuration, read once at the edge (CLI and app factory) and passed down as objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from indexer.pipeline import default_decode_workers
from indexer.vector_index import IndexPolicy
from indexer.vector_store import StoreConfig
from recommender.generate import GenerationConfig


class Settings(BaseSettings):
    """lookalike's settings; each can be set as an environment variable ``LOOKALIKE_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="LOOKALIKE_", extra="ignore")

    catalog: Path = Path("data/catalog")
    profile: Literal["default", "offline"] = "default"
    visual_model: str | None = Field(None, description="hub id or local dir for the visual space")
    clip_model: str | None = Field(None, description="hub id or local dir for the clip space")
    text_model: str | None = Field(None, description="hub id or local dir for the text space")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ... (default: auto)")
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware has it

    batch_size: int = Field(32, ge=1, le=4096)
    decode_workers: int = Field(
        default_factory=default_decode_workers,
        ge=1,
        le=64,
        description="threads that decode, resize and crop images (default: cores, up to 16)",
    )
    faiss_gpu: bool = Field(
        False, description="build FAISS IVF indexes on GPU 0 (searches stay on the CPU)"
    )

    # -- vector store ---------------------------------------------------------------------
    vector_store: Literal["faiss", "milvus"] | None = Field(
        None,
        description="where a new catalog keeps its vectors (default faiss; an existing "
        "catalog keeps its own)",
    )
    milvus_uri: str | None = Field(
        None, description="Milvus server (http://host:19530); default: Lite, <catalog>/milvus.db"
    )
    milvus_token: str | None = Field(None, description="Milvus token (user:password or API key)")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="serving processes; each holds the catalog's indexes in memory and the "
        "sessions whose ids name it (service/workers.py)",
    )

    session_ttl_s: float = Field(
        default=3600.0, gt=0, description="a session idle this long ends (sessions live in memory)"
    )
    max_sessions: int = Field(
        default=1000,
        ge=1,
        le=10_000_000,
        description="live sessions a serving process keeps (the least recently used one ends "
        "past it); a session with full steering histories holds about 1 MB",
    )

    # -- HTTP service -------------------------------------------------------------------------
    max_upload_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="body limit of /v1/search, /knn-service"
    )
    max_json_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="body limit of every other endpoint"
    )
    worker_threads: int = Field(
        default=40, ge=1, le=1000, description="threads running blocking engine calls at once"
    )
    image_workers: int = Field(
        default=4, ge=1, le=64, description="uploaded images decoded at once (bounds memory)"
    )
    max_page: int = Field(default=100, ge=1, le=1000, description="most items a page may ask for")
    max_knn_results: int = Field(default=1000, ge=1, le=10_000, description="cap on num_images")
    rate_limit_per_s: float = Field(
        default=20.0, ge=0, description="sustained requests/s per client; 0 turns the limit off"
    )
    rate_limit_burst: int = Field(default=60, ge=1, description="requests a client may burst")
    rate_limit_clients: int = Field(
        default=100_000, ge=1, description="clients remembered (the least recent are dropped)"
    )
    trust_forwarded_for: bool = Field(
        default=False, description="identify clients by X-Forwarded-For (behind a trusted proxy)"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="origins allowed to call the API from a browser: comma-separated "
        "(https://a.example,https://b.example) or a JSON list",
    )
    image_url_fetch: bool = Field(
        default=False, description="let /knn-service fetch `image_url` (public addresses only)"
    )
    image_url_timeout_s: float = Field(default=10.0, gt=0, le=120)
    image_url_max_redirects: int = Field(default=3, ge=0, le=10)
    log_json: bool = Field(default=True, description="structured (JSON lines) logs from `serve`")
    access_log: bool = Field(
        default=True, description="a log line per request: method, route, status, duration"
    )

    # -- generation fallback (recommender/generate.py) ----------------------------------------
    generator: Literal["none", "sample", "diffusers"] = Field(
        default="none", description="what makes new images when a scroll runs dry"
    )
    generator_images: int = Field(default=8, ge=1, le=64, description="images per sparse page")
    generator_size: int | None = Field(
        default=None,
        ge=64,
        le=2048,
        description="side of generated images (default: 256 for sample, 512 for diffusers)",
    )
    generator_queue: int = Field(default=16, ge=1, le=10_000, description="jobs that may wait")
    generator_interval_s: float = Field(
        default=10.0, ge=0, description="least time between two jobs of one session"
    )
    generator_timeout_s: float = Field(default=300.0, gt=0, description="a job's time limit")
    generator_model: str | None = Field(
        default=None, description="diffusers pipeline: hub id or local dir (default SDXL-Turbo)"
    )
    generator_kind: Literal["auto", "sdxl", "kandinsky"] = "auto"
    generator_ip_adapter: str | None = Field(
        default=None, description="IP-Adapter repo or dir for SDXL (default h94/IP-Adapter)"
    )
    generator_image_encoder: str | None = Field(
        default=None, description="CLIP vision encoder of the IP-Adapter (default its ViT-H)"
    )
    generator_prior: str | None = Field(
        default=None, description="Kandinsky 2.2 prior, to condition on the prompt as well"
    )
    generator_steps: int | None = Field(default=None, ge=1, le=200)
    generator_guidance: float | None = Field(default=None, ge=0, le=50)
    generator_device: str | None = Field(default=None, description="cuda, cuda:1, cpu (auto)")
    generator_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"

    @field_validator("catalog")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()

    @model_validator(mode="after")
    def _one_worker_generates(self) -> Settings:
        if self.workers > 1 and self.generator != "none":
            raise ValueError(
                "generation needs a single worker (a generated image enters the index of the "
                "process that made it only): use --workers 1, or --generator none"
            )
        return self

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_from_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)  # a JSON error becomes a validation error
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value

    @field_validator("cors_origins")
    @classmethod
    def _no_wildcard_origin(cls, value: list[str]) -> list[str]:
        # A wildcard would let any web page drive a user's session from their browser.
        if "*" in value:
            raise ValueError("cors_origins must list origins explicitly; '*' is refused")
        return value

    def generation_config(self) -> GenerationConfig:
        """Bounds of the generation queue (recommender/generate.py)."""
        side = self.generator_size or (256 if self.generator == "sample" else 512)
        return GenerationConfig(
            images_per_job=self.generator_images,
            width=side,
            height=side,
            max_queued=self.generator_queue,
            session_interval_s=self.generator_interval_s,
            timeout_s=self.generator_timeout_s,
            encoder_device=self.device,
            encoder_dtype=self.dtype,
        )

    def diffusers_options(self) -> dict[str, object]:
        """The ``DiffusersConfig`` fields the user set (the rest keep their defaults)."""
        given = {
            "model": self.generator_model,
            "ip_adapter": self.generator_ip_adapter,
            "image_encoder": self.generator_image_encoder,
            "prior": self.generator_prior,
            "steps": self.generator_steps,
            "guidance_scale": self.generator_guidance,
            "device": self.generator_device,
        }
        options: dict[str, object] = {k: v for k, v in given.items() if v is not None}
        options.update(kind=self.generator_kind, dtype=self.generator_dtype)
        return options

    def store_config(self) -> StoreConfig | None:
        """The vector store asked for: a new catalog's kind, or where an existing Milvus
        catalog's server is. None: nothing asked (FAISS when new, as recorded when not)."""
        if self.vector_store is None and self.milvus_uri is None and self.milvus_token is None:
            return None
        return StoreConfig(self.vector_store or "milvus", self.milvus_uri, self.milvus_token)

    def index_policy(self) -> IndexPolicy:
        return IndexPolicy(use_gpu=self.faiss_gpu)

    def model_overrides(self) -> dict[str, str]:
        """Per-space model names given by the user (hub ids or local directories)."""
        given = {"visual": self.visual_model, "clip": self.clip_model, "text": self.text_model}
        return {space: model for space, model in given.items() if model}
