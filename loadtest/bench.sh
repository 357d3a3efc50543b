#!/usr/bin/env bash
# Issue 8's measurement set on this machine, against release binaries. Writes a results
# directory with the JSON and HTML report of every step and summary.md (+ summary.json).
#
#   loadtest/bench.sh [options]
#
# Steps (--steps picks some; the order is fixed so each ceiling run and its gateway run are
# back to back, and every pair is repeated --repeat times to show the spread):
#   a  closed loop, twilio-only mix: bare hyper ceiling, then the gateway with the spool sink
#      (signed Twilio SMS -> verify -> normalise -> triage -> dedupe -> limits -> spool): ratio
#   c  open loop at half the spool maximum (median of a): p99 to the spool
#   d  SMTP, 10 KB mails with pipelining: closed loop (max msg/s), then open loop at --smtp-rates
#   e  websockets: --chat-sessions sessions at --chat-total-rate messages/s: ack p99, gateway RSS
#      (a fresh gateway, as for f)
#   f  (only with --long) --long-duration open loop at half the spool maximum, RSS slope
#   b  the same closed-loop pairs with Kafka as the sink (a broker from scripts/kafka.sh on
#      --kafka-port), then open loop at half the Kafka maximum, and `verify`: lost must be 0
#
# The gateway runs with limits raised, not disabled (the limiter's cost is measured): per
# source and per channel 1e6/s, per customer 10/s (a chat session is one customer), chat 600
# messages/minute per connection; with the Meta and WeChat secrets the harness uses; logging as
# shipped (info, one line per accepted complaint; JSON). Its fd limit and the harness's are raised to the hard limit.
#
# For a functional check with short steps: --duration 3s --warmup 1s --repeat 1
# --chat-sessions 200 --smtp-rates 100 --nice 19. Exit status: 0 when every step ran and verify
# found nothing lost, 1 otherwise.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

out="loadtest/results/$(date -u +%Y%m%dT%H%M%SZ)"
duration=30s
warmup=5s
repeat=3
concurrency=64
steps="a c d e f b"
long=0
long_duration=10m
long_mix=twilio
kafka_port=19092
http_port=18080
admin_port=19090
smtp_port=12525
ceiling_port=18090
smtp_connections=32
smtp_size=10k
smtp_rates="500 1000 2000"
chat_sessions=10000
chat_total_rate=5000
build=1
nice_level=""
log_level=info
gateway_bin=""

usage() {
  sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF

Options (defaults in brackets):
  --out DIR               results directory [loadtest/results/<UTC time>]
  --duration D            measured time of each step [$duration]
  --warmup D              warm-up of each step [$warmup]
  --repeat N              ceiling/gateway pairs per sink [$repeat]
  --concurrency N         closed-loop workers [$concurrency]
  --steps "a c d e f b"   which steps to run [$steps]
  --long                  run step f (the long memory run)
  --long-duration D       its length [$long_duration]
  --long-mix MIX          its mix [$long_mix]
  --kafka-port P          broker port (the controller takes P+1) [$kafka_port]
  --http-port P, --admin-port P, --smtp-port P, --ceiling-port P
                          listeners [$http_port, $admin_port, $smtp_port, $ceiling_port]
  --smtp-connections N    SMTP pool [$smtp_connections]
  --smtp-size S           mail size [$smtp_size]
  --smtp-rates "R ..."    open-loop SMTP rates [$smtp_rates]
  --chat-sessions N       websocket sessions [$chat_sessions]
  --chat-total-rate R     messages/s over all sessions [$chat_total_rate]
  --no-build              use the release binaries as they are
  --nice N                run every process under nice -n N (functional checks on a busy box)
  --log-level L           the gateway's log level [$log_level]
  --gateway-bin PATH      the gateway binary to measure, e.g. an older build for a
                          before/after in the same run [target/release/switchboard]
EOF
}

