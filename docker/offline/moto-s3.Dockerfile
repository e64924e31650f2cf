# An S3-compatible server (moto) for the compose rehearsal where MinIO's image cannot
# be pulled. Built by docker/offline/build-base-standins.sh; used by docker/compose.moto-s3.yml.
# moto 5.2.5 answers 412 to create-only writes (If-None-Match: *), which the manifest
# contract relies on; older releases answered 500 (see shared/facts.md).
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
COPY ca.crt /tmp/ca.crt
RUN python3 -m venv /opt/moto \
 && if [ -s /tmp/ca.crt ]; then export PIP_CERT=/tmp/ca.crt; fi \
 && /opt/moto/bin/pip install --no-cache-dir --disable-pip-version-check "moto[server]==5.2.5" \
 && rm -f /tmp/ca.crt
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent moto
USER 10001:10001
EXPOSE 9000
HEALTHCHECK --interval=2s --timeout=2s --retries=30 \
  CMD ["/opt/moto/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9000/moto-api/')"]
ENTRYPOINT ["/opt/moto/bin/moto_server", "--host", "0.0.0.0", "--port", "9000"]
