"""`lotus serve`: an exported model over HTTP. Each flag is a field of serve.settings.Settings
(also read from LOTUS_<FIELD>), with its help and default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import user_errors
from serve.settings import Settings


def setting(name: str, *flags: str) -> Any:
    """The typer.Option of a Settings field: its description as help."""
    return typer.Option(*flags, help=Settings.model_fields[name].description)


def default(name: str) -> Any:
    return Settings.model_fields[name].default


ModelArg = Annotated[Path | None, typer.Argument(help="Exported ONNX model (default: the latest run's model.onnx).")]
AccessLogOpt = Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")]


@user_errors
def serve(
    model: ModelArg = None,
    host: Annotated[str, setting("host")] = default("host"),
    port: Annotated[int, setting("port")] = default("port"),
    workers: Annotated[int, setting("workers")] = default("workers"),
    name: Annotated[str, setting("name")] = default("name"),
    threads: Annotated[int | None, setting("threads")] = default("threads"),
    max_batch: Annotated[int, setting("max_batch")] = default("max_batch"),
    max_delay_ms: Annotated[float, setting("max_delay_ms")] = default("max_delay_ms"),
    batching: Annotated[bool, setting("batching", "--batching/--no-batching")] = default("batching"),
    spinning: Annotated[bool, setting("spinning", "--spinning/--no-spinning")] = default("spinning"),
    max_body_mb: Annotated[float, setting("max_body_mb")] = default("max_body_mb"),
    max_images: Annotated[int, setting("max_images")] = default("max_images"),
    max_pixels: Annotated[int, setting("max_pixels")] = default("max_pixels"),
    decode_threads: Annotated[int | None, setting("decode_threads")] = default("decode_threads"),
    max_queue_images: Annotated[int | None, setting("max_queue_images")] = default("max_queue_images"),
    timeout_ms: Annotated[float, setting("timeout_ms")] = default("timeout_ms"),
    max_header_kb: Annotated[float, setting("max_header_kb")] = default("max_header_kb"),
    header_timeout_s: Annotated[float, setting("header_timeout_s")] = default("header_timeout_s"),
    body_timeout_s: Annotated[float, setting("body_timeout_s")] = default("body_timeout_s"),
    keep_alive_s: Annotated[float, setting("keep_alive_s")] = default("keep_alive_s"),
    max_connections: Annotated[int, setting("max_connections")] = default("max_connections"),
    access_log: AccessLogOpt = True,
) -> None:
    """Serve an exported model over HTTP: Open Inference Protocol v2, /v1/classify, /metrics, /docs (LOTUS_API_KEY: bearer token)."""
    from serve.app import run_server
    from serve.settings import load_settings

    values = {k: v for k, v in locals().items() if k in Settings.model_fields}
    run_server(load_settings(**values), access_log=access_log)
