#!/usr/bin/env bash
# One run: roomcast on a single Redis vs on a 3-shard Redis Cluster (3
# primaries, no replicas), alternating, with roomcast-bench; per Redis
# process its CPU and its INFO commandstats (publish/spublish/evalsha calls
# and µs per call) over each measured run. Results: bench/results/cluster-*.jsonl.
#
#   bash bench/cluster.sh                      # standard scenario, 2 pairs
#   SCENARIO=bus PAIRS=1 bash bench/cluster.sh # many rooms, one subscriber each
#
# Everything on loopback; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${SCENARIO:-standard}
PAIRS=${PAIRS:-2}
WARMUP=${WARMUP:-5}
DURATION=${DURATION:-20}
case $SCENARIO in
  standard) LOAD=(--subscribers 2000 --rooms 20 --publishers 20 --rate 20 --size 100) ;;
  # The bus as the bottleneck: every message goes through Redis to one subscriber.
  bus) LOAD=(--subscribers 2000 --rooms 2000 --publishers 400 --rate 50 --size 100) ;;
  *) echo "SCENARIO is standard or bus"; exit 2 ;;
esac
for tool in redis-server redis-cli python3 taskset; do
  command -v $tool >/dev/null || { echo "needs $tool (apt-get install -y redis-server python3 util-linux)"; exit 1; }
done
cargo build --release -q -p roomcast -p roomcast-bench
BIN=target/release/roomcast BENCH=target/release/roomcast-bench
WORK=$(mktemp -d /tmp/roomcast-cluster-bench.XXXXXX)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=bench/results/cluster-$SCENARIO-$STAMP.jsonl
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
log() { echo "[$(date +%T)] $*" >&2; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

start_redis() { # start_redis PORT [cluster args…] → pid
  local port=$1; shift
  taskset -c 0 redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" "$@" \
    >"$WORK/redis-$port.log" 2>&1 &
  echo $!
}
wait_ping() { for _ in $(seq 100); do redis-cli -p "$1" ping >/dev/null 2>&1 && return; sleep 0.05; done; echo "redis $1 down"; exit 1; }

SINGLE=$(free_port); SINGLE_PID=$(start_redis "$SINGLE"); PIDS+=("$SINGLE_PID"); wait_ping "$SINGLE"
CPORTS=() CPIDS=()
for _ in 1 2 3; do
  p=$(free_port) bus=$(free_port)
  pid=$(start_redis "$p" --cluster-enabled yes --cluster-port "$bus" --cluster-config-file "$WORK/nodes-$p.conf")
  PIDS+=("$pid"); CPORTS+=("$p"); CPIDS+=("$pid"); wait_ping "$p"
done
redis-cli --cluster create "${CPORTS[@]/#/127.0.0.1:}" --cluster-replicas 0 --cluster-yes >/dev/null
until redis-cli -p "${CPORTS[0]}" cluster info | grep -q cluster_state:ok; do sleep 0.1; done
log "single redis :$SINGLE; cluster ${CPORTS[*]}"

stats() { # stats PORT → "calls usec" per command of interest, as JSON
  redis-cli -p "$1" info commandstats | python3 -c '
import json, sys
out = {}
for line in sys.stdin:
    line = line.strip()
    if line.startswith("cmdstat_"):
        name, rest = line[8:].split(":", 1)
        if name in ("publish", "spublish", "evalsha", "eval", "ping", "ssubscribe", "subscribe"):
            f = dict(kv.split("=") for kv in rest.split(","))
            out[name] = {"calls": int(f["calls"]), "usec": int(f["usec"])}
print(json.dumps(out))'
}

run() { # run single|cluster
  local kind=$1 url pids ports port node out
  if [[ $kind == single ]]; then
    url=redis://127.0.0.1:$SINGLE busk=redis pids=("$SINGLE_PID") ports=("$SINGLE")
  else
    url=$(printf 'redis://127.0.0.1:%s,' "${CPORTS[@]}"); url=${url%,} busk=redis-cluster pids=("${CPIDS[@]}") ports=("${CPORTS[@]}")
  fi
  port=$(free_port)
  ROOMCAST__SERVER__LISTEN=127.0.0.1:$port ROOMCAST__BUS__KIND=$busk ROOMCAST__BUS__REDIS__URL=$url \
    ROOMCAST__LIMITS__MAX_CONNECTIONS=0 taskset -c 0 "$BIN" >"$WORK/node.log" 2>&1 &
  node=$!; PIDS+=("$node")
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
  local before=() after=() t0 t1
  for p in "${ports[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done
  for pid in "${pids[@]}"; do before+=("$(ticks "$pid")"); done
  t0=$(date +%s%N)
  out=$WORK/$kind.json
  taskset -c 1 "$BENCH" fanout --url "ws://127.0.0.1:$port" "${LOAD[@]}" --warmup "$WARMUP" --duration "$DURATION" \
    --server-pid "$node" >"$out" 2>"$WORK/bench.log" || { log "bench failed: $(tail -3 "$WORK/bench.log")"; }
  t1=$(date +%s%N)
  for pid in "${pids[@]}"; do after+=("$(ticks "$pid")"); done
  local shard_stats=()
  for p in "${ports[@]}"; do shard_stats+=("$(stats "$p")"); done
  kill "$node"; wait "$node" 2>/dev/null || true
  python3 - "$kind" "$SCENARIO" "$out" $((t1 - t0)) "$(getconf CLK_TCK)" "${before[*]}" "${after[*]}" "${shard_stats[@]}" >>"$OUT" <<'PY'
import json, sys
kind, scenario, path, wall_ns, clk, before, after, *stats = sys.argv[1:]
r = json.load(open(path))
wall = int(wall_ns) / 1e9
cpu = [round((int(a) - int(b)) / int(clk) / wall * 100, 1) for b, a in zip(before.split(), after.split())]
print(json.dumps({"bus": kind, "scenario": scenario, "deliveries_per_s": r["deliveries_per_s"], "lost": r["lost"],
    "p99_ms": r["latency_ms"]["p99"], "server_cpu_us_per_delivery": r["server_cpu_us_per_delivery"],
    "redis_cpu_percent_per_process": cpu, "redis_commandstats_per_process": [json.loads(s) for s in stats]}))
PY
  log "$kind: $(tail -1 "$OUT")"
}

for _ in $(seq "$PAIRS"); do run single; run cluster; done
log "results: $OUT"