while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift ;;
    --duration) duration=$2; shift ;;
    --warmup) warmup=$2; shift ;;
    --repeat) repeat=$2; shift ;;
    --concurrency) concurrency=$2; shift ;;
    --steps) steps=$2; shift ;;
    --long) long=1 ;;
    --long-duration) long_duration=$2; shift ;;
    --long-mix) long_mix=$2; shift ;;
    --kafka-port) kafka_port=$2; shift ;;
    --http-port) http_port=$2; shift ;;
    --admin-port) admin_port=$2; shift ;;
    --smtp-port) smtp_port=$2; shift ;;
    --ceiling-port) ceiling_port=$2; shift ;;
    --smtp-connections) smtp_connections=$2; shift ;;
    --smtp-size) smtp_size=$2; shift ;;
    --smtp-rates) smtp_rates=$2; shift ;;
    --chat-sessions) chat_sessions=$2; shift ;;
    --chat-total-rate) chat_total_rate=$2; shift ;;
    --no-build) build=0 ;;
    --nice) nice_level=$2; shift ;;
    --log-level) log_level=$2; shift ;;
    --gateway-bin) gateway_bin=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

has_step() { case " $steps " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
command -v python3 >/dev/null || { echo "bench.sh: python3 is needed for the summary" >&2; exit 2; }
command -v curl >/dev/null || { echo "bench.sh: curl is needed to wait for the gateway" >&2; exit 2; }

pre=()
if [ -n "$nice_level" ]; then pre=(nice -n "$nice_level"); fi

if [ "$build" = 1 ]; then
  "${pre[@]}" cargo build --release --workspace
fi
gw=${gateway_bin:-$root/target/release/switchboard}
lt="$root/target/release/switchboard-loadtest"
for b in "$gw" "$lt"; do
  [ -x "$b" ] || { echo "bench.sh: $b is missing (build with cargo build --release --workspace)" >&2; exit 2; }
done

mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
work="$out/work"
mkdir -p "$work"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "bench: results in $out (fd limit $(ulimit -n))"

# Processes this script started, by pid; stopped on exit.
ceiling_pid=""
gw_pid=""
kafka_dir=""
failed=0
cleanup() {
  [ -n "$gw_pid" ] && kill "$gw_pid" 2>/dev/null && wait "$gw_pid" 2>/dev/null || true
  [ -n "$ceiling_pid" ] && kill "$ceiling_pid" 2>/dev/null && wait "$ceiling_pid" 2>/dev/null || true
  if [ -n "$kafka_dir" ]; then bash scripts/kafka.sh stop "$kafka_dir" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

gateway_url="http://127.0.0.1:$http_port"
ceiling_url="http://127.0.0.1:$ceiling_port"

# start_gateway NAME [KAFKA_BROKERS]
start_gateway() {
  local name=$1 brokers=${2:-}
  local envs=(
    SWITCHBOARD_HTTP__LISTEN="127.0.0.1:$http_port"
    SWITCHBOARD_HTTP__MAX_CONNECTIONS=30000
    SWITCHBOARD_ADMIN__LISTEN="127.0.0.1:$admin_port"
    SWITCHBOARD_EMAIL__SMTP_LISTEN="127.0.0.1:$smtp_port"
    SWITCHBOARD_EMAIL__MAX_CONNECTIONS=2000
    SWITCHBOARD_EMAIL__ATTACHMENT_DIR="$work/attachments-$name"
    SWITCHBOARD_SPOOL__DIR="$work/spool-$name"
    SWITCHBOARD_LOG__LEVEL="$log_level"
    SWITCHBOARD_LOG__FORMAT=json
    SWITCHBOARD_META__APP_SECRETS='["loadtest-meta-app-secret"]'
    SWITCHBOARD_WECHAT__TOKENS='["loadtestwechattoken"]'
    SWITCHBOARD_LIMITS__PER_SOURCE__PER_SECOND=1000000.0
    SWITCHBOARD_LIMITS__PER_SOURCE__BURST=1000000
    SWITCHBOARD_LIMITS__PER_CHANNEL__PER_SECOND=1000000.0
    SWITCHBOARD_LIMITS__PER_CHANNEL__BURST=1000000
    SWITCHBOARD_LIMITS__PER_CUSTOMER__PER_SECOND=10.0
    SWITCHBOARD_LIMITS__PER_CUSTOMER__BURST=100
    SWITCHBOARD_CHAT__MAX_SESSIONS=30000
    SWITCHBOARD_CHAT__MESSAGES_PER_MINUTE=600
    SWITCHBOARD_CHAT__MESSAGE_BURST=100
    SWITCHBOARD_KAFKA__BROKERS="$brokers"
  )
  env "${envs[@]}" "$gw" check-config > "$out/logs/gateway-$name.config" 2>&1 \
    || { cat "$out/logs/gateway-$name.config" >&2; echo "bench.sh: the gateway refused its config" >&2; exit 1; }
  env "${envs[@]}" "${pre[@]}" "$gw" serve > "$out/logs/gateway-$name.log" 2>&1 &
  gw_pid=$!
  local probe=/healthz
  if [ -n "$brokers" ]; then probe=/readyz; fi
  for _ in $(seq 1 300); do
    if ! kill -0 "$gw_pid" 2>/dev/null; then
      tail -n 30 "$out/logs/gateway-$name.log" >&2; echo "bench.sh: the gateway exited" >&2; exit 1
    fi
    if curl -fs "http://127.0.0.1:$admin_port$probe" >/dev/null 2>&1; then
      echo "bench: gateway ($name sink) pid $gw_pid"
      return 0
    fi
    sleep 0.2
  done
  echo "bench.sh: the gateway did not become ready on $probe" >&2; exit 1
}

stop_gateway() {
  if [ -n "$gw_pid" ]; then
    kill "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
    gw_pid=""
  fi
}

start_ceiling() {
  "${pre[@]}" "$lt" ceiling --listen "127.0.0.1:$ceiling_port" > "$out/logs/ceiling.log" 2>&1 &
  ceiling_pid=$!
  for _ in $(seq 1 100); do
    if curl -fs "$ceiling_url/" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "bench.sh: the ceiling server did not start" >&2; exit 1
}

# step NAME ARGS... : one `run` with its JSON, HTML and log; the step fails if the run does.
step() {
  local name=$1; shift
  echo "bench: $name"
  if ! "${pre[@]}" "$lt" run --duration "$duration" --warmup "$warmup" \
      --out "$out/$name.json" --html "$out/$name.html" "$@" > "$out/logs/$name.log" 2>&1; then
    echo "bench: step $name FAILED (see logs/$name.log)" >&2
    tail -n 5 "$out/logs/$name.log" >&2
    failed=1
  fi
}

# median_ok NAME_PREFIX: the median ok_rps of the steps NAME_PREFIX-1..N.
median_ok() {
  python3 - "$out" "$1" "$repeat" <<'PY'
import json, sys, statistics
out, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
vals = []
for i in range(1, n + 1):
    try:
        vals.append(json.load(open(f"{out}/{prefix}-{i}.json"))["total"]["ok_rps"])
    except (OSError, KeyError, ValueError):
        pass
print(int(statistics.median(vals)) if vals else 0)
PY
}

half() { python3 -c "import sys; print(max(1, int(sys.argv[1]) // 2))" "$1"; }

twilio=(--mix twilio --dup-ratio 0 --concurrency "$concurrency")
chat_rate=$(python3 -c "import sys; print(float(sys.argv[1]) / max(1, int(sys.argv[2])))" "$chat_total_rate" "$chat_sessions")

spool_steps=0
for s in a c d e f; do if has_step "$s"; then spool_steps=1; fi; done
if [ "$spool_steps" = 1 ] || has_step b; then start_ceiling; fi

if [ "$spool_steps" = 1 ]; then
  start_gateway spool
  if has_step a; then
    for i in $(seq 1 "$repeat"); do
      step "a-ceiling-$i" --target "$ceiling_url" "${twilio[@]}"
      step "a-spool-$i" --target "$gateway_url" "${twilio[@]}" --gateway-pid "$gw_pid"
    done
  fi
  spool_max=$(median_ok a-spool)
  if has_step c; then
    if [ "$spool_max" -gt 0 ]; then
      step c-spool-open --target "$gateway_url" --mix twilio --rate "$(half "$spool_max")" --gateway-pid "$gw_pid"
    else
      echo "bench: step c needs step a's maximum; skipped" >&2
    fi
  fi
  if has_step d; then
    smtp=(--target "$gateway_url" --mix smtp --smtp-target "127.0.0.1:$smtp_port"
      --smtp-connections "$smtp_connections" --smtp-size "$smtp_size" --gateway-pid "$gw_pid")
    step d-smtp-closed "${smtp[@]}" --concurrency "$smtp_connections"
    for r in $smtp_rates; do
      step "d-smtp-open-$r" "${smtp[@]}" --rate "$r"
    done
  fi
  # Steps e and f report the gateway's memory: each gets a fresh gateway, so the dedupe
  # windows and caches the earlier steps filled do not count against it.
  if has_step e; then
    stop_gateway
    start_gateway chat
    step e-chat --target "$gateway_url" --mix none --chat-sessions "$chat_sessions" \
      --chat-rate "$chat_rate" --gateway-pid "$gw_pid"
  fi
  if has_step f && [ "$long" = 1 ]; then
    if [ "$spool_max" -gt 0 ]; then
      duration_saved=$duration
      duration=$long_duration
      stop_gateway
      start_gateway long
      step f-long --target "$gateway_url" --mix "$long_mix" --rate "$(half "$spool_max")" --gateway-pid "$gw_pid"
      duration=$duration_saved
    else
      echo "bench: step f needs step a's maximum; skipped" >&2
    fi
  fi
  stop_gateway
fi

if has_step b; then
  kafka_dir="$work/kafka"
  "${pre[@]}" bash scripts/kafka.sh start "$kafka_dir" "$kafka_port" > "$out/logs/kafka.log" 2>&1 \
    || { tail -n 20 "$out/logs/kafka.log" >&2; echo "bench.sh: the Kafka broker did not start" >&2; exit 1; }
  brokers="127.0.0.1:$kafka_port"
  start_gateway kafka "$brokers"
  for i in $(seq 1 "$repeat"); do
    step "b-ceiling-$i" --target "$ceiling_url" "${twilio[@]}"
    step "b-kafka-$i" --target "$gateway_url" "${twilio[@]}" --gateway-pid "$gw_pid" \
      --acked "$work/acked-b-kafka-$i.jsonl"
  done
  kafka_max=$(median_ok b-kafka)
  if [ "$kafka_max" -gt 0 ]; then
    step b-kafka-open --target "$gateway_url" --mix twilio --rate "$(half "$kafka_max")" \
      --gateway-pid "$gw_pid" --acked "$work/acked-b-kafka-open.jsonl"
  fi
  for f in "$work"/acked-b-kafka-*.jsonl; do
    [ -f "$f" ] || continue
    n=$(basename "$f" .jsonl)
    echo "bench: verify $n"
    if ! "${pre[@]}" "$lt" verify --brokers "$brokers" --acked "$f" --timeout 120s \
        > "$out/verify-${n#acked-}.json" 2> "$out/logs/verify-${n#acked-}.log"; then
      echo "bench: verify of $n found losses or failed (see verify-${n#acked-}.json)" >&2
      failed=1
    fi
  done
  stop_gateway
  bash scripts/kafka.sh stop "$kafka_dir" >/dev/null 2>&1 || true
  kafka_dir=""
fi

python3 - "$out" "$repeat" <<'PY'
import glob, json, os, statistics, sys

out, repeat = sys.argv[1], int(sys.argv[2])
def load(name):
    try:
        return json.load(open(os.path.join(out, name + ".json")))
    except (OSError, ValueError):
        return None

def ms(us):
    return f"{us / 1000:.2f}"

rows, summary = [], {"steps": {}, "pairs": {}, "verify": {}}
for path in sorted(glob.glob(os.path.join(out, "[a-f]-*.json"))):
    name = os.path.basename(path)[:-5]
    r = load(name)
    if r is None:
        continue
    c = r["config"]
    mode = {"open": f"open {c.get('rate')}/s", "closed": f"closed {c.get('concurrency')}"}.get(c["mode"], c["mode"])
    t = r["total"]
    l = t["latency_us"]
    notes = []
    res = r.get("resources") or {}
    rss = res.get("gateway_rss_mb")
    if rss:
        slope = rss.get("slope_mb_per_min")
        notes.append(f"RSS {rss['start']:.0f}→{rss['end']:.0f} MB (max {rss['max']:.0f}" + (f", {slope:+.2f} MB/min)" if slope is not None else ")"))
    if res.get("gateway_cpu_cores") is not None:
        notes.append(f"gw {res['gateway_cpu_cores']:.2f} cores")
    if res.get("loadgen_cpu_cores") is not None:
        notes.append(f"harness {res['loadgen_cpu_cores']:.2f} cores")
    errs = {**t.get("status", {}), **t.get("error_kinds", {})}
    errs = {k: v for k, v in errs.items() if not k.startswith("2")}
    if errs:
        notes.append("non-2xx " + " ".join(f"{k}={v}" for k, v in errs.items()))
    entry = {"mode": mode, "ok_rps": t["ok_rps"], "count": t["count"], "errors": t["errors"],
             "p50_ms": l["p50"] / 1000, "p99_ms": l["p99"] / 1000, "p999_ms": l["p999"] / 1000,
             "max_ms": l["max"] / 1000, "rss": rss}
    chat = r.get("chat")
    if chat:
        cl = chat["ack_latency_us"]
        entry.update({"ok_rps": chat["acks_per_sec"], "count": chat["count"],
                      "errors": chat["count"] - chat["acked"], "p50_ms": cl["p50"] / 1000,
                      "p99_ms": cl["p99"] / 1000, "p999_ms": cl["p999"] / 1000, "max_ms": cl["max"] / 1000,
                      "chat_connected": chat["connected"], "chat_sessions": chat["sessions"]})
        mode = f"{chat['sessions']} sessions × {chat['rate_per_session']:g}/s"
        notes.insert(0, f"connected {chat['connected']}/{chat['sessions']}")
        if chat.get("connect_failures"):
            notes.append("connect failures " + " ".join(f"{k}={v}" for k, v in chat["connect_failures"].items()))
        if chat.get("errors"):
            notes.append("errors " + " ".join(f"{k}={v}" for k, v in chat["errors"].items()))
        if chat.get("unanswered"):
            notes.append(f"UNANSWERED {chat['unanswered']}")
    smtp = r.get("smtp")
    if smtp:
        notes.insert(0, f"{smtp['mail_size']} B mails, {smtp['connections']} conns, pipelining {smtp['pipelining']}")
    summary["steps"][name] = entry
    rows.append(f"| {name} | {c['target']} | {mode} | {entry['ok_rps']:.0f} | {entry['p50_ms']:.2f} | {entry['p99_ms']:.2f} | {entry['p999_ms']:.2f} | {entry['max_ms']:.2f} | {entry['errors']} | {'; '.join(notes)} |")

def spread(vals):
    return f"{min(vals):.0f} / {statistics.median(vals):.0f} / {max(vals):.0f}" if vals else "-"

pair_rows = []
for sink, prefix in (("spool", "a"), ("kafka", "b")):
    ceil, gw, ratio = [], [], []
    for i in range(1, repeat + 1):
        c, g = load(f"{prefix}-ceiling-{i}"), load(f"{prefix}-{sink}-{i}")
        if c and g:
            ceil.append(c["total"]["ok_rps"]); gw.append(g["total"]["ok_rps"])
            if ceil[-1] > 0:
                ratio.append(100.0 * gw[-1] / ceil[-1])
    if ceil:
        summary["pairs"][sink] = {"ceiling_ok_rps": ceil, "gateway_ok_rps": gw, "ratio_percent": ratio}
        pair_rows.append(f"| {sink} | {len(ceil)} | {spread(ceil)} | {spread(gw)} | {spread(ratio)} % |")

verify_rows = []
for path in sorted(glob.glob(os.path.join(out, "verify-*.json"))):
    name = os.path.basename(path)[len("verify-"):-5]
    try:
        v = json.load(open(path))
    except (OSError, ValueError):
        verify_rows.append(f"| {name} | (no report) | | | |"); continue
    summary["verify"][name] = {k: v.get(k) for k in ("acked", "found", "lost", "duplicates")}
    verify_rows.append(f"| {name} | {v['acked']} | {v['found']} | {v['lost']} | {v['duplicates']} |")

md = ["# Switchboard load-test results", "",
      f"Results directory `{out}`; each step has a JSON and an HTML report beside this file.", "",
      "| step | target | load | ok/s | p50 ms | p99 ms | p99.9 ms | max ms | errors | notes |",
      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *rows, ""]
if pair_rows:
    md += ["Closed loop, twilio-only mix: ceiling and gateway run back to back (min / median / max over the repeats).", "",
           "| sink | pairs | ceiling ok/s | gateway ok/s | gateway / ceiling |", "| --- | --- | --- | --- | --- |", *pair_rows, ""]
if verify_rows:
    md += ["`verify` against Kafka:", "", "| run | acked | found | lost | duplicates |", "| --- | --- | --- | --- | --- |", *verify_rows, ""]
open(os.path.join(out, "summary.md"), "w").write("\n".join(md))
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print("\n".join(md))
PY

if [ "$failed" != 0 ]; then
  echo "bench: some steps failed or verify found losses" >&2
  exit 1
fi
