#!/usr/bin/env bash
# Runs roomcast and the Node `ws` + ioredis peer (bench/peers/node-ws) one after the
# other on this machine, against one private Redis, under the same load from
# roomcast-bench, and prints a Markdown table. Loopback (127.0.0.0/8) only.
# Optional peers, named in SERVERS:
#   uws        uWebSockets.js (native uWS) + ioredis (bench/peers/uws), same Redis layout as node-ws
#   python-ws  the single-process Python `websockets` server (bench/peers/python-ws, no Redis)
#   ROOMCAST_BIN=path  the binary of the `roomcast` kind (default target/release/roomcast)
#   roomcast-base  another roomcast binary, BASE_BIN (e.g. a build of an earlier commit), for an
#              A/B inside one run; name kinds more than once to alternate them:
#   BASE_BIN=/tmp/base/release/roomcast SERVERS="roomcast-base roomcast roomcast-base roomcast" bash bench/compare.sh
#   (ROOMCAST_ENV and BASE_ENV add KEY=VALUE settings to each kind: the same binary with two
#   settings, e.g. BASE_ENV=ROOMCAST__FANOUT__WORKERS=1 ROOMCAST_ENV=ROOMCAST__FANOUT__WORKERS=2;
#   ROOMCAST_CONFIG=<file> runs the roomcast kind with a config file, e.g. rooms that coalesce)
#
#   bash bench/compare.sh                 # standard fan-out scenario
#   QUICK=1 bash bench/compare.sh         # short smoke run
#   SERVERS="roomcast uws node-ws" bash bench/compare.sh
#   MODE=idle CONNS=10000 bash bench/compare.sh
#   AUTH=1 BASE_BIN=target/release/roomcast SERVERS="roomcast-base roomcast" bash bench/compare.sh
#              the `roomcast` kind runs with JWT auth required (HS256) and every bench
#              connection presents a token; roomcast-base runs without: auth on vs off
#   MODE=ramp bash bench/compare.sh
#   HISTORY=1 ROOMCAST_BIN=path bash bench/compare.sh
#              per-room history off vs on: every run of the `roomcast` kind is made twice, with
#              a config file (--config) whose namespace "h." has no history, then one whose
#              "h." has history = { size = 100, ttl = "5m" }; the generator uses --room-prefix h.
#              (and --check-seq when on). SERVERS defaults to "roomcast"; HISTORY_RUNS="off on off on"
#              alternates more. ROOMCAST_BIN must be a build that knows namespaces[].history.
#
# See bench/README.md for every variable.
# shellcheck disable=SC2317  # functions run through traps and wait_until
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
  sed -n '2,/^set -euo/p' "$0" | grep '^#' | grep -v shellcheck | sed 's/^# \{0,1\}//'
  exit 0
