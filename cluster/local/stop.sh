#!/usr/bin/env bash
# Stop what start-head.sh / add-worker.sh started, by their own pids only (never a blanket `ray stop`).
#   cluster/local/stop.sh [--port 6390] [--grace 10]     the worker nodes, then the head (graceful)
#   cluster/local/stop.sh [--port 6390] --node w1 [--kill]   one node; --kill = SIGKILL its process group
#   (a preemption with notice first: drain.sh --node w1, then stop.sh --node w1 --kill)
# Graceful = SIGTERM, then SIGKILL of the node's process group after --grace seconds: an idle head exits in ~4 s,
# but one whose worker node was lost can sit out SIGTERM for 30 s and more (seen with Ray 2.60).
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

port=6390 node="" hard=0 grace=10
while [ $# -gt 0 ]; do
    case $1 in
        --port) port=$2; shift 2 ;;
        --node) node=$2; shift 2 ;;
        --kill) hard=1; shift ;;
        --grace) grace=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
dir=$(state_dir "$port")

stop_one() {  # stop_one NAME
    local pidfile="$dir/$1.pid" pid
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        if [ "$hard" = 1 ]; then
            kill -KILL -- "-$pid" 2>/dev/null || true  # setsid made pid the group id: the node's raylet and all
        else
            kill -TERM "$pid"  # `ray start --block` shuts its node's processes down on SIGTERM
            if ! wait_for_pid_exit "$pid" "$grace"; then
                echo "$1 (pid $pid) still up ${grace} s after SIGTERM; killing its process group" >&2
                kill -KILL -- "-$pid" 2>/dev/null || true
            fi
        fi
        wait_for_pid_exit "$pid" 10 || true
        echo "stopped $1 (pid $pid)"
    fi
    rm -f "$pidfile" "$dir/$1.node-port"
}

if [ -n "$node" ]; then
    stop_one "$node"
    exit 0
fi
for pidfile in "$dir"/*.pid; do
    [ -e "$pidfile" ] || continue
    name=$(basename "$pidfile" .pid)
    [ "$name" = head ] || stop_one "$name"
done
stop_one head
