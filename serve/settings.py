"""The service's settings: one pydantic BaseSettings, read from `LOTUS_*` environment variables.

`lotus serve` fills them from its flags; under `--workers N` every worker process reads the same
environment, so the flags reach all of them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lotus.errors import LotusError
from serve.schemas import validation_message


class Settings(BaseSettings):
    """Everything the service reads; each field is also the environment variable LOTUS_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="LOTUS_", frozen=True, protected_namespaces=())

    model: Path | None = Field(None, description="Exported ONNX model (default: the latest run's model.onnx).")
    name: str = Field("lotus", min_length=1, description="Model name in the URLs (/v2/models/NAME).")
    version: str = Field("1", description="Model version reported by the OIP metadata routes.")
    host: str = Field("127.0.0.1", description="Address to listen on (0.0.0.0: every interface).")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with its own ONNX Runtime session.")
    threads: int | None = Field(None, ge=1, description="ONNX Runtime intra-op threads per worker (default: its own choice).")
    spinning: bool = Field(
        False,
        description="Let ONNX Runtime's idle threads spin-wait: faster single calls, but they burn "
        "CPU the event loop may need (see lotus.runtime.ort_session).",
    )
    batching: bool = Field(True, description="Gather concurrent requests into one ONNX Runtime call.")
    max_batch: int = Field(32, ge=1, description="Most images in one ONNX Runtime call.")
    max_delay_ms: float = Field(2.0, ge=0, description="Longest a request waits for others to join its batch, in ms.")
    max_body_mb: float = Field(8.0, gt=0, description="Largest request body, in MB (10^6 bytes).")
    max_images: int = Field(64, ge=1, description="Most images in one inference request.")
    max_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Most pixels an uploaded image may decode to (a JPEG decodes at a reduced scale first); larger: 413.",
    )
    decode_threads: int | None = Field(
        None,
        ge=1,
        description="Images decoded and request bodies parsed at once, which bounds their memory (default: half the cores, at least 1).",
    )
    max_queue_images: int | None = Field(
        None,
        ge=1,
        description="Most images admitted and not yet answered; beyond it 503 with Retry-After (default: 2 s of the "
        "model's work measured at startup, at most half the deadline's, and at least max_images).",
    )
    timeout_ms: float = Field(
        30_000, gt=0, description="Deadline of a request from its arrival; work still queued then gets 504."
    )
    max_header_kb: float = Field(64, gt=0, description="Largest request head (request line and headers), in KB; larger: 431.")
    header_timeout_s: float = Field(10, gt=0, description="Longest wait for a request's headers once it starts; then 408.")
    body_timeout_s: float = Field(30, gt=0, description="Longest gap between the parts of a request body; then 408.")
    keep_alive_s: float = Field(5, gt=0, description="How long an idle keep-alive connection is held open.")
    max_connections: int = Field(1000, ge=1, description="Most open connections (and requests in progress); beyond it 503.")
    api_key: SecretStr | None = Field(None, description="When set (LOTUS_API_KEY), required as 'Authorization: Bearer KEY'.")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)

    @property
    def decode_workers(self) -> int:
        # Half the cores: the other half stays with the event loop and ONNX Runtime.
        return self.decode_threads or max(1, (os.cpu_count() or 2) // 2)

    @property
    def max_header_bytes(self) -> int:
        return int(self.max_header_kb * 1000)

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Settings:
        if self.max_queue_images is not None and self.max_queue_images < self.max_images:
            raise ValueError(
                f"max_queue_images ({self.max_queue_images}) must be at least max_images ({self.max_images}), "
                "or no full request could ever be admitted"
            )
        return self


def load_settings(**values: Any) -> Settings:
    """`Settings(**values)` (the rest from LOTUS_* variables), or a one-line LotusError naming the bad option."""
    try:
        return Settings(**values)
    except ValidationError as e:
        raise LotusError(f"invalid option: {validation_message(e)}") from None