fi
[[ $# == 0 ]] || { echo "compare.sh takes no arguments; configure it with env variables (see --help)" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

MODE=${MODE:-fanout}
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  SUBS=${SUBS:-200} ROOMS=${ROOMS:-4} PUBS=${PUBS:-4} WARMUP=${WARMUP:-1} DURATION=${DURATION:-3}
  CONNS=${CONNS:-1000} STEP_DURATION=${STEP_DURATION:-3} MAX_STEPS=${MAX_STEPS:-4}
fi
SUBS=${SUBS:-2000}
ROOMS=${ROOMS:-20}
PUBS=${PUBS:-20}
RATE=${RATE:-20}
SIZE=${SIZE:-100}
WARMUP=${WARMUP:-5}
DURATION=${DURATION:-20}
DRAIN=${DRAIN:-}                    # empty: the generator's default
THREADS=${THREADS:-}                # empty: the generator's default
CONNS=${CONNS:-10000}               # idle
SOURCES=${SOURCES:-4}               # idle: source addresses 127.0.0.1..N
HOLD=${HOLD:-5}                     # idle
START_RATE=${START_RATE:-$RATE}     # ramp
STEP=${STEP:-1.5}
STEP_DURATION=${STEP_DURATION:-10}
MAX_P99_MS=${MAX_P99_MS:-50}
MAX_LOSS=${MAX_LOSS:-0.001}
MAX_STEPS=${MAX_STEPS:-12}
HISTORY=${HISTORY:-0}               # 1: the roomcast kind runs with history off and on (see above)
HISTORY_RUNS=${HISTORY_RUNS:-off on} # with HISTORY=1: the variants, in this order, for every roomcast run
HISTORY_PREFIX=${HISTORY_PREFIX:-h.} # the namespace (and --room-prefix) of the history runs
HISTORY_SIZE=${HISTORY_SIZE:-100}    # history = { size = …, ttl = … } of that namespace when on
HISTORY_TTL=${HISTORY_TTL:-5m}
if [[ $HISTORY == 1 ]]; then
  SERVERS=${SERVERS:-roomcast}      # history is roomcast's own; other servers can still be named
fi
SERVERS=${SERVERS:-roomcast node-ws}   # add uws (uWebSockets.js) and/or python-ws (single-process Python)
NODES=${NODES:-1}                   # server processes per server kind, all on SERVER_CPU, one Redis
ROOMCAST_PROTOCOLS=${ROOMCAST_PROTOCOLS:-json}   # e.g. "json raw"
ROOMCAST_ENV=${ROOMCAST_ENV:-}      # KEY=VALUE settings for the roomcast kind (see above)
BASE_ENV=${BASE_ENV:-}              # the same for roomcast-base
ROOMCAST_CONFIG=${ROOMCAST_CONFIG:-} # a --config file for the roomcast kind
# Not for the servers started below (roomcast checks ROOMCAST_* variables).
export -n ROOMCAST_PROTOCOLS ROOMCAST_ENV ROOMCAST_CONFIG
SERVER_CPU=${SERVER_CPU:-0}         # core for Redis and the server under test
BENCH_CPU=${BENCH_CPU:-1}           # core for the load generator
SKIP_BUILD=${SKIP_BUILD:-0}
AUTH=${AUTH:-0}                     # 1: the roomcast kind requires a JWT (see above)
RESULTS_DIR=${RESULTS_DIR:-$ROOT/bench/results}

die() { echo "compare.sh: $*" >&2; exit 1; }
log() { echo "==> $*" >&2; }

case $MODE in fanout | idle | ramp) ;; *) die "MODE must be fanout, idle or ramp (got '$MODE')" ;; esac
case $HISTORY in 0 | 1) ;; *) die "HISTORY must be 0 or 1 (got '$HISTORY')" ;; esac
if [[ $HISTORY == 1 ]]; then
  [[ $MODE != idle ]] || die "HISTORY=1 needs messages: use MODE=fanout or MODE=ramp"
  [[ " $SERVERS " == *" roomcast "* ]] || die "HISTORY=1 applies to the roomcast kind: name it in SERVERS"
  [[ -n $HISTORY_RUNS ]] || die "HISTORY_RUNS is empty (give off and/or on)"
  for v in $HISTORY_RUNS; do
    case $v in off | on) ;; *) die "HISTORY_RUNS: '$v' is neither off nor on" ;; esac
  done
  [[ $HISTORY_PREFIX =~ ^[A-Za-z0-9_.:@-]{1,64}$ ]] || die "HISTORY_PREFIX '$HISTORY_PREFIX': use 1-64 of [A-Za-z0-9_.:@-]"
  [[ $HISTORY_SIZE =~ ^[0-9]+$ ]] || die "HISTORY_SIZE must be a number (got '$HISTORY_SIZE')"
  [[ $HISTORY_TTL =~ ^[0-9a-z]+$ ]] || die "HISTORY_TTL must be a duration such as 5m or 300s (got '$HISTORY_TTL')"
fi
for server in $SERVERS; do
  case $server in roomcast | roomcast-base | node-ws | uws | python-ws) ;; *) die "unknown server '$server' in SERVERS (roomcast, roomcast-base, node-ws, uws, python-ws)" ;; esac
done
if [[ " $SERVERS " == *" roomcast-base "* ]]; then
  [[ -n ${BASE_BIN:-} && -x ${BASE_BIN:-} ]] || die "roomcast-base needs BASE_BIN=<path of a roomcast binary>"
fi
# python-ws is one process with rooms in memory: it cannot be clustered, so NODES>1 skips it.
PYWS=0 PYWS_SKIPPED=0
if [[ " $SERVERS " == *" python-ws "* ]]; then
  if [[ $NODES == 1 ]]; then PYWS=1; else PYWS_SKIPPED=1; fi
fi

