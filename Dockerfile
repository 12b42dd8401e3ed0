# syntax=docker/dockerfile:1
# One image: the three services and the `palaver` CLI (health probes, chat,
# send). Pick one with the container's command: session-svc, inference-svc,
# gateway or palaver. From the workspace root:
#   docker build -t palaver .        (scripts/image builds, tags and publishes)

# The latest stable Rust on the same Debian release as the runtime image
# below (glibc must match); pin e.g. RUST_VERSION=1.95 for a repeatable build.
ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# Stripped binaries for the image. The workspace profile keeps line tables
# for profiling on a developer's machine; a container has no use for them.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_DEBUG=0 \
    CARGO_TERM_COLOR=never

# Dependencies first, in a layer of their own: the manifests, the lock file
# and the proto crate (its generated code rarely changes), with every other
# crate's sources stubbed out. A change to palaver's sources starts below.
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY core/Cargo.toml core/projects.default.toml core/
COPY session-svc/Cargo.toml session-svc/
COPY inference-svc/Cargo.toml inference-svc/
COPY gateway/Cargo.toml gateway/
COPY testkit/Cargo.toml testkit/
COPY tests/Cargo.toml tests/
COPY palaver/Cargo.toml palaver/
RUN for crate in core session-svc inference-svc gateway testkit tests palaver; do \
        mkdir -p "$crate/src" && : > "$crate/src/lib.rs"; \
    done \
    && for bin in session-svc inference-svc gateway palaver; do \
        echo 'fn main() {}' > "$bin/src/main.rs"; \
    done \
    && cargo build --release --locked -p session-svc -p inference-svc -p gateway -p palaver

# palaver's own crates. COPY keeps the files' old timestamps, older than the
# stubs' build: touch them so cargo rebuilds the crates from the real sources.
COPY core core
COPY session-svc session-svc
COPY inference-svc inference-svc
COPY gateway gateway
COPY testkit testkit
COPY tests tests
COPY palaver palaver
RUN find core session-svc inference-svc gateway testkit tests palaver -type f -exec touch {} + \
    && cargo build --release --locked -p session-svc -p inference-svc -p gateway -p palaver

FROM debian:bookworm-slim
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="palaver" \
      org.opencontainers.image.description="MQTT clients chat with an LLM served by vLLM: gateway, session-svc, inference-svc and the palaver CLI" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}"
# ca-certificates: TLS to model servers and Redis by the system's roots. Not
# pinned to a version: the security updates of bookworm are what it should get.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 palaver \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin palaver
COPY --from=build /src/target/release/session-svc /src/target/release/inference-svc \
     /src/target/release/gateway /src/target/release/palaver /usr/local/bin/
# Numeric, so that Kubernetes can check runAsNonRoot without the passwd file.
USER 10001:10001
ENV RUST_LOG=info
# gRPC: session-svc 50051, inference-svc 50052; metrics: gateway 9100 (also
# /healthz, /readyz), session-svc 9101, inference-svc 9102.
EXPOSE 50051 50052 9100 9101 9102
# Probes what PALAVER_HEALTH_GRPC / PALAVER_HEALTH_HTTP name (compose sets
# them per service; Kubernetes ignores HEALTHCHECK and uses its own probes).
# Without either the container reports unhealthy, saying why.
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 CMD ["palaver", "health"]
