#!/usr/bin/env bash
# The hot room with coalescing off and on, alternating in one run: server CPU
# per delivery and latency. One Redis and the node on core 0, the load
# generator on core 1 (as bench/compare.sh). Loopback only; needs release builds:
#   cargo build --release -p roomcast -p roomcast-bench
#   bash bench/coalesce.sh            # WINDOWS="0 3ms 5ms 0 3ms 5ms" SUBS=400 RATE=500 DURATION=15
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WINDOWS=${WINDOWS:-0 3ms 5ms 0 3ms 5ms}
SUBS=${SUBS:-400}
RATE=${RATE:-500}
DURATION=${DURATION:-15}
WORKERS=${WORKERS:-1}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
DIR=$(mktemp -d)
RPORT=$(free_port)
taskset -c 0 redis-server --port "$RPORT" --save '' --appendonly no >/dev/null 2>&1 &
RPID=$!
PID=
trap 'kill $PID $RPID 2>/dev/null || true; rm -rf "$DIR"' EXIT
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
echo "| coalesce | deliveries/s | lost | p50 ms | p99 ms | p99.9 ms | server CPU µs/delivery |"
echo "|---|---:|---:|---:|---:|---:|---:|"
for window in $WINDOWS; do
  printf '[[namespaces]]\nprefix = "hot."\ncoalesce = "%s"\n' "$window" >"$DIR/roomcast.toml"
  [[ $window != 0 ]] || printf '[[namespaces]]\nprefix = "hot."\n' >"$DIR/roomcast.toml"
  PORT=$(free_port)
  env -u RUST_LOG ROOMCAST__SERVER__LISTEN=127.0.0.1:$PORT ROOMCAST__LOG__LEVEL=error \
    ROOMCAST__BUS__KIND=redis ROOMCAST__BUS__REDIS__URL=redis://127.0.0.1:$RPORT \
    ROOMCAST__LIMITS__MESSAGES_PER_SECOND=0 ROOMCAST__FANOUT__WORKERS="$WORKERS" \
    taskset -c 0 "$ROOT/target/release/roomcast" --config "$DIR/roomcast.toml" >/dev/null 2>&1 &
  PID=$!
  for _ in $(seq 100); do curl -fs "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
  taskset -c 1 "$ROOT/target/release/roomcast-bench" fanout --url "ws://127.0.0.1:$PORT" \
    --subscribers "$SUBS" --rooms 1 --publishers 1 --rate "$RATE" --warmup 3 --duration "$DURATION" \
    --room-prefix hot. --server-pid "$PID" 2>/dev/null | tail -1 >"$DIR/result.json"
  python3 - "$window" "$DIR/result.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
l = r["latency_ms"]
print(f"| {sys.argv[1]} | {r['deliveries_per_s']:,.0f} | {r['lost']} | {l['p50']:.2f} | {l['p99']:.2f} | {l['p999']:.2f} | {r['server_cpu_us_per_delivery']:.2f} |")
PY
  kill "$PID"; wait "$PID" 2>/dev/null || true
done
echo
echo "$SUBS viewers in one room, 1 publisher x $RATE msg/s, ${DURATION} s measured; fanout.workers=$WORKERS; node and Redis on core 0, generator on core 1"