# ---------------------------------------------------------------- tools
missing=0
need() { # need CMD HINT
  if ! command -v "$1" >/dev/null 2>&1; then
    echo "missing: $1 — install with: $2" >&2
    missing=1
  fi
}
need cargo "curl https://sh.rustup.rs -sSf | sh   (or: apt-get install -y cargo)"
need node "apt-get install -y nodejs   (Node >= 20)"
need npm "apt-get install -y npm"
need redis-server "apt-get install -y redis-server"
need redis-cli "apt-get install -y redis-tools"
need taskset "apt-get install -y util-linux"
need curl "apt-get install -y curl"
need python3 "apt-get install -y python3"
need timeout "apt-get install -y coreutils"
need getconf "apt-get install -y libc-bin"
[[ $missing == 0 ]] || exit 1
ncpu=$(getconf _NPROCESSORS_ONLN)
if ((ncpu < 2)); then
  echo "warning: $ncpu CPU(s); the server and the generator share core 0" >&2
  SERVER_CPU=0 BENCH_CPU=0
fi
CLK_TCK=$(getconf CLK_TCK)

# ---------------------------------------------------------------- build
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
# ROOMCAST_BIN: the binary of the `roomcast` kind (default: this checkout's release build).
ROOMCAST_BIN=${ROOMCAST_BIN:-$TARGET_DIR/release/roomcast}
export -n ROOMCAST_BIN
BENCH_BIN=$TARGET_DIR/release/roomcast-bench
PEER_DIR=$ROOT/bench/peers/node-ws
UWS_DIR=$ROOT/bench/peers/uws
UWS_PKG=$UWS_DIR/node_modules/@trufflesuite/uws-js-unofficial
NODEWS=0 UWS=0
[[ " $SERVERS " != *" node-ws "* ]] || NODEWS=1
[[ " $SERVERS " != *" uws "* ]] || UWS=1
if [[ $SKIP_BUILD != 1 ]]; then
  log "cargo build --release -p roomcast -p roomcast-bench"
  cargo build --release -p roomcast -p roomcast-bench
  if [[ $NODEWS == 1 ]]; then
    log "npm ci (bench/peers/node-ws)"
    npm ci --prefix "$PEER_DIR" --no-audit --no-fund --loglevel=error >/dev/null
  fi
fi
# uws: its node_modules is large (the uWS binaries of every platform), so it is installed
# only when missing, and only when uws is in SERVERS — also with SKIP_BUILD=1.
if [[ $UWS == 1 && ! -d $UWS_PKG ]]; then
  log "npm ci (bench/peers/uws)"
  npm ci --prefix "$UWS_DIR" --no-audit --no-fund --loglevel=error >/dev/null \
    || die "npm ci in bench/peers/uws failed; run: npm ci --prefix bench/peers/uws"
fi
[[ -x $ROOMCAST_BIN ]] || die "$ROOMCAST_BIN not found (build failed or SKIP_BUILD=1 without a build)"
[[ -x $BENCH_BIN ]] || die "$BENCH_BIN not found"
[[ $NODEWS == 0 || -d $PEER_DIR/node_modules/ws ]] || die "run: npm ci --prefix bench/peers/node-ws"
[[ $UWS == 0 || -d $UWS_PKG/binaries ]] || die "run: npm ci --prefix bench/peers/uws"

# python-ws: a venv in its folder (git-ignored) with the pinned `websockets`. Done even with
# SKIP_BUILD=1; pip does nothing (and needs no network) once the pinned version is installed.
PY_DIR=$ROOT/bench/peers/python-ws
VENV=$PY_DIR/.venv
if [[ $PYWS == 1 ]]; then
  if [[ ! -x $VENV/bin/python ]]; then
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
      pyver=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
      echo "missing: python3 venv support — install with: apt-get install -y python3-venv   (or python$pyver-venv)" >&2
      exit 1
    fi
    log "python3 -m venv bench/peers/python-ws/.venv"
    python3 -m venv "$VENV" || { rm -rf "$VENV"; die "python3 -m venv failed (apt-get install -y python3-venv?)"; }
  fi
  log "pip install -r bench/peers/python-ws/requirements.txt (into its .venv)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$PY_DIR/requirements.txt" \
    || die "pip install into $VENV failed"
fi

# Many sockets in idle mode: raise the soft fd limit as far as the hard limit allows.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# ---------------------------------------------------------------- processes
WORK=$(mktemp -d "${TMPDIR:-/tmp}/roomcast-compare.XXXXXX")
RUNS=$WORK/runs.jsonl
: >"$RUNS"
PIDS=()

