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
from serve.model import InputError, ServedModel
from serve.schemas import InferenceRequest

HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class Inference:
    pixel_values: np.ndarray  # (B, 3, H, W) float32
    drop: float
    id: str | None
    binary_output: bool  # answer with the binary tensor extension


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


def parse_drop(value: object) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"parameters.drop must be a number in [0, {MAX_DROP}], not {value!r}")
    if not 0 <= value <= MAX_DROP:
        raise InputError(f"parameters.drop {value} is outside [0, {MAX_DROP}]")
    return float(value)


def parse_infer(body: bytes, header_length: str | None, model: ServedModel, max_images: int) -> Inference:
    """An infer request body -> the (B, 3, H, W) input and its drop ratio, or an InputError."""
    binary = b""
    if header_length is not None:
        try:
            split = int(header_length)
        except ValueError:
            raise InputError(f"Inference-Header-Content-Length {header_length!r} is not a number of bytes") from None
        if not 0 < split <= len(body):
            raise InputError(f"Inference-Header-Content-Length {split} does not fit the {len(body)}-byte body")
        body, binary = body[:split], body[split:]
    if not body:
        raise InputError("the request has no body: send an inference request (JSON with 'inputs')")
    try:
        request = InferenceRequest.model_validate_json(body)
    except ValidationError as e:
        raise InputError(f"not a valid inference request: {validation_message(e)}") from None

    names = [i.name for i in request.inputs]
    if names != ["pixel_values"]:
        raise InputError(f"the model takes one input, 'pixel_values'; the request has {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "FP32":
        raise InputError(f"pixel_values must be FP32, not {tensor.datatype}")
    size = model.img_size
    shape = tensor.shape
    if len(shape) != 4 or shape[1:] != [3, size, size] or shape[0] < 1:
        raise InputError(f"pixel_values must have shape [B, 3, {size}, {size}] with B >= 1, not {shape}")
    if shape[0] > max_images:
        raise InputError(f"{shape[0]} images in one request is over the limit of {max_images} (--max-images)", 413)
    count = math.prod(shape)

    binary_size = (tensor.parameters or {}).get("binary_data_size")
    if binary_size is not None:
        if tensor.data is not None:
            raise InputError("pixel_values has both data and binary_data_size: send one of them")
        if binary_size != count * 4 or len(binary) != binary_size:
            raise InputError(
                f"pixel_values {shape} needs {count * 4} bytes of FP32; binary_data_size is {binary_size} "
                f"and {len(binary)} bytes follow the JSON"
            )
        pixel_values = np.frombuffer(binary, dtype="<f4").reshape(shape)
    else:
        if tensor.data is None:
            raise InputError("pixel_values has no data")
        try:
            values = np.asarray(tensor.data)
        except (ValueError, TypeError, OverflowError):
            raise InputError("pixel_values data is not a rectangular array of numbers") from None
        if values.dtype.kind not in "fiu":
            raise InputError("pixel_values data must hold only numbers")
        if values.size != count:
            raise InputError(f"pixel_values data has {values.size} values; shape {shape} needs {count}")
        with np.errstate(over="ignore"):  # values beyond FP32 become inf, refused just below
            pixel_values = values.astype(np.float32).reshape(shape)
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
