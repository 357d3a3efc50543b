#!/usr/bin/env bash
# The operator kit's checks; scripts/test.sh runs them after the cargo tests, and they run alone
# too (they build the debug binary if it is missing):
#
#   1. promtool: `check rules` and `test rules` on deploy/prometheus/alerts.yml,
#      `check config` on deploy/prometheus/prometheus.yml;
#   2. the compose kit's cross-file consistency (no Docker engine here) and the Dockerfile's
#      dependency layer (its stub sources must let cargo parse the manifests);
#   3. a gateway (debug binary, spool sink, every social channel configured) that has seen some
#      traffic: `promtool check metrics` on its scrape;
#   4. schemathesis against docs/openapi.yaml on the same gateway: no 5xx, responses match the
#      documented status codes, content types and schemas.
#
# promtool comes from Debian's `prometheus` package, downloaded and unpacked into .tools/
# (git-ignored, cached), not installed: installing it would start a Prometheus server on :9090.
# schemathesis (pinned) lives in a venv under .tools/.
#
# Env: OPS_MAX_EXAMPLES (schemathesis examples per operation, default 40).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
tools="$root/.tools"
mkdir -p "$tools"
log() { printf '== %s\n' "$*"; }

SCHEMATHESIS_VERSION=4.32.5

# ---- tools -----------------------------------------------------------------------------------
promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
  promtool="$tools/prometheus/usr/bin/promtool"
  if [ ! -x "$promtool" ]; then
    log "fetching promtool (Debian package prometheus, unpacked into .tools/)"
    rm -rf "$tools/deb" && mkdir -p "$tools/deb"
    (cd "$tools/deb" && { apt-get download -qq prometheus 2>/dev/null \
      || { apt-get update -qq && apt-get download -qq prometheus 2>/dev/null; }; })
    dpkg-deb -x "$tools"/deb/prometheus_*.deb "$tools/prometheus"
    # Only promtool is used; the server binary and the web assets go.
    find "$tools/prometheus" -mindepth 1 -maxdepth 1 ! -name usr -exec rm -rf {} +
    rm -rf "$tools/deb" "$tools/prometheus/usr/bin/prometheus" "$tools/prometheus/usr/share"
  fi
fi
"$promtool" --version 2>&1 | head -1

venv="$tools/venv"
if [ "$(cat "$venv/.schemathesis" 2>/dev/null)" != "$SCHEMATHESIS_VERSION" ]; then
  log "creating $venv with schemathesis $SCHEMATHESIS_VERSION"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
  echo "$SCHEMATHESIS_VERSION" > "$venv/.schemathesis"
fi
py="$venv/bin/python"

# ---- 1. rules and config ---------------------------------------------------------------------
log "promtool check rules / test rules / check config"
"$promtool" check rules deploy/prometheus/alerts.yml
"$promtool" test rules deploy/prometheus/alerts_test.yml
# The scrape target is the compose hostname `switchboard`: check config does not resolve it.
"$promtool" check config deploy/prometheus/prometheus.yml

# ---- 2. compose kit and Dockerfile -----------------------------------------------------------
log "compose kit"
"$py" scripts/ops_kit.py compose
log "Dockerfile dependency layer (scripts/docker-stubs.sh on the manifests alone)"
stubs=$(mktemp -d)
mkdir -p "$stubs/loadtest"
cp Cargo.toml Cargo.lock "$stubs/" && cp loadtest/Cargo.toml "$stubs/loadtest/"
sh scripts/docker-stubs.sh "$stubs"
(cd "$stubs" && cargo fetch --locked --quiet)
rm -rf "$stubs"

# ---- 3. a gateway with some traffic, and its scrape ------------------------------------------
cargo build --locked --quiet --bin switchboard
work=$(mktemp -d)
gateway_pid=
stop_gateway() {
  if [ -n "$gateway_pid" ]; then kill "$gateway_pid" 2>/dev/null || true; wait "$gateway_pid" 2>/dev/null || true; fi
  gateway_pid=
}
trap 'stop_gateway; rm -rf "$work"' EXIT

