"""Open Inference Protocol (v2) REST routes, as Triton and KServe serve them."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

import lotus
from serve.protocol import HEADER_LENGTH, infer_response, parse_infer
from serve.schemas import ErrorResponse, InferenceResponse, ModelMetadata, ServerMetadata, TensorMetadata
from serve.service import ServiceDep

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])
ERRORS = {400: {"model": ErrorResponse}, 401: {"model": ErrorResponse}, 404: {"model": ErrorResponse}}


@router.get("/health/live", summary="Server liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Server readiness (the model is loaded)", responses={503: {"model": ErrorResponse}})
async def ready(service: ServiceDep) -> Response:
    if not service.ready:
        return JSONResponse({"ready": False, "error": "the model is not loaded yet"}, 503)
    return JSONResponse({"ready": True})


@router.get("", summary="Server metadata", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    return ServerMetadata(name="lotus", version=lotus.__version__, extensions=["binary_tensor_data"])


@router.get("/models/{name}", summary="Model metadata", response_model=ModelMetadata, responses=ERRORS)
@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata (one version)",
    response_model=ModelMetadata,
    responses=ERRORS,
    include_in_schema=False,
)
async def model_metadata(name: str, service: ServiceDep, version: str | None = None) -> ModelMetadata:
    model = service.check_model(name, version)
    return ModelMetadata(
        name=name,
        versions=[service.settings.version],
        platform="onnxruntime_onnx",
        inputs=[TensorMetadata(name="pixel_values", datatype="FP32", shape=model.input_shape)],
        outputs=[TensorMetadata(name="logits", datatype="FP32", shape=[-1, len(model.classes)])],
        parameters={"drop": model.drop_parameter, **model.metadata},
    )


@router.get("/models/{name}/ready", summary="Model readiness", responses=ERRORS)
@router.get(
    "/models/{name}/versions/{version}/ready", summary="Model readiness (one version)", responses=ERRORS, include_in_schema=False
)
async def model_ready(name: str, service: ServiceDep, version: str | None = None) -> dict:
    service.check_model(name, version)
    return {"name": name, "ready": True}


@router.post(
    "/models/{name}/infer",
    summary="Inference",
    responses={200: {"model": InferenceResponse}, **{c: {"model": ErrorResponse} for c in (408, 413, 503, 504)}, **ERRORS},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}},
        }
    },
)
@router.post("/models/{name}/versions/{version}/infer", include_in_schema=False)
async def infer(name: str, request: Request, service: ServiceDep, version: str | None = None) -> Response:
    """Classify B images given as `pixel_values` FP32 [B, 3, H, W], normalised as the model's metadata says.

    The request-level parameter `drop` (default 0) skips that fraction of each image's patches,
    chosen by the model's class-token attention: less work, lower latency. The answer is the
    FP32 output `logits` [B, classes]. Triton's binary tensor extension is accepted both ways.
    """
    model = service.check_model(name, version)
    settings = service.settings
    body, ticket = await service.read_body(request)
    inference = await service.off_loop(parse_infer, body, request.headers.get(HEADER_LENGTH), model, settings.max_images)
    ticket.resize(len(inference.pixel_values))
    kept = model.patches_kept(inference.drop)
    service.metrics.drop.observe(inference.drop)
    service.metrics.images.labels("infer").inc(len(inference.pixel_values))
    logits = await service.run_model(request, inference.pixel_values, inference.drop)
    body, header_length = infer_response(logits, inference, name, settings.version, kept)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream", headers={"Inference-Header-Content-Length": str(header_length)})
