# LOTUS image. CPU by default:
#   docker build -t lotus .
# CUDA variant (PyTorch's CUDA wheels and onnxruntime-gpu; run with --gpus all):
#   docker build -t lotus:gpu --build-arg VARIANT=gpu .
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
ENTRYPOINT ["lotus"]
CMD ["--help"]