# ---------------------------------------------------------------- history configs
# A namespace can only be set in a config file (roomcast --config PATH); the same namespace,
# rooms and room names serve both variants, so the only difference is the history line.
if [[ $HISTORY == 1 ]]; then
  printf '# compare.sh HISTORY=1: history off\n[[namespaces]]\nprefix = "%s"\n' \
    "$HISTORY_PREFIX" >"$WORK/history-off.toml"
  printf '# compare.sh HISTORY=1: history on\n[[namespaces]]\nprefix = "%s"\nhistory = { size = %s, ttl = "%s" }\n' \
    "$HISTORY_PREFIX" "$HISTORY_SIZE" "$HISTORY_TTL" >"$WORK/history-on.toml"
  for v in $HISTORY_RUNS; do
    if ! env -u RUST_LOG "$ROOMCAST_BIN" --config "$WORK/history-$v.toml" --check-config \
      >"$WORK/history-$v.check" 2>&1; then
      cat "$WORK/history-$v.check" >&2
      die "$ROOMCAST_BIN rejects $WORK/history-$v.toml (a build without per-room history? set ROOMCAST_BIN to one that has it)"
    fi
  done
fi

stop_pid() { # stop_pid PID [GRACE_S]: SIGTERM, wait up to GRACE_S, then SIGKILL
  local pid=$1 grace=${2:-15} i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "pid $pid still running after ${grace}s; SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${PIDS[i]}" 5
  done
  [[ -d $WORK ]] && echo "logs: $WORK" >&2
  exit "$rc"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

forget_pid() { # drop a stopped pid from PIDS
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_until() { # wait_until SECONDS PID LOGFILE WHAT CMD...: poll CMD until it succeeds
  local secs=$1 pid=$2 logf=$3 what=$4 i
  shift 4
  for ((i = 0; i < secs * 10; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$logf" >&2 || true
      die "$what exited before it was ready (log: $logf)"
    fi
    sleep 0.1
  done
  tail -n 20 "$logf" >&2 || true
  die "$what not ready after ${secs}s (log: $logf)"
}

redis_ticks() { # utime+stime of a pid, in clock ticks
  local stat rest f
  stat=$(<"/proc/$1/stat")
  rest=${stat##*) }           # fields after "(comm)": state is f[0], utime f[11], stime f[12]
  read -r -a f <<<"$rest"
  echo $((f[11] + f[12]))
}

redis_ping() { [[ $(redis-cli -h 127.0.0.1 -p "$1" ping 2>/dev/null) == PONG ]]; }
ready_http() { curl -fs -o /dev/null --max-time 1 "http://127.0.0.1:$1/readyz"; }

# ---------------------------------------------------------------- redis
REDIS_PORT=$(free_port)
log "redis-server on 127.0.0.1:$REDIS_PORT (core $SERVER_CPU)"
taskset -c "$SERVER_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" \
  --appendonly no --daemonize no --loglevel warning >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_until 10 "$REDIS_PID" "$WORK/redis.log" redis-server redis_ping "$REDIS_PORT"
REDIS_URL=redis://127.0.0.1:$REDIS_PORT

if [[ $AUTH == 1 ]]; then
  # One HS256 token (sub "bench", valid a day) for every bench connection.
  AUTH_SECRET=bench-secret-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  AUTH_TOKEN=$(AUTH_SECRET=$AUTH_SECRET python3 -c '
import base64, hashlib, hmac, json, os, time
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
body = b64(json.dumps({"sub": "bench", "exp": int(time.time()) + 86400}).encode())
sig = hmac.new(os.environ["AUTH_SECRET"].encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
print(f"{head}.{body}.{b64(sig)}")')
fi

# ---------------------------------------------------------------- one run
SERVER_PIDS=() URLS=()

start_server() { # start_server NAME LOGFILE [CONFIG]: NODES processes of one kind (CONFIG: roomcast --config)
  local name=$1 logf=$2 config=${3:-} i port pid
  SERVER_PIDS=() URLS=()
  for ((i = 1; i <= NODES; i++)); do
    port=$(free_port)
    case $name in
      roomcast | roomcast-base)
        local bin=$ROOMCAST_BIN auth_env=() config_args=() extra_env=()
        [[ $name == roomcast ]] || bin=$BASE_BIN
        # ROOMCAST_ENV / BASE_ENV: space-separated KEY=VALUE settings for one kind
        # (e.g. ROOMCAST__FANOUT__WORKERS=2 against BASE_ENV=ROOMCAST__FANOUT__WORKERS=1).
        if [[ $name == roomcast ]]; then
          read -r -a extra_env <<<"${ROOMCAST_ENV:-}"
        else
          read -r -a extra_env <<<"${BASE_ENV:-}"
        fi
        [[ -z $config ]] || config_args=(--config "$config")
        # ROOMCAST_CONFIG: a config file for the roomcast kind (e.g. a namespace with coalesce).
        if [[ $name == roomcast && -z $config && -n ${ROOMCAST_CONFIG:-} ]]; then
          config_args=(--config "$ROOMCAST_CONFIG")
        fi
        if [[ $name == roomcast && $AUTH == 1 ]]; then
          auth_env=(ROOMCAST__AUTH__ALGORITHM=HS256 ROOMCAST__AUTH__SECRET="$AUTH_SECRET"
            ROOMCAST__AUTH__ANONYMOUS=false)
        fi
        env -u RUST_LOG "${auth_env[@]}" \
          ROOMCAST__SERVER__LISTEN="127.0.0.1:$port" \
          ROOMCAST__NODE__ID="bench-$i" \
          ROOMCAST__BUS__KIND=redis \
          ROOMCAST__BUS__REDIS__URL="$REDIS_URL" \
          ROOMCAST__LOG__LEVEL=warn \
          ROOMCAST__SHUTDOWN__DRAIN=1s \
          ROOMCAST__LIMITS__MESSAGES_PER_SECOND=0 \
          "${extra_env[@]}" \
          taskset -c "$SERVER_CPU" "$bin" "${config_args[@]}" >"$logf.$i" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_until 30 "$pid" "$logf.$i" roomcast ready_http "$port"
        ;;
      node-ws)
        env HOST=127.0.0.1 PORT="$port" REDIS_URL="$REDIS_URL" \
          taskset -c "$SERVER_CPU" node "$PEER_DIR/server.js" >"$logf.$i" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_until 30 "$pid" "$logf.$i" node-ws tcp_open "$port"
        ;;
      uws) # server.js loads the native binary itself and exits if it cannot
        env HOST=127.0.0.1 PORT="$port" REDIS_URL="$REDIS_URL" \
          taskset -c "$SERVER_CPU" node "$UWS_DIR/server.js" >"$logf.$i" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_until 30 "$pid" "$logf.$i" uws tcp_open "$port"
        ;;
      python-ws) # no Redis: single process, rooms in memory
        env HOST=127.0.0.1 PORT="$port" \
          taskset -c "$SERVER_CPU" "$VENV/bin/python" "$PY_DIR/server.py" >"$logf.$i" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_until 30 "$pid" "$logf.$i" python-ws tcp_open "$port"
        ;;
      *) die "unknown server '$name' in SERVERS (roomcast, roomcast-base, node-ws, uws, python-ws)" ;;
    esac
    SERVER_PIDS+=("$pid")
    URLS+=(--url "ws://127.0.0.1:$port")
  done
}

stop_server() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do
    stop_pid "$pid" 15
    forget_pid "$pid"
  done
  SERVER_PIDS=()
}

load_args() { # the fan-out load shared by fanout and ramp
  ARGS=(--subscribers "$SUBS" --rooms "$ROOMS" --publishers "$PUBS" --size "$SIZE" --warmup "$WARMUP"
    --redis-pid "$REDIS_PID")
  [[ -z $DRAIN ]] || ARGS+=(--drain "$DRAIN")
  [[ -z $THREADS ]] || ARGS+=(--threads "$THREADS")
}

FAILED=0
run_one() { # run_one SERVER PROTOCOL [HISTORY off|on]
  local server=$1 proto=$2 history=${3:-} label tag out err limit rc t0 t1 r0 r1 config=""
  label=$server
  [[ $server != roomcast* ]] || label="$server ($proto)"
  [[ ! ($server == roomcast && $AUTH == 1) ]] || label="$label +auth"
  [[ -z $history ]] || label="$label history $history"
  [[ $NODES == 1 ]] || label="$label x$NODES nodes"
  RUN_NO=$((${RUN_NO:-0} + 1))
  tag=$server-$proto${history:+-history-$history}-$RUN_NO
  out=$WORK/$tag.out err=$WORK/$tag.bench.log
  [[ -z $history ]] || config=$WORK/history-$history.toml
  log "$label: starting${config:+ (--config $config)}"
  start_server "$server" "$WORK/$tag.server.log" "$config"
  local cmd=("$BENCH_BIN") pid
  case $MODE in
    fanout)
      load_args
      cmd+=(fanout "${URLS[@]}" --protocol "$proto" "${ARGS[@]}" --rate "$RATE" --duration "$DURATION")
      limit=$((WARMUP + DURATION + ${DRAIN:-10} + 180))
      ;;
    idle)
      cmd+=(idle "${URLS[@]}" --protocol "$proto" --connections "$CONNS" --sources "$SOURCES" --hold "$HOLD")
      limit=$((HOLD + 600))
      ;;
    ramp)
      load_args
      cmd+=(ramp "${URLS[@]}" --protocol "$proto" "${ARGS[@]}" --start-rate "$START_RATE" --step "$STEP"
        --step-duration "$STEP_DURATION" --max-p99-ms "$MAX_P99_MS" --max-loss "$MAX_LOSS" --max-steps "$MAX_STEPS")
      limit=$((WARMUP + 2 * MAX_STEPS * (STEP_DURATION + WARMUP + ${DRAIN:-10} + 30) + 180))
      ;;
  esac
  for pid in "${SERVER_PIDS[@]}"; do cmd+=(--server-pid "$pid"); done
  if [[ -n $history ]]; then
    cmd+=(--room-prefix "$HISTORY_PREFIX")
    # Only JSON msg frames carry a seq: with history on they must, without gaps.
    [[ ! ($history == on && $proto == json) ]] || cmd+=(--check-seq)
  fi
  [[ ! ($server == roomcast && $AUTH == 1) ]] || cmd+=(--token "$AUTH_TOKEN")
  log "$label: roomcast-bench ${cmd[*]:1}  (core $BENCH_CPU, limit ${limit}s)"
  echo "${cmd[*]}" >"$err"

  t0=$(date +%s%N) r0=$(redis_ticks "$REDIS_PID")
  timeout --kill-after=10 "$limit" taskset -c "$BENCH_CPU" "${cmd[@]}" >"$out" 2>>"$err" &
  local bench_pid=$!
  PIDS+=("$bench_pid")
  rc=0
  wait "$bench_pid" || rc=$?
  forget_pid "$bench_pid"
  echo "== exit code $rc" >>"$err"
  t1=$(date +%s%N) r1=$(redis_ticks "$REDIS_PID")
  stop_server
  local server_config=""  # the --config file's settings on one line, for the results
  [[ -z $config ]] || server_config=$(grep -v '^#' "$config" | tr '\n' ' ')

  if ! python3 - "$label" "$server" "$proto" "$rc" $((r1 - r0)) "$CLK_TCK" $((t1 - t0)) "$out" "$history" "$server_config" >>"$RUNS" <<'PY'; then
