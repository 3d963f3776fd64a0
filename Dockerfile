# syntax=docker/dockerfile:1
# Two images from one file (compose.yaml builds both, picking each with `target:`):
#
# - `versus` (the last stage, so the default): versus-api, versus-worker, versus-sim and the
#   operator CLI versus; pick one with the container's command.
# - `s3`: s3s-fs from crates.io, an S3-compatible server that keeps each bucket as a folder (the
#   one the tests run), as compose's store for the pictures.
#
#   docker build -t versus .
#   docker run --rm -p 127.0.0.1:8080:8080 -e NATS_URL=nats://... -e VERSUS_HTTP_ADDR=0.0.0.0:8080 versus versus-api
#   docker build --target s3 -t versus-s3 .
#
# Every base image is pinned: the Rust toolchain to the one the project builds and tests with
# (edition 2024, sqlx 0.9), Debian to a point release of trixie, the Rust image's own.

# --- build -------------------------------------------------------------------------------
FROM rust:1.95.0-trixie AS build
WORKDIR /src
# The whole workspace: cargo reads every member's manifest, and the worker embeds migrations/
# at compile time (sqlx::migrate!).
COPY . .
# Cache mounts keep the registry and the target directory between builds. They are not part
# of the image, so the binaries are copied out within the same step. Only the four binaries
# the image ships are built (not the benchmarks').
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
       --bin versus-api --bin versus-worker --bin versus-sim --bin versus \
    && mkdir -p /out \
    && cp target/release/versus-api target/release/versus-worker target/release/versus-sim \
       target/release/versus /out/

# --- s3s-fs ------------------------------------------------------------------------------
# The version scripts/test installs for the tests (S3S_FS_VERSION in scripts/lib.sh).
FROM rust:1.95.0-trixie AS s3-build
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    cargo install --locked --features binary --root /out s3s-fs@0.14.1

FROM debian:13.6-slim AS s3
COPY --from=s3-build /out/bin/s3s-fs /usr/local/bin/
# /data holds the buckets (one folder each); a volume mounted there starts out owned by s3s.
RUN useradd --system --uid 10002 --home-dir /data s3s \
    && install -d -o s3s -g s3s /data
USER s3s
EXPOSE 9000
CMD ["s3s-fs", "--host", "0.0.0.0", "--port", "9000", "/data"]

# --- versus ------------------------------------------------------------------------------
FROM debian:13.6-slim AS versus
# CA certificates: the workers call the upstream (OpenAI) over TLS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app versus
COPY --from=build /out/ /usr/local/bin/
# The migrations are compiled into versus-worker; the SQL is here to read and for tooling.
COPY migrations /app/migrations
# The default object store is file://.data/objects under the working directory: make it
# writable (compose uses its s3 service instead).
RUN install -d -o versus -g versus /app/.data
WORKDIR /app
USER versus
ENV RUST_LOG=info
# The API (8080), a worker's ops routes (9090, as compose sets them), the simulator (8787).
# No curl or wget: compose's healthchecks speak HTTP through bash's /dev/tcp.
EXPOSE 8080 9090 8787
CMD ["versus-api"]
