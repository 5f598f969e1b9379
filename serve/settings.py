"""The service's settings: one pydantic BaseSettings, read from `LOTUS_*` environment variables.

`lotus serve` fills them from its flags; under `--workers N` every worker process reads the same
environment, so the flags reach all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from lotus.errors import LotusError
from serve.schemas import validation_message


class Settings(BaseSettings):
    """Everything the service reads; each field is also the environment variable LOTUS_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="LOTUS_", frozen=True, protected_namespaces=())

    model: Path | None = Field(None, description="Exported ONNX model (default: the latest run's model.onnx).")
    name: str = Field("lotus", min_length=1, description="Model name in the URLs (/v2/models/NAME).")
    version: str = Field("1", description="Model version reported by the OIP metadata routes.")
    host: str = Field("127.0.0.1", description="Address to listen on.")
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
    max_pixels: int = Field(40_000_000, ge=1, description="Most pixels an uploaded image may decode to (image bombs).")
    api_key: SecretStr | None = Field(None, description="When set (LOTUS_API_KEY), required as 'Authorization: Bearer KEY'.")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1_000_000)


def load_settings(**values: Any) -> Settings:
    """`Settings(**values)` (the rest from LOTUS_* variables), or a one-line LotusError naming the bad option."""
    try:
        return Settings(**values)
    except ValidationError as e:
        raise LotusError(f"invalid option: {validation_message(e)}") from None
