# LOTUS image. CPU by default:
#   docker build -t lotus .
# CUDA variant (PyTorch's CUDA wheels and onnxruntime-gpu; run with --gpus all):
#   docker build -t lotus:gpu --build-arg VARIANT=gpu .
# By default it serves the exported model mounted at /models/model.onnx on port 8000:
#   docker run -p 8000:8000 -v "$PWD/runs/compress-DATE:/models:ro" lotus
# Any other command runs the CLI: docker run lotus train --help
FROM python:3.11-slim

ARG VARIANT=cpu
# CPU: PyTorch's CPU-only wheels (a few hundred MB instead of several GB of CUDA libraries).
ARG TORCH_INDEX_CPU=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 1000 lotus
WORKDIR /app

COPY pyproject.toml README.md ./
COPY lotus ./lotus
COPY cli ./cli
COPY serve ./serve

RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install torch torchvision && pip install ".[gpu]"; \
    else \
        pip install torch torchvision --index-url "$TORCH_INDEX_CPU" && pip install ".[cpu]"; \
    fi

USER lotus
WORKDIR /home/lotus
EXPOSE 8000
# Ready once the model is loaded (the OIP readiness route needs no API key). Serving on another
# port? Pass --port and override the check: docker run --health-cmd ... lotus serve ...
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4).status != 200)"]
ENTRYPOINT ["lotus"]
CMD ["serve", "/models/model.onnx", "--host", "0.0.0.0", "--port", "8000"]