import json, sys
label, server, proto, rc, ticks, clk, wall_ns, path, history, server_config = sys.argv[1:]
extra = {"server": label, "server_kind": server, "bench_protocol": proto,
         "redis_cpu_percent": round(int(ticks) / int(clk) / (int(wall_ns) / 1e9) * 100, 2)}
if history:
    extra["history"] = history
    extra["server_config"] = server_config.strip()
found = False
for line in open(path, errors="replace"):
    line = line.strip()
    if not line.startswith("{"):
        continue
    try:
        rec = json.loads(line)
    except ValueError:
        continue
    if isinstance(rec, dict):
        found = True
        if rc != "0":
            rec["exit_code"] = int(rc)
        print(json.dumps({**extra, **rec}, separators=(",", ":")))
if not found:
    print(json.dumps({**extra, "mode": "error", "exit_code": int(rc)}))
sys.exit(0 if found and rc == "0" else 1)
PY
    echo "$label: roomcast-bench failed (exit $rc); last lines of $err:" >&2
    tail -n 15 "$err" >&2 || true
    FAILED=1
  fi
}

PYWS_NOTE="note: python-ws skipped: it is a single process with rooms in memory and cannot be clustered (NODES=$NODES); run it with NODES=1"
for server in $SERVERS; do
  if [[ $server == python-ws && $PYWS_SKIPPED == 1 ]]; then
    log "${PYWS_NOTE#note: }"
  elif [[ $server == roomcast && $HISTORY == 1 ]]; then
    for proto in $ROOMCAST_PROTOCOLS; do
      for v in $HISTORY_RUNS; do run_one "$server" "$proto" "$v"; done
    done
  elif [[ $server == roomcast* ]]; then
    for proto in $ROOMCAST_PROTOCOLS; do run_one "$server" "$proto"; done
  else
    run_one "$server" plain
  fi
