# syntax=docker/dockerfile:1
# adflow GPU worker image: the GPU stages (vlm_analyze, yolo_detect, vlm_judge) on CUDA, run as
# `workers start --gpu --stages ...`. The NVIDIA driver comes from the node (NVIDIA container
# toolkit / GPU operator); the CUDA libraries come with the torch wheels.
#
#   docker build -f deploy/docker/cuda.Dockerfile -t adflow-gpu .                    # models mounted at /models
#   docker build -f deploy/docker/cuda.Dockerfile --build-arg MODELS=baked -t adflow-gpu:baked .
#
# Build context: the repository root (see /.dockerignore).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG MODELS=mounted

# ---------------------------------------------------------------- build: a virtualenv in /opt/venv
FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python3 -m venv /opt/venv && pip install --upgrade pip "setuptools>=68"
WORKDIR /app
# Dependencies first, from pyproject.toml alone, so a source change does not reinstall torch.
# mediapipe without its declared dependencies, as `make install` does (Makefile: MEDIAPIPE).
COPY pyproject.toml README.md ./
RUN mkdir -p outbox workers stages console/web \
    && touch cli.py outbox/__init__.py workers/__init__.py stages/__init__.py console/__init__.py console/web/__init__.py \
    && pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
    && pip install ".[ml]" \
    && pip install --no-deps "mediapipe==0.10.14" \
    && pip uninstall -y adflow
COPY cli.py alembic.ini ./
COPY alembic ./alembic
COPY outbox ./outbox
COPY workers ./workers
COPY stages ./stages
COPY console ./console
COPY deploy/docker/fetch_models.py ./deploy/docker/fetch_models.py
# Editable install: console scripts `workers` and `adflow`, code and migrations stay under /app.
RUN pip install --no-deps --no-build-isolation -e . \
    && python -m compileall -q /app \
    && mkdir -p /models

# ---------------------------------------------------------------- models: empty, or fetched
FROM scratch AS models-mounted
COPY --from=build /models /models

FROM build AS models-baked
ENV HF_HOME=/models/hf
RUN python deploy/docker/fetch_models.py --out /models

FROM models-${MODELS} AS models

# ---------------------------------------------------------------- runtime: no compiler, no pip cache
FROM ${CUDA_IMAGE} AS runtime
# python3 without -venv/-pip: the virtualenv copied from the build stage needs only the interpreter.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 tesseract-ocr tesseract-ocr-kor tesseract-ocr-eng fonts-nanum libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 adflow \
    && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin adflow
COPY --from=build /opt/venv /opt/venv
COPY --from=build /app /app
COPY --from=models /models /models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    ADFLOW_HOME=/tmp/adflow \
    HF_HOME=/models/hf \
    HF_HUB_OFFLINE=1 \
    HF_MODULES_CACHE=/tmp/hf-modules \
    TRANSFORMERS_OFFLINE=1 \
    YOLO_OFFLINE=1 \
    YOLO_MODEL=/models/yolo/yolo11n.pt \
    MPLCONFIGDIR=/tmp/matplotlib \
    FONT_PATH=/usr/share/fonts/truetype/nanum/NanumGothic.ttf \
    MODEL_PROFILE=real \
    LOG_FORMAT=json \
    HEALTH_ADDR=0.0.0.0:8080 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /app
USER 10001:10001
EXPOSE 8080
CMD ["workers", "start", "--gpu", "--stages", "vlm_analyze,yolo_detect,vlm_judge"]
