# syntax=docker/dockerfile:1
#
# One image for every clinfer process: `clinfer serve` (default), `clinfer worker --queues ...`, `clinfer dimse`,
# `clinfer db upgrade`, `clinfer token ...`. Pick the process with the command (compose `command:`, Kubernetes `args:`).
#
# CPU variant (default; onnxruntime CPU on python:3.11-slim):
#   docker build -t clinfer:cpu .
# GPU variant (onnxruntime-gpu + TensorRT, from `.[gpu]`, on an NVIDIA CUDA runtime base):
#   docker build -t clinfer:gpu --build-arg VARIANT=gpu \
#       --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 .
#   The host needs the NVIDIA driver and container toolkit; run with a GPU (`--gpus`, compose device reservation,
#   or `nvidia.com/gpu` in Kubernetes). The CUDA major version of BASE_IMAGE must match the onnxruntime-gpu and
#   TensorRT wheels: GPU_PIP_CONSTRAINTS (below) holds `.[gpu]` to the CUDA 12 builds; for a CUDA 13 base, pass
#   --build-arg GPU_PIP_CONSTRAINTS= (or constraints of your own). The build fails if a library the CUDA execution
#   provider needs is missing from the image, rather than shipping an image that silently runs on CPU.
# BuildKit is required (cache mounts): the default builder of Docker 23+.

