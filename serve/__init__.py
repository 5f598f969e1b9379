"""The LOTUS inference service (FastAPI on uvicorn, Open Inference Protocol v2).

It serves a model exported by `lotus export onnx` and stays a thin skin over the `lotus` library:
`app.py` builds the app and loads the model in its lifespan, `routes/` holds the endpoints by
resource, `batching.py` gathers concurrent requests into one ONNX Runtime call, and `bench.py` is
the HTTP load generator behind `lotus bench URL`. It never imports torch (see `lotus.runtime`).
"""
