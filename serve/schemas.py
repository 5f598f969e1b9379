"""Request and response bodies: the Open Inference Protocol (v2) REST shapes and /v1/classify's;
`validation_message` turns pydantic's errors about them (or about the settings) into one line."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError

from lotus.drop import MAX_DROP


def validation_message(error: ValidationError | list[dict]) -> str:
    """Pydantic's errors as one line: 'inputs.0.shape: Field required; ...'."""
    errors = error.errors() if isinstance(error, ValidationError) else error
    parts = []
    for e in errors[:3]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query"))
        given = e.get("input")
        got = f" (got {given!r})" if isinstance(given, (str, int, float)) and len(repr(given)) < 40 else ""
        parts.append(f"{where}: {e['msg']}{got}" if where else e["msg"] + got)
    return "; ".join(parts) + (f" (and {len(errors) - 3} more)" if len(errors) > 3 else "")


class ErrorResponse(BaseModel):
    error: str = Field(description="What is wrong with the request.")


# Open Inference Protocol v2: https://github.com/kserve/open-inference-protocol/blob/main/specification/protocol/inference_rest.md


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1 for a dynamic axis.")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="The model's LOTUS metadata (preprocessing, classes...)."
    )


class RequestInput(BaseModel):
    name: str = Field(description="pixel_values")
    shape: list[int] = Field(description="[B, 3, H, W]: B images at the model's input size.")
    datatype: str = Field(description="FP32")
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the tensor follows the JSON in binary.")
    data: list[Any] | None = Field(
        None, description="The values in row-major order, flat or nested; normalised as the metadata says."
    )


class RequestOutput(BaseModel):
    name: str = Field(description="logits")
    parameters: dict[str, Any] | None = Field(None, description="binary_data: true to get the tensor in binary.")


class InferenceRequest(BaseModel):
    id: str | None = Field(None, description="Echoed in the response.")
    parameters: dict[str, Any] | None = Field(
        None, description=f"drop: fraction of each image's patches to skip, in [0, {MAX_DROP}] (default 0); binary_data_output."
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[float] | None = None


class InferenceResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = Field(None, description="drop and patches_kept, as applied.")
    outputs: list[ResponseOutput]


class Prediction(BaseModel):
    label: str = Field(description="Class name as the model's metadata labels it (the words of the data's classes.tsv, if any).")
    index: int = Field(description="Class index (the logit's position).")
    probability: float


class ClassifyResponse(BaseModel):
    model_config = {"protected_namespaces": ()}

    model_name: str
    predictions: list[Prediction] = Field(description="The top_k classes, most probable first.")
    drop: float
    patches_kept: int
    num_patches: int
    time_ms: float = Field(description="Server time from the request's arrival to the answer (decoding, batching, inference).")
