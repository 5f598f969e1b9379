"""The inference service against a real uvicorn on loopback: the OIP v2 shapes, /v1/classify,
dynamic batching under concurrency, every bad input's 4xx, the API key, metrics."""

from __future__ import annotations

import asyncio
import io
import json

import httpx
import numpy as np
import pytest
from conftest import live_server
from PIL import Image

from lotus.images import ALPHA_BACKGROUND
from lotus.runtime import ort_session
from serve.model import ServedModel
from serve.settings import Settings

SIZE, PATCHES, CLASSES = 16, 16, 10
INFER = "/v2/models/lotus/infer"


def limits(model, **overrides) -> Settings:
    """Settings with small limits, so that going over them is cheap."""
    base = dict(model=model, max_delay_ms=20, max_images=4, max_body_mb=0.2, max_pixels=20_000, api_key=None)
    return Settings(**{**base, **overrides})


@pytest.fixture(scope="module")
def server(tiny_onnx):
    with live_server(limits(tiny_onnx)) as url:
        yield url


@pytest.fixture(scope="module")
def session(tiny_onnx):
    return ort_session(tiny_onnx)


def ort_logits(session, x: np.ndarray, drop: float) -> np.ndarray:
    return session.run(None, {"pixel_values": x, "drop": np.array(drop, dtype=np.float32)})[0]


def images(batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, SIZE, SIZE), dtype=np.float32)


def infer_body(x: np.ndarray, drop: float | None = None, nested: bool = False, **extra) -> dict:
    body = {
        "inputs": [
            {
                "name": "pixel_values",
                "shape": list(x.shape),
                "datatype": "FP32",
                "data": x.tolist() if nested else x.ravel().tolist(),
            }
        ],
        **extra,
    }
    if drop is not None:
        body["parameters"] = {"drop": drop}
    return body


