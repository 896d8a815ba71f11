#!/usr/bin/env bash
# A Ballista cluster on this machine: one gram-scheduler and N gram-executor processes, for
# trying `--cluster` and for the 1-vs-N executor benchmark. On several machines, run the same
# two commands by hand (README: "On a Ballista cluster").
#
#   bash scripts/cluster.sh start [N] [PORT]   # scheduler on 127.0.0.1:PORT (50050), N executors (2)
#   bash scripts/cluster.sh status
#   bash scripts/cluster.sh stop
#
# Executor i listens on PORT+1+2i (Arrow Flight) and PORT+2+2i (gRPC), with TASK_SLOTS task
# slots each (default 1). Pids and logs: $GRAM_CACHE/cluster/. Binaries: $GRAM_BIN if set,
# else the workspace's debug build (built by setup's toolchain when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${GRAM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/gram-rs}"
STATE="$CACHE/cluster"
mkdir -p "$STATE"
bins() {
    if [ -n "${GRAM_BIN:-}" ]; then echo "$GRAM_BIN"; return; fi
    # shellcheck disable=SC1091
    source "$CACHE/env.sh"
    [ -x "$CARGO_TARGET_DIR/debug/gram-executor" ] || cargo build --bins -q >&2
    echo "$CARGO_TARGET_DIR/debug"
}
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
stop() {
    for f in "$STATE"/*.pid; do
        [ -e "$f" ] || continue
        kill "$(cat "$f")" 2>/dev/null || true
        rm -f "$f"
    done
}
case "${1:-}" in
start)
    n="${2:-2}" port="${3:-50050}" slots="${TASK_SLOTS:-1}"
    bin="$(bins)"
    stop
    rm -rf "$STATE"/work-*
    "$bin/gram-scheduler" --bind "127.0.0.1:$port" >"$STATE/scheduler.log" 2>&1 &
    echo $! >"$STATE/scheduler.pid"
    for _ in $(seq 100); do listening "$port" && break; sleep 0.2; done
    listening "$port" || { echo "cluster.sh: the scheduler did not listen on $port (see $STATE/scheduler.log)" >&2; stop; exit 1; }
    for i in $(seq 0 $((n - 1))); do
        "$bin/gram-executor" --scheduler "127.0.0.1:$port" --bind-host 127.0.0.1 --external-host 127.0.0.1 \
            --port $((port + 1 + 2 * i)) --grpc-port $((port + 2 + 2 * i)) --task-slots "$slots" \
            --work-dir "$(mkdir -p "$STATE/work-$i" && cd "$STATE/work-$i" && pwd)" \
            >"$STATE/executor-$i.log" 2>&1 &
        echo $! >"$STATE/executor-$i.pid"
    done
    for i in $(seq 0 $((n - 1))); do
        for _ in $(seq 100); do listening $((port + 2 + 2 * i)) && break; sleep 0.2; done
    done
    echo "cluster: df://127.0.0.1:$port, $n executor(s) x $slots task slot(s); logs in $STATE"
    ;;
status)
    for f in "$STATE"/*.pid; do
        [ -e "$f" ] || { echo "no cluster started"; exit 0; }
        name="$(basename "$f" .pid)"
        if kill -0 "$(cat "$f")" 2>/dev/null; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: gone"; fi
    done
    ;;
stop) stop ;;
*) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
