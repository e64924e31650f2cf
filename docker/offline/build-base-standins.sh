#!/usr/bin/env bash
# Build stand-ins for the base images the Dockerfiles expect, without a registry.
#
# Where no container registry can be reached (our CI and dev machines), `FROM
# python:3.11-slim-bookworm` cannot be pulled. A Debian bookworm root filesystem
# made with debootstrap and loaded with `docker import` can stand in for it: it has
# the same Debian release and the same Python minor version (bookworm ships 3.11),
# and the Dockerfiles only rely on `python3 -m venv`. Tagging it with the name the
# Dockerfiles expect lets them build unchanged; build with BASE_DIGEST="" (see
# docker/build-images.sh) because a locally imported image has no registry digest.
# https://wiki.debian.org/Debootstrap  https://docs.docker.com/reference/cli/docker/image/import/
#
# It also builds `ftjobs-moto-s3`, an S3-compatible server image (moto) for the compose
# rehearsal where MinIO's image cannot be pulled (docker/compose.moto-s3.yml).
#
# Usage: docker/offline/build-base-standins.sh   (root; needs debootstrap and a running dockerd)
# Env:   MIRROR (default: the first Debian mirror apt is configured with), FORCE=1 to rebuild,
#        WITH_MOTO=0 to skip the S3 server image (only the compose rehearsal needs it).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON_TAG="python:3.11-slim-bookworm"   # must match the tag in docker/*.Dockerfile (ARG BASE_IMAGE)
MOTO_TAG="ftjobs-moto-s3:5.2.5"           # must match docker/compose.moto-s3.yml
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

if [[ -z "${MIRROR:-}" ]]; then
  MIRROR="$( { grep -hoE '^URIs: *http[^ ]+debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null || true;
              grep -hoE '^deb +http[^ ]+debian/? ' /etc/apt/sources.list 2>/dev/null || true; } \
            | head -1 | sed -E 's/^(URIs: *|deb +)//; s/ *$//')"
  MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi

have() { docker image inspect "$1" >/dev/null 2>&1 && [[ "${FORCE:-0}" != 1 ]]; }

if have "$PYTHON_TAG"; then
  echo "stand-in $PYTHON_TAG already present (FORCE=1 rebuilds)"
else
  rootfs="$(mktemp -d /tmp/ftjobs-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  echo "debootstrap bookworm from $MIRROR -> $rootfs"
  # minbase + what python:3.11-slim offers that our images use: python3, venv, CA certificates.
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$MIRROR" >/tmp/ftjobs-debootstrap.log 2>&1 \
    || { tail -20 /tmp/ftjobs-debootstrap.log; exit 1; }
  # Keep the image small: apt lists, caches and docs are not needed at runtime.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/usr/share/doc/* \
         "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
  tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$PYTHON_TAG" >/dev/null
  rm -rf "$rootfs"; trap - EXIT
  echo "built stand-in $PYTHON_TAG ($(docker image inspect -f '{{.Size}}' "$PYTHON_TAG" | numfmt --to=iec))"
fi

if [[ "${WITH_MOTO:-1}" != 1 ]]; then
  :
elif have "$MOTO_TAG"; then
  echo "S3 server image $MOTO_TAG already present"
else
  # pip inside a build reaches PyPI only over the host network with the host CA bundle
  # (see shared/facts.md); the bundle travels in a throwaway context, never in the repo.
  ctx="$(mktemp -d /tmp/ftjobs-moto.XXXXXX)"
  cp docker/offline/moto-s3.Dockerfile "$ctx/Dockerfile"
  if [[ -f "$CA_BUNDLE" ]]; then cp "$CA_BUNDLE" "$ctx/ca.crt"; else : >"$ctx/ca.crt"; fi
  DOCKER_BUILDKIT=0 docker build -q --network host --build-arg BASE_IMAGE="$PYTHON_TAG" -t "$MOTO_TAG" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "built $MOTO_TAG"
fi