def logits_of(response: httpx.Response) -> np.ndarray:
    output = response.json()["outputs"][0]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def test_oip_routes_answer_in_the_protocols_shapes(server, session):
    with httpx.Client(base_url=server) as client:
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        meta = client.get("/v2").json()
        assert meta["name"] == "lotus" and meta["version"] and "binary_tensor_data" in meta["extensions"]
        model = client.get("/v2/models/lotus").json()
        assert model["name"] == "lotus" and model["versions"] == ["1"] and model["platform"] == "onnxruntime_onnx"
        assert model["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 3, SIZE, SIZE]}]
        assert model["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, CLASSES]}]
        assert json.loads(model["parameters"]["mean"]) == [0.3] * 3
        assert client.get("/v2/models/lotus/ready").json() == {"name": "lotus", "ready": True}
        assert client.get("/v2/models/lotus/versions/1/ready").status_code == 200
        for path in ("/v2/models/other", "/v2/models/other/ready", "/v2/models/lotus/versions/7"):
            response = client.get(path)
            assert response.status_code == 404 and "error" in response.json()
        assert client.post("/v2/models/other/infer", json=infer_body(images(1))).status_code == 404

        x = images(3)
        response = client.post(INFER, json=infer_body(x, drop=0.25, id="req-1"))
        assert response.status_code == 200
        body = response.json()
        assert body["model_name"] == "lotus" and body["model_version"] == "1" and body["id"] == "req-1"
        assert body["parameters"] == {"drop": 0.25, "patches_kept": 12}
        assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [("logits", "FP32", [3, CLASSES])]
        np.testing.assert_allclose(logits_of(response), ort_logits(session, x, 0.25), atol=1e-5)
        # Nested data, no parameters (drop 0), the versioned URL: the same model.
        nested = client.post("/v2/models/lotus/versions/1/infer", json=infer_body(x, nested=True))
        np.testing.assert_allclose(logits_of(nested), ort_logits(session, x, 0.0), atol=1e-5)
        assert "id" not in nested.json()

        assert client.get("/docs").status_code == 200
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
        assert {"InferenceRequest", "RequestInput", "InferenceResponse", "ClassifyResponse"} <= set(schemas)


def test_binary_tensor_extension_both_ways(server, session):
    """Triton's HTTP client sends and asks for tensors in binary by default."""
    x = images(2, seed=5)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "pixel_values",
                    "shape": [2, 3, SIZE, SIZE],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            "parameters": {"drop": 0.5},
        }
    ).encode()
    response = httpx.post(
        server + INFER,
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header)), "Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 200
    split = int(response.headers["Inference-Header-Content-Length"])
    meta = json.loads(response.content[:split])
    output = meta["outputs"][0]
    assert output["shape"] == [2, CLASSES] and output["parameters"]["binary_data_size"] == 2 * CLASSES * 4
    logits = np.frombuffer(response.content[split:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_allclose(logits, ort_logits(session, x, 0.5), atol=1e-5)

    short = httpx.post(
        server + INFER, content=header + x.tobytes()[:-4], headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert short.status_code == 400 and "binary_data_size" in short.json()["error"]


def test_batching_gives_each_caller_its_own_result(server, session):
    """12 concurrent requests with different images and drops: each answer is what ONNX Runtime
    gives for that request alone (drop 0.1 and 0.12 keep the same 14 patches and may share a call)."""
    drops = [0.0, 0.1, 0.12, 0.3, 0.5, 0.95]
    cases = [(images(1 + i % 3, seed=100 + i), drops[i % len(drops)]) for i in range(12)]

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            return await asyncio.gather(*(client.post(INFER, json=infer_body(x, drop)) for x, drop in cases))

    before = batch_count(server)
    responses = asyncio.run(send_all())
    for (x, drop), response in zip(cases, responses):
        assert response.status_code == 200, response.text
        assert response.json()["parameters"]["patches_kept"] == PATCHES - round(drop * PATCHES)
        np.testing.assert_allclose(logits_of(response), ort_logits(session, x, drop), atol=1e-5)
    calls = batch_count(server) - before
    assert calls < len(cases), "concurrent requests were not batched"


def batch_count(url: str) -> float:
    """ONNX Runtime calls the server has made (the batch-size histogram's count)."""
    text = httpx.get(url + "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("lotus_batch_size_images_count")))


def test_batching_off_runs_each_request_alone(tiny_onnx, session):
    with live_server(limits(tiny_onnx, batching=False)) as url:
        cases = [(images(2, seed=i), 0.1 * i) for i in range(4)]

        async def send_all() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                return await asyncio.gather(*(client.post(INFER, json=infer_body(x, drop)) for x, drop in cases))

        before = batch_count(url)
        for (x, drop), response in zip(cases, asyncio.run(send_all())):
            np.testing.assert_allclose(logits_of(response), ort_logits(session, x, drop), atol=1e-5)
        assert batch_count(url) - before == len(cases)


def test_classify_answers_class_names_with_probabilities(server, session):
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))  # not square, not 16x16
    for fmt, mime in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        data = encode(photo, fmt)
        response = httpx.post(server + "/v1/classify", params={"drop": 0.3, "top_k": 3}, files={"file": ("photo", data, mime)})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model_name"] == "lotus" and body["drop"] == 0.3
        assert body["patches_kept"] == 11 and body["num_patches"] == PATCHES and body["time_ms"] > 0
        # What the training preprocessing gives: RGB, bilinear to 16x16, (x/255 - mean) / std.
        decoded = Image.open(io.BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        x = ((np.asarray(decoded, dtype=np.float32) / 255 - 0.3) / 0.4).transpose(2, 0, 1)[None]
        logits = ort_logits(session, np.ascontiguousarray(x), 0.3)[0].astype(np.float64)
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = np.argsort(-expected)[:3]
        assert [p["index"] for p in body["predictions"]] == top.tolist()
        assert [p["label"] for p in body["predictions"]] == [f"class{i}" for i in top]
        np.testing.assert_allclose([p["probability"] for p in body["predictions"]], expected[top], atol=1e-5)
    many = httpx.post(server + "/v1/classify", params={"top_k": 50}, files={"file": ("p.png", encode(photo, "PNG"))})
    assert len(many.json()["predictions"]) == CLASSES


def test_classify_scales_16_bit_png_to_8_bits(server):
    grey = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    eight = httpx.post(server + "/v1/classify", files={"file": ("8.png", encode(Image.fromarray(grey), "PNG"))}).json()
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # the same picture in 16 bits
    assert sixteen.mode.startswith("I;16")
    answer = httpx.post(server + "/v1/classify", files={"file": ("16.png", encode(sixteen, "PNG"))}).json()
    assert answer["predictions"] == eight["predictions"]


def test_images_are_decoded_as_a_viewer_shows_them(tiny_onnx):
    """EXIF orientation applied, transparency shown on white, an animated PNG's first frame."""
    model = ServedModel.load(tiny_onnx)

    def decoded(picture: Image.Image, fmt: str = "PNG", **save) -> np.ndarray:
        buf = io.BytesIO()
        picture.save(buf, fmt, **save)
        return model.decode_image(buf.getvalue(), max_pixels=10**6)

    rng = np.random.default_rng(3)
    upright = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the stored pixels must turn 90 degrees clockwise to stand upright
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera held sideways writes
    np.testing.assert_array_equal(decoded(stored, exif=exif), decoded(upright))
    assert not np.array_equal(decoded(stored), decoded(upright))  # the EXIF tag is what turned it

    white = Image.new("RGB", (16, 16), ALPHA_BACKGROUND)
    clear_red = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    np.testing.assert_array_equal(decoded(clear_red), decoded(white))
    half = Image.new("RGBA", (16, 16), (0, 0, 0, 128))  # half-transparent black on white: mid grey
    np.testing.assert_allclose(decoded(half), decoded(Image.new("RGB", (16, 16), (127, 127, 127))), atol=0.05)

    red, blue = Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))
    np.testing.assert_array_equal(decoded(red, save_all=True, append_images=[blue]), decoded(red))


def test_training_decodes_files_as_the_service_decodes_uploads(tiny_onnx, tmp_path):
    """Whatever a file holds (transparency, 16 bits, an EXIF turn, many pixels), the model is
    served the pixels it was trained on: lotus.data and /v1/classify share lotus.images."""
    from lotus.data import _decode

    model = ServedModel.load(tiny_onnx)
    rng = np.random.default_rng(4)
    exif = Image.Exif()
    exif[0x0112] = 6
    files = {
        "rgba.png": (Image.fromarray(rng.integers(0, 256, (20, 20, 4), dtype=np.uint8), "RGBA"), {}),
        "grey16.png": (Image.fromarray(rng.integers(0, 65536, (20, 20), dtype=np.uint16)), {}),
        "turned.jpg": (Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)), {"exif": exif}),
        "large.jpg": (Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), {}),
        "large.png": (Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), {}),
    }
    for name, (picture, save) in files.items():
        picture.save(tmp_path / name, **save)
        trained, _ = _decode(tmp_path / name, SIZE)  # (H, W, 3) uint8
        served = model.decode_image((tmp_path / name).read_bytes(), max_pixels=10**6) * model.std + model.mean
        np.testing.assert_allclose(served.transpose(1, 2, 0) * 255, trained, atol=1e-3, err_msg=name)


