"""POST /v1/classify: an image file in, class names with probabilities out (for people and curl)."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Query, Request, UploadFile

from lotus.drop import MAX_DROP
from serve.schemas import ClassifyResponse, ErrorResponse, Prediction
from serve.service import ServiceDep

router = APIRouter(prefix="/v1", tags=["Classification"])


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={code: {"model": ErrorResponse} for code in (400, 401, 408, 413, 415, 503, 504)},
)
async def classify(
    request: Request,
    service: ServiceDep,
    file: Annotated[
        UploadFile, File(description="A JPEG or PNG image of any size; resized to the model's input as in training.")
    ],
    drop: Annotated[float, Query(ge=0, le=MAX_DROP, description="Fraction of the patches to skip (faster, less exact).")] = 0.0,
    top_k: Annotated[int, Query(ge=1, description="How many classes to answer, most probable first.")] = 5,
) -> ClassifyResponse:
    start = time.perf_counter()
    model = service.check_model(service.settings.name)
    data = await file.read()
    kept = model.patches_kept(drop)  # a merging model refuses a drop before any decoding
    # Decoding a large photo takes tens of ms: off the event loop, like inference.
    pixel_values = await service.off_loop(model.decode_image, data, service.settings.max_pixels)
    with service.admission.admit(1):
        service.metrics.drop.observe(drop)
        service.metrics.images.labels("classify").inc()
        logits = (await service.run_model(request, pixel_values[None], drop))[0].astype(np.float64)
    probabilities = np.exp(logits - logits.max())
    probabilities /= probabilities.sum()
    top = np.argsort(-probabilities)[: min(top_k, len(model.labels))]
    return ClassifyResponse(
        model_name=service.settings.name,
        predictions=[Prediction(label=model.labels[i], index=int(i), probability=float(probabilities[i])) for i in top],
        drop=drop,
        patches_kept=kept,
        num_patches=model.num_patches,
        time_ms=(time.perf_counter() - start) * 1000,
    )
