# fisedit-ray, GPU image. Image: fisedit-ray:0.1.0-gpu
#
#   docker build -t fisedit-ray:0.1.0-gpu -f Dockerfile .
#   docker run --gpus all -p 8000:8000 -p 8080:8080 -v fisedit-data:/data fisedit-ray:0.1.0-gpu
#
# The standalone container runs `fisedit serve` (a local Ray, the editing API on 8000, Prometheus
# metrics on 8080, sessions under /data). On Kubernetes, deployments/configs/rayservice.yaml names this
# image for its head and worker pods; KubeRay replaces the command with `ray start` and deploys the
# app from the manifest's serveConfigV2. Push it where the cluster pulls from:
#   docker tag fisedit-ray:0.1.0-gpu REGISTRY/fisedit-ray:0.1.0-gpu && docker push REGISTRY/fisedit-ray:0.1.0-gpu
#
# The base is Ray's own image for the Ray release that pyproject.toml allows (ray[serve,data] 2.60.x),
# Python 3.11 and CUDA 12.8: every node of a Ray cluster must run the same Ray and Python, and KubeRay's
# probes and `ray start` expect what this image has (bash, wget, the non-root user `ray`, uid 1000).
# torch is the CUDA build of the version constraints.txt pins (the tested one) from PyTorch's index
# for the same CUDA; its wheels carry their own CUDA libraries, so the node needs only a driver for
# CUDA 12.8 (R570 or newer). For another CUDA, change both: --build-arg CUDA=cu126 (a tag Ray publishes).
# The model folder that rayservice.yaml serves (/models/...) is mounted, not built in; the embedded
# `scenes` model ships inside the package.

ARG RAY_VERSION=2.60.0
ARG PYTHON=311
ARG CUDA=cu128
FROM rayproject/ray:${RAY_VERSION}-py${PYTHON}-${CUDA}

ARG RAY_VERSION
ARG CUDA
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/${CUDA}
# s3fs: the blob store's s3:// URL in rayservice.yaml (gcsfs or adlfs for other object stores)
ARG EXTRA_PACKAGES="s3fs"

LABEL org.opencontainers.image.title="fisedit-ray" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="FISEdit sparse text-to-image editing on Ray Serve (GPU)" \
      io.fisedit.image="fisedit-ray:0.1.0-gpu"

USER root
RUN mkdir -p /data /models && chown 1000:100 /data /models
USER ray
WORKDIR /home/ray

# torch first: the largest layer, rebuilt only when its version or CUDA changes
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

COPY --chown=1000:100 pyproject.toml README.md constraints.txt /tmp/fisedit-ray/
COPY --chown=1000:100 fisedit_ray /tmp/fisedit-ray/fisedit_ray
COPY --chown=1000:100 deployments /tmp/fisedit-ray/deployments
# the base's Ray stays as it is (pinned, so the serve and data extras cannot move it)
RUN pip install --no-cache-dir "/tmp/fisedit-ray[serve]" "ray[serve,data]==${RAY_VERSION}" ${EXTRA_PACKAGES} \
    && rm -rf /tmp/fisedit-ray

ENV FISEDIT_DATA=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]

# 8000 Serve HTTP (the API), 8080 Prometheus metrics; 8265 dashboard and 6379 GCS on a KubeRay head
EXPOSE 8000 8080 8265 6379

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=8)"]

ENTRYPOINT ["fisedit"]
CMD ["serve", "--host", "0.0.0.0"]
