#!/usr/bin/env bash
# Where a node's CPU goes, per thread, during a hot-room run: whether the
# fan-out really spreads over the `fanout-N` threads (fanout.workers). One
# Redis, one roomcast node (not pinned: it may use every core), the load
# generator pinned to the last core. Loopback only; needs release builds:
#   cargo build --release -p roomcast -p roomcast-bench
#   WORKERS=2 bash bench/threads.sh       # SUBS=400 RATE=500 DURATION=10 by default
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORKERS=${WORKERS:-2}
SUBS=${SUBS:-400}
RATE=${RATE:-500}
DURATION=${DURATION:-10}
GEN_CPU=${GEN_CPU:-$(($(nproc) - 1))}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
RPORT=$(free_port) PORT=$(free_port)
redis-server --port "$RPORT" --save '' --appendonly no >/dev/null 2>&1 &
RPID=$!
trap 'kill $PID $RPID 2>/dev/null || true' EXIT
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
env -u RUST_LOG ROOMCAST__SERVER__LISTEN=127.0.0.1:$PORT ROOMCAST__LOG__LEVEL=error \
  ROOMCAST__BUS__KIND=redis ROOMCAST__BUS__REDIS__URL=redis://127.0.0.1:$RPORT \
  ROOMCAST__LIMITS__MESSAGES_PER_SECOND=0 ROOMCAST__FANOUT__WORKERS="$WORKERS" \
  "$ROOT/target/release/roomcast" >/dev/null 2>&1 &
PID=$!
for _ in $(seq 100); do curl -fs "127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
# Per thread: name and CPU ticks (utime + stime), summed by name.
ticks() {
  for t in /proc/$PID/task/*; do
    printf '%s %s\n' "$(cat "$t/comm")" "$(awk '{print $14 + $15}' "$t/stat")"
  done | awk '{sum[$1] += $2} END {for (n in sum) print n, sum[n]}' | sort
}
# The window: the generator's warm-up is 2 s; sample after it, for DURATION.
taskset -c "$GEN_CPU" "$ROOT/target/release/roomcast-bench" fanout --url "ws://127.0.0.1:$PORT" \
  --subscribers "$SUBS" --rooms 1 --publishers 1 --rate "$RATE" --warmup 2 --duration "$DURATION" \
  --server-pid "$PID" >/tmp/roomcast-threads-bench.txt 2>&1 &
BENCH=$!
sleep 2.5
before=$(ticks)
sleep "$((DURATION - 1))"
after=$(ticks)
wait $BENCH || true
hz=$(getconf CLK_TCK)
echo "fanout.workers=$WORKERS, $SUBS viewers in one room, $RATE msg/s: CPU per thread over $((DURATION - 1)) s"
join <(echo "$before") <(echo "$after") | awk -v hz="$hz" -v s="$((DURATION - 1))" \
  '{ms = ($3 - $2) * 1000 / hz; total += ms; line[$1] = ms}
   END {for (n in line) if (line[n] > 0) printf "  %-16s %7.0f ms  %5.1f%% of a core  %5.1f%% of the node\n", n, line[n], line[n] / s / 10, 100 * line[n] / total}' | sort -k2 -nr
grep -E "deliveries/s|p99|server CPU" /tmp/roomcast-threads-bench.txt | head -5 || true
