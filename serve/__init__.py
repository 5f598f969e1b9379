"""The LOTUS inference service (FastAPI on uvicorn, Open Inference Protocol v2).

Filled by the serving issue: `serve/app.py` builds the app and loads the ONNX model in its
lifespan; it stays a thin skin over the `lotus` library.
"""
