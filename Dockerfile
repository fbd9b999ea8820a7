# syntax=docker/dockerfile:1
# Build: docker build -t training-worker .
# Run:   docker run -d --restart unless-stopped -v tw-data:/data -p 8787:8787 training-worker

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
# bash for the demo trainer; curl for the health check; tini as PID 1, so that trainer
# processes re-parented to PID 1 are reaped and signals reach the daemon.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash ca-certificates curl tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin worker \
    && mkdir -p /data /etc/training-worker /usr/local/lib/training-worker \
    && chown worker:worker /data
COPY --from=builder /src/target/release/training-worker /usr/local/bin/training-worker
COPY config/container.toml /etc/training-worker/config.toml
COPY config/demo-trainer.sh /usr/local/lib/training-worker/demo-trainer.sh

USER worker
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8787
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8787/healthz || exit 1
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/training-worker"]
CMD ["serve", "--config", "/etc/training-worker/config.toml"]