export SB_API_SECRET=ops-check-api-secret-0001
export SB_TWILIO_TOKEN=ops-check-twilio-token
export SB_META_SECRET=ops-check-meta-app-secret
export SB_TELEGRAM_TOKEN=ops-check-telegram-secret
export SB_X_SECRET=ops-check-x-consumer-secret
export SB_INBOUND_TOKEN=ops-check-inbound-token-01
export SB_ALIBABA_TOKEN=ops-check-alibaba-path-token
export SB_WECHAT_TOKEN=opscheckwechattoken
export SB_WEIBO_SECRET=ops-check-weibo-secret
export SB_VONAGE_SECRET=ops-check-vonage-secret
export SB_META_VERIFY_TOKEN=ops-check-verify
# Twilio signs over its configured public URL, so the public port is chosen before the start.
port=$("$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export SB_PUBLIC_URL="http://127.0.0.1:$port"
log "starting the gateway (spool sink, every channel configured)"
env SWITCHBOARD_HTTP__LISTEN="127.0.0.1:$port" SWITCHBOARD_ADMIN__LISTEN=127.0.0.1:0 \
  SWITCHBOARD_TWILIO__PUBLIC_URL="$SB_PUBLIC_URL" \
  SWITCHBOARD_EMAIL__SMTP_LISTEN=127.0.0.1:0 \
  SWITCHBOARD_SPOOL__DIR="$work/spool" SWITCHBOARD_EMAIL__ATTACHMENT_DIR="$work/attachments" \
  SWITCHBOARD_LOG__FORMAT=json SWITCHBOARD_LOG__LEVEL=warn \
  SWITCHBOARD_API__SECRETS="[\"$SB_API_SECRET\"]" \
  SWITCHBOARD_TWILIO__AUTH_TOKENS="[\"$SB_TWILIO_TOKEN\"]" \
  SWITCHBOARD_VONAGE__SECRETS="[\"$SB_VONAGE_SECRET\"]" \
  SWITCHBOARD_META__APP_SECRETS="[\"$SB_META_SECRET\"]" SWITCHBOARD_META__VERIFY_TOKEN="$SB_META_VERIFY_TOKEN" \
  SWITCHBOARD_TELEGRAM__SECRET_TOKENS="[\"$SB_TELEGRAM_TOKEN\"]" \
  SWITCHBOARD_X__CONSUMER_SECRETS="[\"$SB_X_SECRET\"]" \
  SWITCHBOARD_EMAIL__INBOUND_TOKENS="[\"$SB_INBOUND_TOKEN\"]" \
  SWITCHBOARD_ALIBABA__PATH_TOKEN="$SB_ALIBABA_TOKEN" \
  SWITCHBOARD_WECHAT__TOKENS="[\"$SB_WECHAT_TOKEN\"]" \
  SWITCHBOARD_WEIBO__APP_SECRETS="[\"$SB_WEIBO_SECRET\"]" \
  target/debug/switchboard --config config/switchboard.toml serve \
  >"$work/stdout" 2>"$work/gateway.log" &
gateway_pid=$!
read -r http admin < <("$py" scripts/ops_kit.py listening "$work/stdout")
log "gateway on $http (admin $admin); sending some traffic"
"$py" scripts/ops_kit.py traffic "$http" "$admin" "$SB_API_SECRET"

log "promtool check metrics on the live scrape"
"$py" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
  "http://$admin/metrics" > "$work/metrics.txt"
grep -q '^switchboard_sink_write_duration_seconds_bucket' "$work/metrics.txt"
grep -q '^switchboard_rejections_total{' "$work/metrics.txt"
"$promtool" check metrics < "$work/metrics.txt"

# ---- 4. schemathesis ---------------------------------------------------------------------------
examples=${OPS_MAX_EXAMPLES:-40}
checks=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance
# One worker: hypothesis parses lambdas with `ast.parse`, which CPython 3.11 before 3.11.8 can
# fail with "AST constructor recursion depth mismatch" when threads do it at once.
run_schemathesis() {
  local url=$1; shift
  SCHEMATHESIS_HOOKS=schemathesis_hooks PYTHONPATH="$root/scripts" \
    "$venv/bin/schemathesis" --config-file scripts/schemathesis.toml run docs/openapi.yaml --url "$url" --checks "$checks" \
    --max-examples "$examples" --seed 1 --workers 1 --request-timeout 20 \
    --suppress-health-check all --no-color "$@"
}
log "schemathesis: public listener ($examples examples per operation)"
run_schemathesis "http://$http" --exclude-tag admin
# The signing hooks work: generated requests became records on the signed channels (schema-valid
# bodies that pass the checks), not only rejections.
"$py" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' \
  "http://$admin/metrics" > "$work/metrics-after.txt"
log "records written during the run, by channel:"
grep '^switchboard_records_emitted_total' "$work/metrics-after.txt" | sed 's/^/   /'
emitted() { awk -v c="{channel=\"$1\"," 'index($0, "switchboard_records_emitted_total" c) == 1 { n += $2 } END { print n + 0 }' "$2"; }
for channel in api twilio vonage alibaba weibo; do
  if [ "$(emitted "$channel" "$work/metrics-after.txt")" -le "$(emitted "$channel" "$work/metrics.txt")" ]; then
    echo "no $channel record came of schemathesis' signed requests (scripts/schemathesis_hooks.py)" >&2
    exit 1
  fi
done
log "schemathesis: admin listener"
run_schemathesis "http://$admin" --include-tag admin
stop_gateway
if grep -q '"level":"ERROR"' "$work/gateway.log"; then
  grep '"level":"ERROR"' "$work/gateway.log" | head -20
  echo "the gateway logged errors during the checks" >&2
  exit 1
fi
log "operator kit checks passed"