def test_a_model_evaluated_on_centre_cuts_is_served_the_same_cut(tmp_path):
    """A model trained with --crop-pct was evaluated on centre cuts: its export says so, and the
    service cuts each upload as evaluation cut its test images, not the whole image."""
    from lotus.checkpoint import save_model
    from lotus.config import ModelConfig
    from lotus.data import _decode
    from lotus.export import ExportConfig, export_onnx
    from lotus.vit import build_model

    cfg = ModelConfig(num_classes=2, img_size=SIZE, patch_size=4, depth=1, drop_path_rate=0.0)
    pre = {"img_size": SIZE, "crop_pct": 0.875, "mean": [0.5] * 3, "std": [0.25] * 3, "classes": ["a", "b"], "dataset": "x"}
    save_model(tmp_path / "run", build_model(cfg).eval(), cfg, pre, None, sparsity={"overall": 0.0})
    export_onnx(tmp_path / "run", tmp_path / "model.onnx", None, ExportConfig(verify=False))
    model = ServedModel.load(tmp_path / "model.onnx")
    assert model.crop_pct == 0.875
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (24, 40, 3), dtype=np.uint8)).save(tmp_path / "wide.png")
    served = model.decode_image((tmp_path / "wide.png").read_bytes(), max_pixels=10**6) * model.std + model.mean
    cut, _ = _decode(tmp_path / "wide.png", SIZE, 0.875)
    np.testing.assert_allclose(served.transpose(1, 2, 0) * 255, cut, atol=1e-3)
    whole, _ = _decode(tmp_path / "wide.png", SIZE)
    assert np.abs(served.transpose(1, 2, 0) * 255 - whole).max() > 10


def _json(body) -> dict:
    return {"content": json.dumps(body).encode(), "headers": {"Content-Type": "application/json"}}


def _raw(text: str) -> dict:
    return {"content": text.encode(), "headers": {"Content-Type": "application/json"}}


def _good() -> dict:
    return infer_body(images(1))


def _with_input(**changes) -> dict:
    body = _good()
    body["inputs"][0].update(changes)
    return body


