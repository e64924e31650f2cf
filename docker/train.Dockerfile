# ftjobs train image: torch (CUDA or CPU build), bitsandbytes, peft, accelerate, transformers.
#   docker build -f docker/train.Dockerfile -t ftjobs-train:0.1.0 .
#   docker run --rm ftjobs-train:0.1.0 --help
# docker/build-images.sh builds every image (CPU/GPU variants, offline, wheelhouse, push).
#
# The base is pinned by tag and digest. Where no registry can be reached, build the
# stand-in (docker/offline/build-base-standins.sh) and pass --build-arg BASE_DIGEST=
# (empty): a locally imported image has no registry digest to match.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BASE_DIGEST=@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91

# Every version comes from a lock written by `make lock` (requirements/lockfile.py). GPU by default:
# lock-gpu.txt pins torch 2.13.0, PyPI's CUDA build, which bundles the CUDA runtime it needs, so the slim
# Python base serves both variants. CPU variant (laptops, CI): LOCK=requirements/lock-cpu.txt pins
# 2.13.0+cpu, found in a wheelhouse or at TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
ARG LOCK=requirements/lock-gpu.txt
ARG TORCH_INDEX_URL=""
# ---- dependencies: only pyproject.toml and the locks, so source edits do not reinstall them
FROM ${BASE_IMAGE}${BASE_DIGEST} AS deps
# Optional build inputs, empty unless docker/build-images.sh fills them: a CA bundle for
# TLS-intercepting proxies and a wheelhouse for builds without internet.
COPY docker/build-ca/ /tmp/build-ca/
COPY docker/wheelhouse/ /wheels/
# Only pyproject.toml: README.md (which setuptools reads) changes far more often than the
# dependencies, so the dependency layer gets an empty stand-in and the real one comes with the sources.
COPY pyproject.toml /src/
COPY requirements/ /src/requirements/
# An empty package with the real metadata installs exactly the declared dependencies, each at the version
# the lock pins (pip's -c: torch's build too); verify-env then fails the build unless the venv holds the
# lock and nothing else.
ARG LOCK
ARG TORCH_INDEX_URL
# hadolint ignore=DL3013
RUN python3 -m venv /opt/ftjobs \
 && mkdir -p /src/common /src/jobs && touch /src/README.md /src/common/__init__.py /src/jobs/__init__.py \
 && if [ -s /tmp/build-ca/ca.crt ]; then export PIP_CERT=/tmp/build-ca/ca.crt; fi \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && /opt/ftjobs/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /wheels \
      -c "/src/$LOCK" "/src[train]" \
 && /opt/ftjobs/bin/pip uninstall --yes ftjobs \
 && /opt/ftjobs/bin/python /src/requirements/lockfile.py verify-env --lock "/src/$LOCK" \
      --pyproject /src/pyproject.toml --extras train --exclusive
# The experiment trackers `report_to` names (TensorBoard, MLflow, wandb) in a layer of their own, so
# train and merge keep sharing the large layer above.
# hadolint ignore=DL3013
RUN if [ -s /tmp/build-ca/ca.crt ]; then export PIP_CERT=/tmp/build-ca/ca.crt; fi \
 && /opt/ftjobs/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /wheels \
      -c "/src/$LOCK" "/src[train,tracking]" \
 && /opt/ftjobs/bin/pip uninstall --yes ftjobs \
 && /opt/ftjobs/bin/python /src/requirements/lockfile.py verify-env --lock "/src/$LOCK" \
      --pyproject /src/pyproject.toml --extras train,tracking --exclusive

# ---- source
FROM deps AS build
COPY README.md /src/README.md
COPY common /src/common
COPY jobs /src/jobs
RUN if [ -s /tmp/build-ca/ca.crt ]; then export PIP_CERT=/tmp/build-ca/ca.crt; fi \
 && /opt/ftjobs/bin/pip install --no-cache-dir --disable-pip-version-check --no-deps /src

# ---- runtime: the venv on a clean base, a non-root user, caches that work read-only
FROM ${BASE_IMAGE}${BASE_DIGEST}
ARG GIT_SHA=""
ARG IMAGE_REF=""
COPY --from=build /opt/ftjobs /opt/ftjobs
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin ftjobs \
 && mkdir -p /cache && chown 10001:10001 /cache
# With a read-only root filesystem only /tmp and /cache are writable (tmpfs / emptyDir):
# every cache a library may create points there.
ENV PATH=/opt/ftjobs/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/cache \
    HF_HOME=/cache/huggingface \
    TRITON_CACHE_DIR=/cache/triton \
    FTJOBS_CACHE=/cache/ftjobs \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FTJOBS_GIT_SHA=${GIT_SHA} \
    FTJOBS_IMAGE=${IMAGE_REF}
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["ftjobs", "train"]
