#!/usr/bin/env bash
# Start (or stop) a single-node Apache Kafka broker in KRaft mode on loopback.
#
#   scripts/kafka.sh start    fetch the jars once (Maven Central), format storage, start, wait
#   scripts/kafka.sh stop     stop the broker started by this script
#   scripts/kafka.sh status   exit 0 when the broker answers
#
# Environment:
#   KAFKA_VERSION     broker version (default 4.4.0; 3.9.1 is the fallback with every protocol version)
#   KAFKA_PORT        client port on 127.0.0.1 (default 19092); the controller uses KAFKA_PORT+1
#   JOBSTREAM_CACHE   where jars are kept between runs (default ~/.cache/jobstream)
#   JOBSTREAM_RUN     where data, logs and the pid file live (default .services/ in the repo)
#   KAFKA_GC_OPTS     extra JVM options for the broker (e.g. -XX:MaxGCPauseMillis=20); its
#                     collector's pauses are logged to gc.log beside server.log
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
KAFKA_PORT="${KAFKA_PORT:-19092}"
CONTROLLER_PORT=$((KAFKA_PORT + 1))
CACHE="${JOBSTREAM_CACHE:-$HOME/.cache/jobstream}"
RUN="${JOBSTREAM_RUN:-$here/.services}/kafka-$KAFKA_PORT"
LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"

log() { printf 'kafka: %s\n' "$*" >&2; }

ensure_java() {
  if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    log "installing a JDK and Maven (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq default-jdk-headless maven >/dev/null
  fi
}

fetch() {
  if [[ -f "$LIBS/.complete" ]]; then return; fi
  ensure_java
  log "fetching org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies into $LIBS"
  rm -rf "$LIBS"; mkdir -p "$LIBS"
  mvn -q -B -f "$here/scripts/kafka-pom.xml" -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$LIBS"
  touch "$LIBS/.complete"
}

answers() { (exec 3<>"/dev/tcp/127.0.0.1/$KAFKA_PORT") 2>/dev/null; }

start() {
  if [[ -f "$RUN/pid" ]] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null && answers; then
    log "already running on 127.0.0.1:$KAFKA_PORT (pid $(cat "$RUN/pid"))"; return
  fi
  if answers; then  # e.g. started from another checkout: a second broker could not bind
    log "a broker already answers on 127.0.0.1:$KAFKA_PORT (not started here); using it"
    return
  fi
  fetch
  mkdir -p "$RUN"
  cat >"$RUN/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$RUN/data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# share groups (worker_dispatch = share) may leave a silent member after worker_lost_after_s,
# like the consumer group's session timeout (the broker's bounds are 45 s and 15 s otherwise)
group.share.min.session.timeout.ms=6000
group.share.min.heartbeat.interval.ms=1000
group.share.min.record.lock.duration.ms=5000
auto.create.topics.enable=false
log.retention.hours=24
PROPS
  cat >"$RUN/log4j2.properties" <<PROPS
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $RUN/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
PROPS
  local cp="$LIBS/*"
  local jvm=(-Xms256m -Xmx768m -XX:+UseG1GC ${KAFKA_GC_OPTS:-} -Djava.awt.headless=true
             "-Xlog:gc:file=$RUN/gc.log:uptime:filecount=2,filesize=10m"
             -Dlog4j2.configurationFile="$RUN/log4j2.properties" -Dlog4j.configurationFile="$RUN/log4j2.properties")
  if [[ ! -f "$RUN/data/meta.properties" ]]; then
    local cluster
    cluster="$(java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool random-uuid | tail -1)"
    java -cp "$cp" "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster" -c "$RUN/server.properties" >"$RUN/format.log" 2>&1 \
      || { cat "$RUN/format.log" >&2; exit 1; }
  fi
  log "starting Kafka $KAFKA_VERSION on 127.0.0.1:$KAFKA_PORT (logs: $RUN/server.log)"
  nohup java -cp "$cp" "${jvm[@]}" kafka.Kafka "$RUN/server.properties" >"$RUN/stdout.log" 2>&1 &
  echo $! >"$RUN/pid"
  for _ in $(seq 1 120); do
    if answers; then log "ready"; return; fi
    if ! kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then
      log "broker exited during start-up:"; tail -40 "$RUN/stdout.log" "$RUN/server.log" >&2 || true; exit 1
    fi
    sleep 0.5
  done
  log "broker did not answer within 60 s"; tail -40 "$RUN/server.log" >&2 || true; exit 1
}

stop() {
  if [[ -f "$RUN/pid" ]]; then
    local pid; pid="$(cat "$RUN/pid")"
    if kill "$pid" 2>/dev/null; then
      for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$RUN/pid"; log "stopped"
  fi
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) answers ;;
  fetch) fetch ;;
  *) echo "usage: $0 start|stop|status|fetch" >&2; exit 2 ;;
esac
