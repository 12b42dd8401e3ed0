# One image, three services: pick one with the container's command
# (session-svc, inference-svc or gateway). Built from the workspace root:
#   docker build -t palaver .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p session-svc -p inference-svc -p gateway

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 palaver
COPY --from=build /src/target/release/session-svc /src/target/release/inference-svc \
     /src/target/release/gateway /usr/local/bin/
USER palaver
ENV RUST_LOG=info
