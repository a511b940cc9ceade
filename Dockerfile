# topiary in a container: a build stage with the compiler and -dev packages,
# and a small runtime stage with only the shared libraries, curl for the
# health check and the binary. The package lists are read from tools/deps/,
# the same files tools/install-deps.sh reads.
#
#   docker build -t topiary .
#   docker run -p 8080:8080 -v topiary-state:/var/lib/topiary \
#     -e TOPIARY_TOKEN_FILE=/run/secrets/topiary-tokens topiary
#
# This image is not built in CI (no container engine there).

FROM debian:bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY tools/deps/build.txt /tmp/build.txt
# hadolint ignore=DL3008
RUN apt-get update \
 && sed -e 's/#.*//' -e '/^[[:space:]]*$/d' /tmp/build.txt \
    | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" CI=true topiary && strip topiary

FROM debian:bookworm AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY tools/deps/runtime.txt /tmp/runtime.txt
# hadolint ignore=DL3008
RUN apt-get update \
 && sed -e 's/#.*//' -e '/^[[:space:]]*$/d' /tmp/runtime.txt \
    | xargs apt-get install -y --no-install-recommends \
 && rm -rf /var/lib/apt/lists/* /tmp/runtime.txt \
 && groupadd --system --gid 10001 topiary \
 && useradd --system --uid 10001 --gid topiary --home-dir /var/lib/topiary \
      --shell /usr/sbin/nologin topiary \
 && install -d -m 0755 /data \
 && install -d -o topiary -g topiary -m 0750 /var/lib/topiary
COPY --from=build /src/topiary /usr/local/bin/topiary

# The database (SQLite in WAL mode: keep it on a local file system, not NFS)
# and the checkpoints live in the volume. Models and data sets are mounted
# read-only under /data and allowed through TOPIARY_FILE_ROOTS.
ENV TOPIARY_DB=/var/lib/topiary/topiary.db \
    TOPIARY_ARTIFACT_DIR=/var/lib/topiary/artifacts \
    TOPIARY_FILE_ROOTS=/data \
    TOPIARY_PORT=8080 \
    OMP_WAIT_POLICY=PASSIVE
VOLUME ["/var/lib/topiary"]
WORKDIR /var/lib/topiary
USER topiary:topiary
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
STOPSIGNAL SIGTERM
CMD ["topiary", "serve", "--listen", "0.0.0.0"]