done

# ---------------------------------------------------------------- report
mkdir -p "$RESULTS_DIR"
RESULT_FILE=$RESULTS_DIR/compare-$(date -u +%Y%m%dT%H%M%SZ).jsonl
python3 - "$RUNS" "$RESULT_FILE" "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" <<'PY'
import json, sys
runs_path, result_path, rev = sys.argv[1:]
recs = [json.loads(l) for l in open(runs_path) if l.strip()]
good = [r for r in recs if r.get("mode") != "error"]
if good:
    with open(result_path, "w") as f:
        for r in good:
            f.write(json.dumps({"git_rev": rev, **r}, separators=(",", ":")) + "\n")

def num(v, fmt):
    if v is None or v == "":
        return "–"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)

def table(head, rows, text_cols=(0,)):
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i in text_cols else "---:" for i in range(len(head))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")

def failed(r, n):
    return [r["server"], f"**failed** (exit {r.get('exit_code')})"] + ["–"] * (n - 2)

def seq_total(r):  # server seqs (history rooms) since the generator connected
    return r.get("seq_since_connect") or {}

def seq_cells(r):
    t = seq_total(r)
    if not t.get("frames") and not t.get("missing"):
        return ["–", "–"]
    bad = t.get("gaps", 0) or t.get("duplicates", 0) or t.get("missing", 0)
    cell = f"{t.get('gaps', 0):,} / {t.get('duplicates', 0):,} / {t.get('missing', 0):,}"
    return [f"**{cell}**" if bad else cell, num(t.get("epoch_changes"), ",")]

