# imgq: one image for every service (worker, trainer, beat, flower, init-model); the command picks the role.
#
#   docker build -t imgq .                                         # torch from PyPI: CUDA included, GPU-ready
#   docker build -t imgq:cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#                                                                  # CPU-only torch: a much smaller image
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch/torchvision first, pinned as in pyproject.toml: the largest layer, and the one that changes least.
# TORCH_INDEX empty = PyPI; the CPU-only index serves the same versions as 2.14.1+cpu, which == 2.14.1 accepts.
ARG TORCH_INDEX=
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.14.1 torchvision==0.29.1

WORKDIR /app
COPY pyproject.toml ./
COPY imgq ./imgq
COPY model ./model
COPY worker ./worker
COPY producer ./producer
RUN pip install . && python -c "import torch, torchvision, celery, aiohttp, PIL, safetensors, prometheus_client"

# Non-root. /models is created here and owned by imgq, so a named volume mounted there starts out writable
# (Docker copies the image's ownership into an empty named volume).
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin imgq \
    && mkdir /models \
    && chown imgq:imgq /models
USER imgq
ENV IMGQ_MODEL_DIR=/models

# 9108: Prometheus metrics of a worker (IMGQ_METRICS_PORT); 5555: Flower.
EXPOSE 9108 5555
ENTRYPOINT ["imgq"]
CMD ["worker"]
