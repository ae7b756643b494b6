# syntax=docker/dockerfile:1
# An upstream image plus a statically linked busybox at /probe/busybox, so that a compose healthcheck can GET a
# health endpoint inside images that ship neither a shell nor an HTTP client:
#
#   otel/opentelemetry-collector-contrib  FROM scratch: only the /otelcol-contrib binary and CA certificates
#   grafana/tempo                         distroless; the debug busybox of older tags is gone from newer ones
#                                         (grafana/tempo#5717), and `tempo -health` came after 2.9
#
# Used by docker/compose.yaml and docker/compose.infill.yaml with BASE_IMAGE set; the healthcheck is then
#   ["CMD", "/probe/busybox", "wget", "-q", "-O", "-", "http://127.0.0.1:PORT/PATH"]
# (busybox wget exits non-zero on a refused connection or an HTTP error status).
ARG BASE_IMAGE
# The musl variant of the official busybox image is built with CONFIG_STATIC=y: it runs without a libc.
ARG BUSYBOX_IMAGE=busybox:1.37.0-musl

FROM ${BUSYBOX_IMAGE} AS busybox

FROM ${BASE_IMAGE}
COPY --from=busybox /bin/busybox /probe/busybox
