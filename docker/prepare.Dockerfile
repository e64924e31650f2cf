# ftjobs prepare image: slim Python, no torch. It also runs `ftjobs evaluate`.
#   docker build -f docker/prepare.Dockerfile -t ftjobs-prepare:0.1.0 .
#   docker run --rm ftjobs-prepare:0.1.0 --help
# docker/build-images.sh builds every image (CPU/GPU variants, offline, wheelhouse, push).
#
# The base is pinned by tag and digest. Where no registry can be reached, build the
# stand-in (docker/offline/build-base-standins.sh) and pass --build-arg BASE_DIGEST=
# (empty): a locally imported image has no registry digest to match.
ARG BASE_IMAGE=python:3.11-slim-bookworm
ARG BASE_DIGEST=@sha256:2e32f7d302adc1c37428355c1e646897c0c53f4fd60b6a551245fb90ee129f91
# Every version comes from a lock written by `make lock` (requirements/lockfile.py): the GPU images' by
# default, requirements/lock-cpu.txt for VARIANT=cpu builds. Prepare's packages have one version in both.
ARG LOCK=requirements/lock-gpu.txt

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
# the lock pins (pip's -c); verify-env then fails the build unless the venv holds the lock and nothing else.
ARG LOCK
# hadolint ignore=DL3013
RUN python3 -m venv /opt/ftjobs \
 && mkdir -p /src/common /src/jobs && touch /src/README.md /src/common/__init__.py /src/jobs/__init__.py \
 && if [ -s /tmp/build-ca/ca.crt ]; then export PIP_CERT=/tmp/build-ca/ca.crt; fi \
 && /opt/ftjobs/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /wheels \
      -c "/src/$LOCK" "/src[prepare,driver]" \
 && /opt/ftjobs/bin/pip uninstall --yes ftjobs \
 && /opt/ftjobs/bin/python /src/requirements/lockfile.py verify-env --lock "/src/$LOCK" \
      --pyproject /src/pyproject.toml --extras prepare,driver --exclusive

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
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FTJOBS_GIT_SHA=${GIT_SHA} \
    FTJOBS_IMAGE=${IMAGE_REF}
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["ftjobs", "prepare"]
