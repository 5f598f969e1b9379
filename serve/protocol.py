"""Open Inference Protocol (v2) infer bodies <-> arrays, in JSON or with the binary tensor extension.

The binary tensor extension (Triton's, which its HTTP client uses by default) puts the JSON first
and the raw little-endian tensor bytes after it; the `Inference-Header-Content-Length` header says
where the JSON ends, and `binary_data_size` in a tensor's parameters says how many bytes it has.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np
from pydantic import ValidationError

from lotus.drop import MAX_DROP
from serve.errors import InputError
from serve.model import ServedModel
from serve.schemas import InferenceRequest, RequestInput, validation_message

HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class Inference:
    pixel_values: np.ndarray  # (B, 3, H, W) float32
    drop: float
    id: str | None
    binary_output: bool  # answer with the binary tensor extension


def parse_drop(value: object) -> float:
    """The request's `drop` parameter (0 when absent), once it is a number in [0, MAX_DROP]."""
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"parameters.drop must be a number in [0, {MAX_DROP}], not {value!r}")
    if not 0 <= value <= MAX_DROP:
        raise InputError(f"parameters.drop {value} is outside [0, {MAX_DROP}]")
    return float(value)


def parse_infer(body: bytes, header_length: str | None, model: ServedModel, max_images: int) -> Inference:
    """An infer request body -> the (B, 3, H, W) input and its drop ratio, or an InputError."""
    body, binary = split_binary(body, header_length)
    request = parse_request(body)
    tensor = pixel_values_tensor(request, model.img_size, max_images)
    if (tensor.parameters or {}).get("binary_data_size") is not None:
        pixel_values = binary_values(tensor, binary)
    else:
        pixel_values = json_values(tensor)
    if not np.isfinite(pixel_values).all():
        raise InputError("pixel_values holds NaN or infinite values (or values too large for FP32)")
    for output in request.outputs or []:
        if output.name != "logits":
            raise InputError(f"the model has one output, 'logits', not {output.name!r}")
    parameters = request.parameters or {}
    binary_output = bool(parameters.get("binary_data_output", False)) or any(
        bool((o.parameters or {}).get("binary_data", False)) for o in request.outputs or []
    )
    return Inference(np.ascontiguousarray(pixel_values), parse_drop(parameters.get("drop")), request.id, binary_output)


def split_binary(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part of a body and the binary tensor bytes after it (none without the header)."""
    if header_length is None:
        return body, b""
    try:
        split = int(header_length)
    except ValueError:
        raise InputError(f"Inference-Header-Content-Length {header_length!r} is not a number of bytes") from None
    if not 0 < split <= len(body):
        raise InputError(f"Inference-Header-Content-Length {split} does not fit the {len(body)}-byte body")
    return body[:split], body[split:]


def parse_request(body: bytes) -> InferenceRequest:
    """The JSON part of an infer body, validated against the OIP request schema."""
    if not body:
        raise InputError("the request has no body: send an inference request (JSON with 'inputs')")
    try:
        return InferenceRequest.model_validate_json(body)
    except ValidationError as e:
        raise InputError(f"not a valid inference request: {validation_message(e)}") from None


def pixel_values_tensor(request: InferenceRequest, img_size: int, max_images: int) -> RequestInput:
    """The request's one input, once its name, datatype and shape fit the model."""
    names = [i.name for i in request.inputs]
    if names != ["pixel_values"]:
        raise InputError(f"the model takes one input, 'pixel_values'; the request has {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InputError(f"pixel_values must be FP32, not {tensor.datatype}")
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [3, img_size, img_size] or shape[0] < 1:
        raise InputError(f"pixel_values must have shape [B, 3, {img_size}, {img_size}] with B >= 1, not {shape}")
    if shape[0] > max_images:
        raise InputError(f"{shape[0]} images in one request is over the limit of {max_images} (--max-images)", 413)
    return tensor


def binary_values(tensor: RequestInput, binary: bytes) -> np.ndarray:
    """The tensor from the bytes after the JSON (binary tensor extension)."""
    count = math.prod(tensor.shape)
    binary_size = tensor.parameters["binary_data_size"]
    if tensor.data is not None:
        raise InputError("pixel_values has both data and binary_data_size: send one of them")
    if binary_size != count * 4 or len(binary) != binary_size:
        raise InputError(
            f"pixel_values {tensor.shape} needs {count * 4} bytes of FP32; binary_data_size is {binary_size} "
            f"and {len(binary)} bytes follow the JSON"
        )
    return np.frombuffer(binary, dtype="<f4").reshape(tensor.shape)


def json_values(tensor: RequestInput) -> np.ndarray:
    """The tensor from its JSON `data`, flat or nested."""
    if tensor.data is None:
        raise InputError("pixel_values has no data")
    try:
        values = np.asarray(tensor.data)
    except (ValueError, TypeError, OverflowError):
        raise InputError("pixel_values data is not a rectangular array of numbers") from None
    if values.dtype.kind not in "fiu":
        raise InputError("pixel_values data must hold only numbers")
    count = math.prod(tensor.shape)
    if values.size != count:
        raise InputError(f"pixel_values data has {values.size} values; shape {tensor.shape} needs {count}")
    with np.errstate(over="ignore"):  # values beyond FP32 become inf, refused by parse_infer
        return values.astype(np.float32).reshape(tensor.shape)


def infer_response(
    logits: np.ndarray, inference: Inference, model_name: str, version: str, patches_kept: int
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when the logits follow it in binary."""
    output = {"name": "logits", "datatype": "FP32", "shape": list(logits.shape)}
    if inference.binary_output:
        tensor = np.ascontiguousarray(logits, dtype="<f4").tobytes()
        output["parameters"] = {"binary_data_size": len(tensor)}
    else:
        output["data"] = logits.ravel().tolist()
    response = {"model_name": model_name, "model_version": version}
    if inference.id is not None:
        response["id"] = inference.id
    response["parameters"] = {"drop": inference.drop, "patches_kept": patches_kept}
    response["outputs"] = [output]
    header = json.dumps(response, separators=(",", ":")).encode()
    if inference.binary_output:
        return header + tensor, len(header)
    return header, None
