# gridrender GPU worker: one container per GPU, pipeline resident.
# Build from the repository root:  docker build -f deploy/docker/worker.Dockerfile -t gridrender-worker .
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/models/huggingface \
    XDG_CACHE_HOME=/models/cache \
    GRIDRENDER_MODEL_DIR=/models

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# torch's default PyPI wheel bundles the CUDA runtime it needs.
RUN pip install --upgrade pip && pip install ".[worker]"

RUN useradd --create-home --uid 10001 gridrender && mkdir -p /models && chown gridrender:gridrender /models
USER gridrender
VOLUME ["/models"]

# Ready once the pipeline is loaded (worker --model writes the file).
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s CMD test -f /tmp/gridrender-ready
ENTRYPOINT ["gridrender", "worker"]
CMD ["--model", "builtin:tiny"]
