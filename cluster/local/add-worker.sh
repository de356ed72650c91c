#!/usr/bin/env bash
# Add a second Ray node on this host to a local head (a "worker node" for multi-node tests).
#   cluster/local/add-worker.sh [--port 6390] [--name w1] [--num-cpus 2] [--base-port 6500]
# Its ports start at --base-port so it never collides with the head's. Stop it with stop.sh --node NAME
# (graceful) or stop.sh --node NAME --kill (its whole process group at once, like a lost machine).
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

port=6390 name=w1 cpus=2 base=6500
while [ $# -gt 0 ]; do
    case $1 in
        --port) port=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --num-cpus) cpus=$2; shift 2 ;;
        --base-port) base=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
dir=$(state_dir "$port")
[ -f "$dir/head.pid" ] || { echo "no head for port $port: run cluster/local/start-head.sh first" >&2; exit 1; }
if [ -f "$dir/$name.pid" ] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
    echo "node $name is already running (pid $(cat "$dir/$name.pid"))" >&2; exit 1
fi
setsid ray start --address "127.0.0.1:$port" --block --num-cpus "$cpus" --disable-usage-stats \
    --node-manager-port "$base" --object-manager-port $((base + 1)) --metrics-export-port $((base + 2)) \
    --dashboard-agent-listen-port $((base + 3)) --dashboard-agent-grpc-port $((base + 4)) \
    --runtime-env-agent-port $((base + 5)) --min-worker-port $((base + 100)) --max-worker-port $((base + 399)) \
    --temp-dir "$dir/ray-$name" \
    > "$dir/$name.log" 2>&1 < /dev/null &
echo $! > "$dir/$name.pid"
echo "$base" > "$dir/$name.node-port"  # how drain.sh finds this node among the cluster's

for _ in $(seq 240); do
    if grep -q "Ray runtime started" "$dir/$name.log"; then
        echo "node $name joined (pid $(cat "$dir/$name.pid"), $cpus CPUs); logs: $dir/$name.log"
        exit 0
    fi
    kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null || { echo "node $name failed to start; see $dir/$name.log" >&2; tail -20 "$dir/$name.log" >&2; exit 1; }
    sleep 0.5
done
echo "node $name did not join within 120 s; see $dir/$name.log" >&2
exit 1
