#!/usr/bin/env bash
# The test command (what .ci/run calls): installs what the build and the broker need, fetches
# and starts a real Apache Kafka broker (KRaft, from Maven Central) on loopback, runs formatting,
# lint and every test against it, and stops the broker however the run ends.
#
#   scripts/test.sh                 everything
#   scripts/test.sh -- <args>       extra arguments for `cargo test` (e.g. a test name filter)
#
# Env: KAFKA_TEST_PORT (default 19092; the controller takes the next port), REDIS_TEST_PORT
# (default 16379).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '== %s\n' "$*"; }

# 1. System packages: a C toolchain, pkg-config and OpenSSL headers for rdkafka's bundled
#    librdkafka; swaks (an SMTP test client the email tests drive); a Java 17 runtime and
#    Maven for the broker; Debian's Chromium and ChromeDriver for the chat widget's browser test;
#    the openssl CLI, whose s_client offers the TLS 1.0/1.1 that rustls cannot (e2e_tls);
#    redis-server for the shared dedupe/limits store (src/shared.rs, e2e_redis).
missing=()
for pkg in build-essential pkg-config libssl-dev swaks chromium chromium-driver openssl redis-server; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
# The operator kit checks (step 5) make a Python venv for schemathesis.
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# 2. The browser test's driver: playwright-core from npm (it drives the system Chromium; no
#    browser download), pinned by tests/browser/package-lock.json.
log "npm ci (tests/browser)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)
export SWITCHBOARD_TEST_BROWSER=1

# 3. The broker: jars cached under .kafka/ (git-ignored), started on loopback, always stopped.
port=${KAFKA_TEST_PORT:-19092}
broker_dir="$root/.kafka/test-broker"
log "fetching Apache Kafka from Maven Central (cached after the first run)"
bash scripts/kafka.sh fetch
redis_port=${REDIS_TEST_PORT:-16379}
redis_pidfile="$root/.kafka/redis-$redis_port.pid"
stop_redis() {
  if [ -s "$redis_pidfile" ]; then
    kill "$(cat "$redis_pidfile")" 2>/dev/null || true
    rm -f "$redis_pidfile"
  fi
}
cleanup() {
  bash scripts/kafka.sh stop "$broker_dir" >/dev/null 2>&1 || true
  stop_redis
}
trap cleanup EXIT
cleanup
log "starting Kafka on 127.0.0.1:$port"
bash scripts/kafka.sh start "$broker_dir" "$port"
export SWITCHBOARD_TEST_KAFKA="127.0.0.1:$port"

# 3b. A private redis-server on loopback, no persistence, stopped with the broker.
mkdir -p "$root/.kafka"
log "starting redis-server on 127.0.0.1:$redis_port"
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --daemonize yes --pidfile "$redis_pidfile" --logfile "$root/.kafka/redis-$redis_port.log"
for _ in $(seq 1 100); do
  redis-cli -p "$redis_port" ping 2>/dev/null | grep -q PONG && break
  sleep 0.1
done
redis-cli -p "$redis_port" ping | grep -q PONG || { echo "redis-server did not start" >&2; exit 1; }
export SWITCHBOARD_TEST_REDIS="redis://127.0.0.1:$redis_port"

# 4. Format, lint, tests (unit tests, end-to-end tests against the broker, doc tests).
log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "cargo test"
extra=()
if [ "${1:-}" = "--" ]; then shift; extra=("$@"); fi
cargo test --workspace --all-targets --locked "${extra[@]}"

# 4b. Fuzz smoke: every cargo-fuzz target (fuzz/) for 10 s from its committed seeds; any
#     crash fails the run (README "Fuzzing"). Installs cargo-fuzz if missing.
log "fuzz smoke (scripts/fuzz.sh smoke)"
bash scripts/fuzz.sh smoke 10

# 5. The operator kit: promtool on the alert rules, their unit tests and a live scrape;
#    schemathesis against docs/openapi.yaml on a running gateway (about 3 minutes).
log "operator kit checks (scripts/ops-check.sh)"
bash scripts/ops-check.sh
log "all tests passed"