def seq_notes(rows):
    for r in rows:
        t = seq_total(r)
        if t.get("gaps") or t.get("duplicates") or t.get("missing"):
            print(f"**SEQ PROBLEMS** {r['server']}: since connect {t.get('gaps', 0):,} seqs skipped, "
                  f"{t.get('duplicates', 0):,} repeated, {t.get('missing', 0):,} msg frames without a seq "
                  f"(of {t.get('frames', 0):,} with one)")
        elif r.get("history") == "on" and r.get("bench_protocol") == "json" and not t.get("frames"):
            print(f"**NO SEQ** {r['server']}: history on, but no msg frame carried a seq "
                  f"(rooms {r.get('room_prefix')}0..)")
        if t.get("epoch_changes"):
            print(f"note: {r['server']}: the epoch changed {t['epoch_changes']:,} time(s): a room's history was lost")

for r in recs:  # a run that printed results but then exited non-zero
    if r.get("exit_code") and r.get("mode") != "error":
        r["server"] += f" **(exit {r['exit_code']})**"

print()
fan = [r for r in recs if r.get("mode") in ("fanout", "error")]
idle = [r for r in recs if r.get("mode") == "idle"]
ramp_res = [r for r in recs if r.get("mode") == "ramp-result"]
ramp_steps = [r for r in recs if r.get("mode") not in ("fanout", "error", "idle", "ramp-result")]

if idle:
    def div(v, d):
        return v / d if isinstance(v, (int, float)) else v
    head = ["server", "connected", "failures", "connect s", "server RSS before MiB", "server RSS after MiB",
            "RSS/connection KiB"]
    rows = []
    for r in idle:
        rows.append([r["server"], num(r.get("connected"), ","), num(r.get("failures"), ","),
                     num(r.get("connect_s"), ".1f"),
                     num(div(r.get("server_rss_before_kb"), 1024), ".1f"),
                     num(div(r.get("server_rss_after_kb", r.get("server_rss_kb")), 1024), ".1f"),
                     num(div(r.get("rss_per_connection_bytes"), 1024), ".2f")])
    rows += [failed(r, len(head)) for r in recs if r.get("mode") == "error"]
    table(head, rows)
