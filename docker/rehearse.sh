#!/usr/bin/env bash
# The compose rehearsal end to end: build the images, run the chain, print the report.
#
#   docker/rehearse.sh              # CPU, MinIO
#   GPU=1 docker/rehearse.sh        # the GPU profile (docker/compose.gpu.yml)
#   OFFLINE=1 docker/rehearse.sh    # no registry: stand-in bases + moto's S3 server (compose.moto-s3.yml)
# Env: RUN_ID (default rehearsal-<time>), KEEP=1 leaves the store running afterwards,
# SKIP_BUILD=1 uses the images as they are. Works with `docker compose` and `docker-compose`.
set -euo pipefail
cd "$(dirname "$0")"

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); 
elif command -v docker-compose >/dev/null; then COMPOSE=(docker-compose);
else echo "needs docker compose (v2 plugin) or docker-compose (>= 1.29)" >&2; exit 2; fi

export RUN_ID="${RUN_ID:-rehearsal-$(date +%Y%m%d-%H%M%S)}"
FILES=(-f docker-compose.yml)
variant=cpu
if [[ "${GPU:-0}" == 1 ]]; then FILES+=(-f compose.gpu.yml); export FTJOBS_VARIANT=""; variant=gpu; fi
if [[ "${OFFLINE:-0}" == 1 ]]; then
  FILES+=(-f compose.moto-s3.yml)
  ./offline/build-base-standins.sh
fi
COMPOSE+=(-p ftjobs-rehearsal "${FILES[@]}")

start=$SECONDS
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  VARIANT="$variant" ./build-images.sh
fi
built=$SECONDS

cleanup() { [[ "${KEEP:-0}" == 1 ]] || "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "== rehearsal $RUN_ID: ${COMPOSE[*]} up"
# `up -d` starts each one-shot stage once the ones it depends on completed successfully and
# fails as soon as one does not; evaluate is the last to start, so wait for it to finish.
status=0
"${COMPOSE[@]}" up -d || status=$?
if [[ $status == 0 ]]; then
  status="$(docker wait "$("${COMPOSE[@]}" ps -q evaluate)")"
fi
for svc in seed prepare infer-base train merge infer evaluate; do
  cid="$("${COMPOSE[@]}" ps -q "$svc" 2>/dev/null || true)"
  [[ -n "$cid" ]] && printf '  %-11s exit %s\n' "$svc" "$(docker inspect -f '{{.State.ExitCode}}' "$cid")"
done
if [[ "$status" != 0 ]]; then
  "${COMPOSE[@]}" logs --tail 40 >&2 || true
  echo "== rehearsal FAILED (exit $status) after $((SECONDS - start))s" >&2
  exit 1
fi

# Copy the report out of the store, through the prepare image (it has the credentials' client).
out="$(cd .. && pwd)/runs/$RUN_ID"
mkdir -p "$out"
"${COMPOSE[@]}" run --rm --no-deps --user "$(id -u):$(id -g)" -v "$out:/out" --entrypoint python evaluate -c "
from common import storage
prefix = 's3://ftjobs/runs/$RUN_ID/evaluate/'
for o in storage.list_objects(prefix):
    storage.download_file(o.uri, storage.safe_destination(__import__('pathlib').Path('/out/evaluate'), o.rel))
" >/dev/null
echo "== rehearsal $RUN_ID passed: images ${built}s, chain $((SECONDS - built))s, total $((SECONDS - start))s"
echo "report: s3://ftjobs/runs/$RUN_ID/evaluate/ (in the compose store), copied to $out/evaluate/"
ls "$out/evaluate" | sed 's/^/  /'
