# Switchboard container image. deploy/compose.yaml builds it (with Kafka, Prometheus, Grafana).
#
#   docker build -t switchboard .
#   docker run --rm -p 8080:8080 -p 127.0.0.1:9090:9090 \
#     -e SWITCHBOARD_API__SECRETS='["a-real-secret-of-16+-chars"]' \
#     -e SWITCHBOARD_KAFKA__BROKERS=kafka:9092 \
#     -v switchboard-spool:/var/lib/switchboard/spool switchboard
#
# The shipped config carries a local-trial api secret: set SWITCHBOARD_API__SECRETS in any real
# deployment. Mount a volume on the spool directory: it holds records not yet in Kafka, and with
# no kafka.brokers configured it is the only copy.

# ---- builder -------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

# rdkafka builds its bundled librdkafka with configure + make (no cmake); openssl-sys links the
# system OpenSSL; mimalloc (the global allocator) compiles its C sources with cc. The phone
# metadata of rlibphonenumber is compiled by its build script in pure Rust (no protoc).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependency layer: only the manifests and the lock file, with stub sources, so editing the
# code does not rebuild the dependencies (librdkafka, mimalloc's C sources). Every target the
# manifests declare (the benches, the loadtest member) needs a file for the workspace manifest
# to load: scripts/docker-stubs.sh writes them from Cargo.toml (CI runs it too, so a new target
# cannot break this layer unnoticed).
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
COPY scripts/docker-stubs.sh /usr/local/bin/docker-stubs.sh
RUN sh /usr/local/bin/docker-stubs.sh \
 && cargo build --release --locked -p switchboard \
 && rm -rf src loadtest/src benches

# The real sources. COPY keeps the files' original mtimes, which can be older than the stub
# build: touch them so cargo rebuilds the crate instead of keeping the stub binary.
COPY src src
COPY static static
COPY benches benches
COPY loadtest/src loadtest/src
COPY config config
RUN find src -name '*.rs' -exec touch {} + \
 && cargo build --release --locked -p switchboard \
 && ./target/release/switchboard --version

# ---- runtime -------------------------------------------------------------------------------
FROM debian:bookworm-slim

# libssl3 for the dynamically linked OpenSSL; libz and libgcc_s are already in the base image.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 switchboard \
 && useradd --uid 10001 --gid 10001 --home-dir /var/lib/switchboard --no-create-home \
      --shell /usr/sbin/nologin switchboard \
 && mkdir -p /var/lib/switchboard/spool /var/lib/switchboard/attachments \
 && chown -R 10001:10001 /var/lib/switchboard

COPY --from=builder /src/target/release/switchboard /usr/local/bin/switchboard
COPY config/switchboard.toml /etc/switchboard/switchboard.toml
# The triage rules: mount your own over it and send SIGHUP to reload.
COPY config/triage.toml /etc/switchboard/triage.toml

WORKDIR /var/lib/switchboard

# Listen on all interfaces inside the container (the shipped config uses loopback), log JSON,
# keep the spool under the writable work directory. Any other key: SWITCHBOARD_<SECTION>__<KEY>.
ENV SWITCHBOARD_HTTP__LISTEN=0.0.0.0:8080 \
    SWITCHBOARD_ADMIN__LISTEN=0.0.0.0:9090 \
    SWITCHBOARD_EMAIL__SMTP_LISTEN=0.0.0.0:2525 \
    SWITCHBOARD_LOG__FORMAT=json \
    SWITCHBOARD_SPOOL__DIR=/var/lib/switchboard/spool \
    SWITCHBOARD_TRIAGE__RULES_FILE=/etc/switchboard/triage.toml

# 8080 public (webhooks, /v1/events), 9090 admin (/metrics, /healthz, /readyz: keep it
# private), 2525 SMTP (email channel).
EXPOSE 8080 9090 2525

# No HEALTHCHECK: the image has no HTTP client. Probe GET /healthz and /readyz on 9090 from the
# orchestrator instead.

USER 10001:10001

# SIGTERM (docker stop) triggers the graceful shutdown: stop accepting, drain, flush, exit 0.
ENTRYPOINT ["switchboard", "--config", "/etc/switchboard/switchboard.toml"]
CMD ["serve"]
