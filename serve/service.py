"""What the routes share: the settings, the model, the batcher and the metrics (on app.state)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from serve.batching import Batcher
from serve.metrics import Metrics
from serve.model import InputError, ServedModel
from serve.settings import Settings


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    model: ServedModel | None = None  # set by the lifespan
    batcher: Batcher | None = None
    ready: bool = False

    def check_model(self, name: str, version: str | None = None) -> ServedModel:
        """The served model if `name` (and `version`, when given) is the one served; 404 otherwise."""
        if name != self.settings.name:
            raise InputError(f"unknown model {name!r}: this server serves {self.settings.name!r}", 404)
        if version is not None and version != self.settings.version:
            raise InputError(
                f"unknown version {version!r} of model {name!r}: this server serves version {self.settings.version!r}", 404
            )
        if not self.ready or self.model is None:
            raise InputError(f"model {name!r} is not ready", 503)
        return self.model


async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
