# syntax=docker/dockerfile:1
# Build: docker build -t training-worker .
# Run:   docker run -d --restart unless-stopped --stop-timeout 30 -v tw-data:/data \
#          -p 8787:8787 -e TRAINING_WORKER_API_TOKEN=change-me training-worker
# Or:    docker compose -f deploy/docker-compose.yml up -d --build
# tests/container.rs checks this file's structure and runs the image's command directly.

FROM rust:1.95-slim-bookworm AS builder
WORKDIR /src
# Dependencies first, so that a source change does not rebuild them. The manifest declares
# a bench target, and cargo refuses a manifest whose target files are missing, so benches/
# comes along (it is not built).
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
# bash for the demo trainer; tini as PID 1 (see ENTRYPOINT). No curl: the health check is
# the binary itself. A real trainer brings its runtime: build FROM this image and add it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bash ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --home-dir /data --shell /usr/sbin/nologin worker \
    && mkdir -p /data /etc/training-worker /usr/local/lib/training-worker \
    && chown worker:worker /data
COPY --from=builder /src/target/release/training-worker /usr/local/bin/training-worker
COPY config/container.toml /etc/training-worker/config.toml
COPY config/demo-trainer.sh /usr/local/lib/training-worker/demo-trainer.sh

USER worker
WORKDIR /data
# The data dir (data_dir in config/container.toml): job files, queue.json, logs, the lock.
# It outlives the container, so a restarted container replays it.
VOLUME ["/data"]
EXPOSE 8787
# The daemon stops gracefully on SIGTERM within shutdown_grace (20s): give `docker stop` a
# longer timeout (--stop-timeout 30, compose's stop_grace_period: 30s); the default 10s
# ends in a SIGKILL, after which the next start replays the interrupted jobs anyway.
STOPSIGNAL SIGTERM
# `training-worker health` asks GET /healthz on TRAINING_WORKER_SERVER, else on
# TRAINING_WORKER_LISTEN, else on 127.0.0.1:8787 (the listen port of config/container.toml).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/usr/local/bin/training-worker", "health"]
# tini is PID 1, not the daemon. Trainers run in their own process groups, and what they
# spawn (data loader workers, torchrun ranks) is re-parented to PID 1 when its parent dies:
# PID 1 must reap it, or zombies pile up for the container's life. The daemon cannot be that
# reaper safely: a waitpid(-1) would also take the exit statuses of the trainers it waits
# for itself (through tokio), and lose their outcomes. tini reaps every orphan, passes
# SIGTERM and SIGINT to the daemon alone (which stops its trainers in order), and exits
# with the daemon's exit code.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/training-worker"]
CMD ["serve", "--config", "/etc/training-worker/config.toml"]
