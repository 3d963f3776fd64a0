# syntax=docker/dockerfile:1
# The Versus binaries in one image: versus-api, versus-worker, versus-sim and the operator
# CLI versus (pick one with the container's command; compose.yaml does).
#
#   docker build -t versus .
#   docker run --rm -p 8080:8080 -e NATS_URL=nats://... -e VERSUS_HTTP_ADDR=0.0.0.0:8080 versus versus-api

# --- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# The whole workspace: the worker embeds migrations/ at compile time (sqlx::migrate!).
COPY . .
# Cache mounts keep the registry and the target directory between builds. They are not part
# of the image, so the binaries are copied out within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/versus-api target/release/versus-worker target/release/versus-sim \
       target/release/versus /out/

# --- run ---------------------------------------------------------------------------------
FROM debian:bookworm-slim
# CA certificates: the workers call the upstream (OpenAI) over TLS.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /app versus
COPY --from=build /out/ /usr/local/bin/
# The migrations are compiled into versus-worker; the SQL is here to read and for tooling.
COPY migrations /app/migrations
# The default object store is file://.data/objects under the working directory: make it
# writable (compose uses MinIO instead).
RUN install -d -o versus -g versus /app/.data
WORKDIR /app
USER versus
ENV RUST_LOG=info
# The API (8080), a worker's ops routes (9090, as compose sets them), the simulator (8787).
EXPOSE 8080 9090 8787
CMD ["versus-api"]