ARG VARIANT=cpu
ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------------------------
# python: the base both stages share, so the virtual environment built below finds the same interpreter at run time.
FROM ${BASE_IMAGE} AS python
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# python:3.11-slim has CPython 3.11 already; the CUDA base (Ubuntu 22.04) takes Ubuntu's python3.11. tini is PID 1:
# it forwards SIGTERM (Celery's warm shutdown, uvicorn's graceful stop) and reaps the worker pool's children.
# Versions come from the base image's distribution (two different ones), so they are not pinned here.
# hadolint ignore=DL3008,SC2086
RUN set -eux; \
    apt-get update; \
    packages="tini ca-certificates"; \
    command -v python3.11 >/dev/null 2>&1 || packages="$packages python3.11 python3.11-venv"; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $packages; \
    rm -rf /var/lib/apt/lists/*; \
    python3.11 --version

# ---------------------------------------------------------------------------------------------------------------------
# builder: a virtual environment with clinfer and its dependencies, nothing else.
FROM python AS builder
ARG VARIANT
# TensorRT's PyPI packages are stubs that fetch their wheels from NVIDIA's index; the gpu variant adds that index to
# pip's (set it empty for PyPI alone). The cpu variant always uses PyPI alone.
ARG NVIDIA_PIP_INDEX_URL=https://pypi.nvidia.com
# onnxruntime-gpu 1.27+ is built for CUDA 13; the `tensorrt` metapackage from 10.13.2 on pulls the CUDA 13 build.
ARG GPU_PIP_CONSTRAINTS="onnxruntime-gpu<1.27 tensorrt<10.13.1"
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# pyproject's `onnxruntime; extra != 'gpu'` marker does not keep the CPU wheel out of `.[gpu]` (pip evaluates the
# base requirements without the extra), and the two wheels overwrite each other's `onnxruntime` package: the gpu
# variant therefore keeps only onnxruntime-gpu, at the version the resolver chose.
# (SHELL, with pipefail, is inherited from the python stage.)
# hadolint ignore=DL3013,DL4006,SC2086
RUN --mount=type=cache,target=/root/.cache/pip \
    set -eux; \
    pip install --upgrade pip; \
    case "$VARIANT" in \
      cpu) pip install . ;; \
      gpu) printf '%s\n' $GPU_PIP_CONSTRAINTS > /tmp/gpu-constraints.txt; \
           PIP_EXTRA_INDEX_URL="$NVIDIA_PIP_INDEX_URL" pip install -c /tmp/gpu-constraints.txt ".[gpu]"; \
           ort_gpu_version="$(pip show onnxruntime-gpu | sed -n 's/^Version: //p')"; \
           pip uninstall -y onnxruntime onnxruntime-gpu; \
           pip install --no-deps "onnxruntime-gpu==${ort_gpu_version}" ;; \
      *) echo "VARIANT must be cpu or gpu, not '${VARIANT}'" >&2; exit 2 ;; \
    esac; \
    python -c "import onnxruntime as ort, sys; p = ort.get_available_providers(); print('onnxruntime', ort.__version__, p); sys.exit(0 if sys.argv[1] != 'gpu' or 'CUDAExecutionProvider' in p else 'no CUDAExecutionProvider in the gpu variant')" "$VARIANT"; \
    clinfer --help >/dev/null

# ---------------------------------------------------------------------------------------------------------------------
# runtime: the virtual environment, the model repository, a non-root user; no compiler, no pip cache, no sources.
FROM python AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="clinfer" \
      org.opencontainers.image.description="Clinical inference microservice (DICOM + FHIR in, findings out). Not a medical device." \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.clinfer.variant="${VARIANT}"

RUN set -eux; \
    groupadd --system --gid 10001 clinfer; \
    useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/clinfer --no-create-home \
        --shell /usr/sbin/nologin clinfer; \
    install -d -o 10001 -g 10001 -m 0750 /var/lib/clinfer /var/lib/clinfer/blobs /var/lib/clinfer/keys

COPY --from=builder /opt/venv /opt/venv
COPY models/ /opt/clinfer/models/

# The pip-installed TensorRT keeps its shared libraries inside site-packages; make them visible to ONNX Runtime's
# TensorRT execution provider, which loads libnvinfer by name. Then check, in the gpu variant, that everything the
# CUDA provider links against resolves in this image (all but libcuda.so.1, which the NVIDIA runtime mounts at start).
# hadolint ignore=DL4006
RUN set -eux; \
    trt_libs="$(/opt/venv/bin/python -c "import importlib.util as u; s = u.find_spec('tensorrt_libs'); print(s.submodule_search_locations[0] if s else '')")"; \
    if [ -n "$trt_libs" ]; then echo "$trt_libs" > /etc/ld.so.conf.d/clinfer-tensorrt.conf; ldconfig; fi; \
    if [ "$VARIANT" = gpu ]; then \
        capi="$(/opt/venv/bin/python -c "import importlib.util as u; print(u.find_spec('onnxruntime').submodule_search_locations[0])")/capi"; \
        test -f "$capi/libonnxruntime_providers_cuda.so"; \
        missing="$(ldd "$capi/libonnxruntime_providers_cuda.so" | grep 'not found' | grep -v 'libcuda\.so' || true)"; \
        if [ -n "$missing" ]; then \
            echo "gpu variant: the CUDA execution provider cannot load in this image; is BASE_IMAGE a CUDA runtime" \
                 "image with cuDNN, of the CUDA major that onnxruntime-gpu was built for? Missing: $missing" >&2; \
            exit 1; \
        fi; \
        trt_missing="$(ldd "$capi/libonnxruntime_providers_tensorrt.so" | grep 'not found' | grep -v 'libcuda\.so' || true)"; \
        if [ -n "$trt_missing" ]; then echo "warning: TensorRT provider unavailable (CUDA provider still works): $trt_missing" >&2; fi; \
    fi

# /var/lib/clinfer is the state directory (and $HOME): blobs/ and keys/ exist there, owned by the service user, so
# that a Docker named volume mounted on them starts writable. Kubernetes mounts volumes there instead (the chart).
ENV PATH=/opt/venv/bin:$PATH \
    CLINFER_HOST=0.0.0.0 \
    CLINFER_PORT=8000 \
    CLINFER_STATE_DIR=/var/lib/clinfer \
    CLINFER_MODEL_REPOSITORY=/opt/clinfer/models
WORKDIR /var/lib/clinfer
USER 10001:10001
EXPOSE 8000 11112

# Liveness of the API only (GET /healthz needs no token); worker and dimse containers override or disable it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CLINFER_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["tini", "--"]
CMD ["clinfer", "serve"]
