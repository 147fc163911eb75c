# model-runner, CPU image: DMR's REST API and the OpenAI API on llama.cpp.
#   docker build -t model-runner .
#   docker run -p 12434:12434 -v models:/models model-runner
# BASE_IMAGE must be a Debian-based image with Python 3.11+ (python3 and its venv module).
ARG BASE_IMAGE=python:3.12-slim

# -- builder: compile llama-cpp-python and collect every wheel the service needs ------------
FROM ${BASE_IMAGE} AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# Portable CPU code: the image must run on other hosts than the one that built it.
ARG CMAKE_ARGS="-DGGML_NATIVE=OFF"
ENV CMAKE_ARGS=${CMAKE_ARGS} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/build && /opt/build/bin/pip install --upgrade "pip>=24"
WORKDIR /src
# Prebuilt wheels placed in docker/wheels (CI's llama-cpp-python) are taken instead of building.
COPY docker/wheels/ /wheels/
COPY pyproject.toml README.md ./
COPY app ./app
RUN /opt/build/bin/pip wheel --wheel-dir /wheels --find-links /wheels ".[engine]" \
    && rm -f /wheels/README.md

# -- installer: the service's venv, from the wheels alone (no wheel survives into the image) --
FROM ${BASE_IMAGE} AS installer
COPY --from=builder /wheels /tmp/wheels
COPY docker/install.sh /tmp/install.sh
RUN sh /tmp/install.sh /tmp/wheels

# -- runtime: no compiler, a non-root user, the models volume ------------------------------
FROM ${BASE_IMAGE}
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="model-runner" \
      org.opencontainers.image.description="Docker Model Runner compatible local LLM server: DMR model API and OpenAI API on llama.cpp" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.variant="cpu"
# libgomp1: llama.cpp's OpenMP threads. tini: PID 1 that forwards signals and reaps children.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 tini \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 model-runner \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/model-runner \
        model-runner \
    && mkdir -p /models \
    && chown model-runner:model-runner /models
COPY --from=installer /opt/model-runner /opt/model-runner
RUN PYTHONDONTWRITEBYTECODE=1 /opt/model-runner/bin/python -c "import llama_cpp, app.cli"
COPY --chmod=0755 entrypoint.sh /usr/local/bin/entrypoint.sh
ENV PATH=/opt/model-runner/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    MODELS_PATH=/models \
    MODEL_RUNNER_ADDR=0.0.0.0 \
    MODEL_RUNNER_PORT=12434 \
    MODEL_RUNNER_EXTRA_PORTS=80
USER 10001:10001
WORKDIR /home/model-runner
VOLUME ["/models"]
EXPOSE 12434 80
# Ready means: listening, and every model of the preload manifest pulled and loaded.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "app", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "entrypoint.sh"]
CMD ["serve"]
