#!/usr/bin/env bash
# Server CPU while N clients join one room and then all leave (the cost of a
# big room filling and emptying). Loopback only; needs release builds:
#   cargo build --release -p roomcast -p roomcast-bench
#   N=19000 bash bench/joinstorm.sh
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
N=${N:-19000}
PORT=${PORT:-18099}
ROOMCAST__SERVER__LISTEN=127.0.0.1:$PORT ROOMCAST__LOG__LEVEL=error \
  taskset -c 0 "$ROOT/target/release/roomcast" >/dev/null 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -fs "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
t0=$(ticks)
taskset -c 1 "$ROOT/target/release/roomcast-bench" idle --url "ws://127.0.0.1:$PORT" \
  --connections "$N" --rooms 1 --sources 4 --hold 1 --settle 1 >/dev/null
for _ in $(seq 150); do
  [ "$(curl -s "127.0.0.1:$PORT/metrics" | awk '/^roomcast_connections /{print $2}')" = 0 ] && break
  sleep 0.2
done
t1=$(ticks)
echo "server CPU: $(( (t1 - t0) * 1000 / $(getconf CLK_TCK) )) ms for $N joins + leaves of one room"
