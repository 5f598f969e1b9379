"""`lotus serve`: an exported model over HTTP (the flags fill serve.settings.Settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cli.common import user_errors

ModelArg = Annotated[Path | None, typer.Argument(help="Exported ONNX model (default: the latest run's model.onnx).")]
HostOpt = Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")]
PortOpt = Annotated[int, typer.Option(help="TCP port.")]
WorkersOpt = Annotated[int, typer.Option(help="Worker processes, each with its own ONNX Runtime session.")]
NameOpt = Annotated[str, typer.Option(help="Model name in the URLs: /v2/models/NAME/infer.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads per worker (default: its own choice).")]
MaxBatchOpt = Annotated[int, typer.Option(help="Most images gathered into one ONNX Runtime call.")]
MaxDelayOpt = Annotated[float, typer.Option(help="Longest a request waits for others to join its batch, in ms.")]
BatchingOpt = Annotated[
    bool, typer.Option("--batching/--no-batching", help="Gather concurrent requests into one call (dynamic batching).")
]
SpinningOpt = Annotated[
    bool,
    typer.Option("--spinning/--no-spinning", help="Let ONNX Runtime's idle threads spin-wait: faster calls, more CPU burnt."),
]
MaxBodyOpt = Annotated[float, typer.Option(help="Largest request body in MB; larger ones get 413.")]
MaxImagesOpt = Annotated[int, typer.Option(help="Most images in one inference request.")]
MaxPixelsOpt = Annotated[int, typer.Option(help="Most pixels an uploaded image may have (image bombs get 413).")]
AccessLogOpt = Annotated[bool, typer.Option("--access-log/--no-access-log", help="Log every request.")]


@user_errors
def serve(
    model: ModelArg = None,
    host: HostOpt = "127.0.0.1",
    port: PortOpt = 8000,
    workers: WorkersOpt = 1,
    name: NameOpt = "lotus",
    threads: ThreadsOpt = None,
    max_batch: MaxBatchOpt = 32,
    max_delay_ms: MaxDelayOpt = 2.0,
    batching: BatchingOpt = True,
    spinning: SpinningOpt = False,
    max_body_mb: MaxBodyOpt = 8.0,
    max_images: MaxImagesOpt = 64,
    max_pixels: MaxPixelsOpt = 40_000_000,
    access_log: AccessLogOpt = True,
) -> None:
    """Serve an exported model over HTTP: Open Inference Protocol v2, /v1/classify, /metrics, /docs (LOTUS_API_KEY: bearer token)."""
    from serve.app import run_server
    from serve.settings import load_settings

    settings = load_settings(
        model=model,
        host=host,
        port=port,
        workers=workers,
        name=name,
        threads=threads,
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        batching=batching,
        spinning=spinning,
        max_body_mb=max_body_mb,
        max_images=max_images,
        max_pixels=max_pixels,
    )
    run_server(settings, access_log=access_log)