elif ramp_res or ramp_steps:
    head = ["server", "max sustained deliveries/s", "at msg/s per publisher", "limited by", "steps",
            "generator saturated"]
    rows = []
    for r in ramp_res:
        steps = r.get("steps_run", sum(1 for s in ramp_steps if s["server"] == r["server"]))
        rows.append([r["server"], num(r.get("max_sustained_deliveries_per_s"), ",.0f"),
                     num(r.get("max_sustained_rate"), "g"), str(r.get("limited_by", "–")), str(steps),
                     {True: "**yes**", False: "no"}.get(r.get("generator_saturated"), "–")])
    rows += [failed(r, len(head)) for r in recs if r.get("mode") == "error"]
    done = {r["server"] for r in ramp_res}
    for name in dict.fromkeys(s["server"] for s in ramp_steps if s["server"] not in done):
        rows.append([name, "**no result**"] + ["–"] * (len(head) - 2))
    table(head, rows, text_cols=(0, 3, 5))
    seq_notes(ramp_res)  # each ramp's seq counters since connect, as of its last step
    if ramp_steps:
        print()
        head = ["server", "rate/publisher", "deliveries/s", "lost", "p99 ms", "server CPU µs/delivery",
                "redis CPU % window"]
        with_seq = any(seq_total(s).get("frames") or s.get("history") for s in ramp_steps)
        if with_seq:
            head += ["seq gaps / dup / missing", "epoch changes"]
        rows = []
        for s in ramp_steps:
            lat = s.get("latency_ms") or {}
            rows.append([s["server"], num(s.get("rate"), ",.1f"), num(s.get("deliveries_per_s"), ",.0f"),
                         num(s.get("lost"), ","), num(lat.get("p99"), ".2f"),
                         num(s.get("server_cpu_us_per_delivery"), ".2f"),
                         num(s.get("redis_cpu_percent_window"), ".1f")]
                        + (seq_cells(s) if with_seq else []))
        table(head, rows)
else:
    head = ["server", "deliveries/s", "lost", "dup", "reordered", "p50 ms", "p99 ms", "p99.9 ms",
            "max ms", "server CPU µs/delivery", "redis CPU %", "redis CPU % window",
            "redis CPU µs/message", "generator CPU %"]
    # Server seqs, when any run had history (or was meant to): since connect.
    with_seq = any(seq_total(r).get("frames") or seq_total(r).get("missing") or r.get("history")
                   for r in fan)
    if with_seq:
        head += ["seq gaps / dup / missing", "epoch changes"]
    rows = []
    for r in fan:
        if r.get("mode") == "error":
            rows.append(failed(r, len(head)))
            continue
        lat = r.get("latency_ms") or {}
        rows.append([r["server"], num(r.get("deliveries_per_s"), ",.0f"), num(r.get("lost"), ","),
                     num(r.get("duplicates"), ","), num(r.get("reordered"), ","),
                     num(lat.get("p50"), ".2f"), num(lat.get("p99"), ".2f"), num(lat.get("p999"), ".2f"),
                     num(lat.get("max"), ".2f"), num(r.get("server_cpu_us_per_delivery"), ".2f"),
                     num(r.get("redis_cpu_percent"), ".1f"), num(r.get("redis_cpu_percent_window"), ".1f"),
                     num(r.get("redis_cpu_us_per_message"), ".1f"), num(r.get("generator_cpu_percent"), ".1f")]
                    + (seq_cells(r) if with_seq else []))
    table(head, rows)
    if with_seq:
        print("\nseq gaps / dup / missing: server seqs (rooms with history) the subscribers saw skipped, "
              "repeated, or absent, since they connected; – where no frame carried one.")
        seq_notes([r for r in fan if r.get("mode") == "fanout"])
    ok = [r for r in fan if r.get("mode") == "fanout"]
    if ok:
        r = ok[0]
        g = lambda k: num(r.get(k), "g")
        print(f"\n{g('subscribers')} subscribers in {g('rooms')} rooms, {g('publishers')} publishers "
              f"x {g('rate')} msg/s, {g('size')} B, warmup {g('warmup_s')} s, "
              f"measured {g('duration_s')} s; server and Redis on one core, generator on another; "
              f"redis CPU % is over the whole run including connect and warmup, redis CPU % window "
              f"and µs/message (per message published) over the measured window only.")
        bad = [x["server"] for x in ok if any(x.get(k) for k in ("connect_failures", "disconnects", "errors"))]
        for x in ok:
            if x["server"] in bad:
                print(f"note: {x['server']}: connect_failures={x.get('connect_failures')} "
                      f"disconnects={x.get('disconnects')} errors={x.get('errors')}")
print(f"\nraw results: {result_path}" if good else "\nno successful run; nothing saved")
PY
[[ $PYWS_SKIPPED == 0 ]] || printf '\n%s\n' "$PYWS_NOTE"

exit "$FAILED"
