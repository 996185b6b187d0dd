# imgq: one image for every service (worker, trainer, beat, flower, init-model); the command picks the role.
#
#   docker build -t imgq .                                         # torch from PyPI: CUDA included, GPU-ready
#   docker build -t imgq:cpu --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu .
#                                                                  # CPU-only torch: a much smaller image
#
# Without a registry (README, "Deploy"): deploy/base-image.sh makes a Debian base, and pip reads a wheel
# directory served on loopback (`make deploy-test` does both):
#
#   docker build --network host -t imgq --build-arg BASE_IMAGE=imgq-base:bookworm \
#       --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=http://127.0.0.1:3141/ .
#
# Any base with python3 >= 3.11 and its venv module serves: imgq lives in a venv at /opt/venv, so a Debian
# base needs no pip of its own (and Debian's "externally managed" system Python is left alone).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# pip's own settings, for this build only (build arguments are not in the image's environment): empty = PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
ARG PIP_TRUSTED_HOST

RUN python3 -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    && python3 -m venv "$VIRTUAL_ENV" \
    && python -m pip --version

# torch/torchvision first, pinned as in pyproject.toml: the largest layer, and the one that changes least.
# TORCH_INDEX empty = PyPI; the CPU-only index serves the same versions as 2.14.1+cpu, which == 2.14.1 accepts.
ARG TORCH_INDEX=
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} torch==2.14.1 torchvision==0.29.1

WORKDIR /app
# The project less what .dockerignore leaves out (tests, bench, deploy, docs, caches): every package that
# pyproject.toml's packages.find includes comes along, however the tree is laid out. `imgq --help` checks the
# console script's module is in the image.
COPY . ./
# The extras every role of this one image needs: Flower (the flower service) and the training report's plots
# (init-model, trainer). A missing extra is only a warning to pip: the imports below make it an error.
ARG IMGQ_EXTRAS=monitor,report
RUN pip install ".[${IMGQ_EXTRAS}]" \
    && python -c "import torch, torchvision, celery, aiohttp, PIL, safetensors, prometheus_client, flower, matplotlib" \
    && imgq --help >/dev/null

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
