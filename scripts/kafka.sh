#!/usr/bin/env bash
# A real Apache Kafka broker (KRaft, single node) on loopback, for tests and local runs.
#
#   scripts/kafka.sh fetch                 resolve the broker jars from Maven Central into .kafka/lib
#   scripts/kafka.sh start [DIR] [PORT]    format DIR (default .kafka/run) and start a broker on PORT (default 9092)
#   scripts/kafka.sh stop  [DIR]           stop the broker started in DIR and wait for it to exit
#   scripts/kafka.sh resume [DIR]          start the broker of DIR again, keeping its data (after stop)
#
# The jars are cached under .kafka/ (git-ignored); `fetch` is a no-op once they are there.
# The controller listens on PORT+1. `start` returns once the broker accepts connections.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
lib="$root/.kafka/lib"
cmd=${1:-}
dir=${2:-$root/.kafka/run}
port=${3:-9092}

fetch() {
  if [ -f "$lib/.complete" ]; then return 0; fi
  command -v mvn >/dev/null || { echo "kafka.sh: mvn is required to fetch the broker" >&2; exit 1; }
  mkdir -p "$lib"
  mvn -q -B -f "$root/scripts/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$lib" -DincludeScope=runtime
  touch "$lib/.complete"
}

java_opts=(-Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true
  -Dkafka.logs.dir="$dir" -Dlog4j2.configurationFile="$dir/log4j2.properties")

running() {
  if [ -f "$dir/pid" ] && kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
    echo "kafka.sh: a broker is already running from $dir (pid $(cat "$dir/pid"))" >&2; exit 1
  fi
}

resume() {
  fetch
  running
  [ -f "$dir/server.properties" ] || { echo "kafka.sh: no broker was started in $dir" >&2; exit 1; }
  launch
}

start() {
  fetch
  running
  rm -rf "$dir"; mkdir -p "$dir/data"
  local cport=$((port + 1))
  cat > "$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=3
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
  cat > "$dir/log4j2.properties" <<'PROPS'
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
appender.file.type = File
appender.file.name = file
appender.file.fileName = ${sys:kafka.logs.dir}/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
logger.kafka.name = kafka
logger.kafka.level = INFO
PROPS
  local id
  id=$(java "${java_opts[@]}" -cp "$lib/*" kafka.tools.StorageTool random-uuid | tail -n 1)
  java "${java_opts[@]}" -cp "$lib/*" kafka.tools.StorageTool format \
    -t "$id" -c "$dir/server.properties" > "$dir/format.log" 2>&1 \
    || { cat "$dir/format.log" >&2; exit 1; }
  launch
}

# Starts the broker formatted in $dir (its data and port kept) and waits for its listener.
launch() {
  port=$(sed -n 's/^listeners=PLAINTEXT:\/\/127.0.0.1:\([0-9]*\),.*/\1/p' "$dir/server.properties")
  nohup java "${java_opts[@]}" -cp "$lib/*" kafka.Kafka "$dir/server.properties" \
    > "$dir/stdout.log" 2>&1 < /dev/null &
  echo $! > "$dir/pid"
  # Wait for the broker's listener (bounded: 120 s).
  for _ in $(seq 1 240); do
    if ! kill -0 "$(cat "$dir/pid")" 2>/dev/null; then
      echo "kafka.sh: broker exited during start-up" >&2; tail -n 40 "$dir/stdout.log" "$dir/server.log" >&2 || true; exit 1
    fi
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "kafka.sh: broker up on 127.0.0.1:$port (pid $(cat "$dir/pid"), dir $dir)"; return 0
    fi
    sleep 0.5
  done
  echo "kafka.sh: broker did not open 127.0.0.1:$port within 120 s" >&2; exit 1
}

stop() {
  [ -f "$dir/pid" ] || return 0
  local pid; pid=$(cat "$dir/pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/pid"
  echo "kafka.sh: broker in $dir stopped"
}

case "$cmd" in
  fetch) fetch ;;
  start) start ;;
  stop) stop ;;
  resume) resume ;;
  *) sed -n '2,10p' "$0"; exit 2 ;;
esac