def _chunks(total: int):
    for _ in range(total // 50_000):
        yield b" " * 50_000


_JPEG = encode(Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
_PNG = encode(Image.new("RGB", (20, 20), (1, 2, 3)), "PNG")
_FLAT = "[" + ",".join(["0.5"] * (3 * SIZE * SIZE - 1))

BAD_INFER = {
    "not JSON": (400, "Invalid JSON", _raw("{inputs: oops")),
    "empty body": (400, "no body", {"content": b""}),
    "missing inputs": (400, "inputs: Field required", _json({"parameters": {"drop": 0.1}})),
    "missing shape": (
        400,
        "shape: Field required",
        _json({"inputs": [{"name": "pixel_values", "datatype": "FP32", "data": [1.0]}]}),
    ),
    "wrong input name": (400, "'pixel_values'", _json(_with_input(name="images"))),
    "two inputs": (400, "one input", _json({"inputs": _good()["inputs"] * 2})),
    "wrong dtype": (400, "must be FP32, not INT64", _json(_with_input(datatype="INT64"))),
    "wrong image size": (400, "shape [B, 3, 16, 16]", _json(_with_input(shape=[1, 3, 8, 8]))),
    "wrong rank": (400, "shape [B, 3, 16, 16]", _json(_with_input(shape=[3, 16, 16]))),
    "zero images": (400, "B >= 1", _json(_with_input(shape=[0, 3, 16, 16], data=[]))),
    "too few values": (400, "needs 768", _json(_with_input(data=[0.5] * 700))),
    "ragged nesting": (400, "not a rectangular array", _json(_with_input(data=[[0.5] * 700, [0.5] * 68]))),
    "strings in data": (400, "only numbers", _json(_with_input(data=["0.5"] * 768))),
    "nulls in data": (400, "only numbers", _json(_with_input(data=[None] * 768))),
    "NaN": (
        400,
        "NaN or infinite",
        _raw('{"inputs":[{"name":"pixel_values","shape":[1,3,16,16],"datatype":"FP32","data":' + _FLAT + ",NaN]}]}"),
    ),
    "Infinity": (
        400,
        "NaN or infinite",
        _raw('{"inputs":[{"name":"pixel_values","shape":[1,3,16,16],"datatype":"FP32","data":' + _FLAT + ",-Infinity]}]}"),
    ),
    "FP32 overflow": (400, "NaN or infinite", _json(_with_input(data=[1e39] * 768))),
    "drop over 0.95": (400, "outside [0, 0.95]", _json({**_good(), "parameters": {"drop": 0.96}})),
    "negative drop": (400, "outside [0, 0.95]", _json({**_good(), "parameters": {"drop": -0.1}})),
    "drop not a number": (400, "must be a number", _json({**_good(), "parameters": {"drop": "half"}})),
    "drop a boolean": (400, "must be a number", _json({**_good(), "parameters": {"drop": True}})),
    "unknown output": (400, "'logits'", _json({**_good(), "outputs": [{"name": "probabilities"}]})),
    "too many images": (413, "over the limit of 4", _json(infer_body(images(5)))),
    "body over the limit (Content-Length)": (413, "over the limit of 0.2 MB", _raw(json.dumps(_good()) + " " * 250_000)),
    "body over the limit (streamed)": (413, "over the limit of 0.2 MB", {"content": _chunks(300_000)}),
    "bad binary header length": (400, "does not fit", {"content": b"{}", "headers": {"Inference-Header-Content-Length": "99"}}),
}


def _file(data: bytes, name: str = "x.jpg") -> dict:
    return {"files": {"file": (name, data, "application/octet-stream")}}


BAD_CLASSIFY = {
    "not an image": (415, "not a JPEG or PNG", _file(b"%PDF-1.4 definitely not an image")),
    "a GIF": (415, "not a JPEG or PNG", _file(encode(Image.new("RGB", (8, 8)), "GIF"))),
    "truncated JPEG": (400, "truncated or corrupt", _file(_JPEG[: len(_JPEG) // 2])),
    "corrupt PNG data": (400, "truncated or corrupt", _file(_PNG[:60] + b"xx" + _PNG[62:], "x.png")),
    "empty file": (415, "not a JPEG or PNG", _file(b"")),
    "image bomb": (413, "over the limit of 20000", _file(encode(Image.new("L", (1000, 1000)), "PNG"), "bomb.png")),
    "missing file": (400, "file: Field required", {"files": {"image": ("x.jpg", _JPEG)}}),
    "not multipart": (400, "file: Field required", _json({"file": "x"})),
    "drop over 0.95": (400, "drop: Input should be less than or equal to 0.95", {**_file(_JPEG), "params": {"drop": 1}}),
    "drop not a number": (400, "drop: Input should be a valid number", {**_file(_JPEG), "params": {"drop": "x"}}),
    "top_k zero": (400, "top_k", {**_file(_JPEG), "params": {"top_k": 0}}),
    "file over the body limit": (413, "over the limit of 0.2 MB", _file(b"\xff\xd8" + b"\0" * 300_000)),
}


@pytest.mark.parametrize("path, case", [(INFER, c) for c in BAD_INFER] + [("/v1/classify", c) for c in BAD_CLASSIFY])
def test_bad_input_gets_a_4xx_and_the_next_request_succeeds(server, path, case):
    status, message, request = (BAD_INFER if path == INFER else BAD_CLASSIFY)[case]
    response = httpx.post(server + path, timeout=30, **request)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]
    good = httpx.post(server + INFER, json=_good(), timeout=30)
    assert good.status_code == 200 and logits_of(good).shape == (1, CLASSES)


def test_api_key_is_required_everywhere_but_the_health_checks(tiny_onnx):
    with live_server(limits(tiny_onnx, api_key="s3cret")) as url:
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(url + "/v2/health/live").status_code == 200
        assert httpx.get(url + "/v2/health/ready").status_code == 200
        for method, path, kwargs in [
            ("POST", INFER, {"json": _good()}),
            ("GET", "/v2", {}),
            ("GET", "/v2/models/lotus", {}),
            ("GET", "/metrics", {}),
            ("GET", "/docs", {}),
            ("POST", "/v1/classify", {"files": {"file": ("x.jpg", _JPEG)}}),
        ]:
            missing = httpx.request(method, url + path, **kwargs)
            assert missing.status_code == 401 and "missing API key" in missing.json()["error"], path
            assert missing.headers["WWW-Authenticate"] == "Bearer"
            wrong = httpx.request(method, url + path, headers={"Authorization": "Bearer guess"}, **kwargs)
            assert wrong.status_code == 401 and wrong.json() == {"error": "wrong API key"}
            assert httpx.request(method, url + path, headers=key, **kwargs).status_code == 200, path
        assert (
            httpx.get(url + "/v2", headers={"Authorization": "bearer s3cret"}).status_code == 200
        )  # the scheme is case-insensitive
        assert httpx.get(url + "/v2", headers={"Authorization": "Basic s3cret"}).status_code == 401


def test_metrics_count_requests_latency_batches_and_drops(server):
    httpx.post(server + INFER, json=infer_body(images(2), drop=0.5))
    httpx.post(server + INFER, json={"inputs": []})
    text = httpx.get(server + "/metrics").text
    assert 'lotus_requests_total{method="POST",route="/v2/models/{name}/infer",status="200"}' in text
    assert 'lotus_requests_total{method="POST",route="/v2/models/{name}/infer",status="400"}' in text
    assert 'lotus_request_duration_seconds_bucket{le="0.005",route="/v2/models/{name}/infer"}' in text
    assert "lotus_batch_size_images_bucket" in text and "lotus_inference_duration_seconds_count" in text
    drops = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line.startswith("lotus_drop_ratio_bucket")}
    assert drops['lotus_drop_ratio_bucket{le="0.5"}'] > drops['lotus_drop_ratio_bucket{le="0.4"}']


def test_a_token_merging_graph_is_served_and_refuses_a_drop(tiny_onnx):
    """The graph of `lotus export onnx --merge R` serves as the dropping one does, at its own r;
    a request that asks it to drop patches gets a 400 saying why, and the next one is answered."""
    from lotus.export import ExportConfig, export_onnx

    merging = tiny_onnx.with_name("model.tome-r2.onnx")
    if not merging.exists():
        export_onnx(tiny_onnx.parent / "run", merging, None, ExportConfig(verify=False, merge=2))
    expected = ort_session(merging).run(None, {"pixel_values": images(3)})[0]
    with live_server(limits(merging)) as url, httpx.Client(base_url=url) as client:
        answer = client.post(INFER, json=infer_body(images(3)))
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(logits_of(answer), expected, atol=1e-5)
        assert answer.json()["parameters"] == {"drop": 0.0, "patches_kept": PATCHES}
        refused = client.post(INFER, json=infer_body(images(1), drop=0.3))
        assert refused.status_code == 400 and "merges tokens (ToMe, r 2 per block)" in refused.json()["error"]
        photo = encode(Image.new("RGB", (20, 20), "red"), "PNG")
        assert client.post("/v1/classify", params={"drop": 0.5}, files={"file": ("p.png", photo)}).status_code == 400
        assert client.post("/v1/classify", files={"file": ("p.png", photo)}).json()["patches_kept"] == PATCHES
        assert "merges tokens" in client.get("/v2/models/lotus").json()["parameters"]["drop"]
