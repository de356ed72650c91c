#!/usr/bin/env bash
# Announce a node's preemption, as a cloud provider's spot reclaim or the autoscaler does: Ray marks the node as
# draining (with a deadline), and a training run with workers on it writes a checkpoint at once
# (--preemption-check-interval). The node keeps running: stop it afterwards, e.g. `stop.sh --node w1 --kill`.
#   cluster/local/drain.sh [--port 6390] --node w1 [--deadline 60]
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

port=6390 node="" deadline=60
while [ $# -gt 0 ]; do
    case $1 in
        --port) port=$2; shift 2 ;;
        --node) node=$2; shift 2 ;;
        --deadline) deadline=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
dir=$(state_dir "$port")
[ -n "$node" ] || { echo "which node? --node NAME (one that add-worker.sh started)" >&2; exit 2; }
[ -f "$dir/$node.node-port" ] || { echo "no node $node on the cluster at port $port (add-worker.sh --name $node)" >&2; exit 1; }

# The node's Ray id, found by the node-manager port add-worker.sh gave it.
node_id=$(RAY_ADDRESS="127.0.0.1:$port" python3 - "$(cat "$dir/$node.node-port")" <<'PY'
import sys

import ray

ray.init(logging_level="ERROR", log_to_driver=False)
ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeManagerPort"] == int(sys.argv[1])]
print(ids[0] if ids else "")
PY
)
[ -n "$node_id" ] || { echo "node $node is not alive in the cluster at port $port" >&2; exit 1; }
ray drain-node --address "127.0.0.1:$port" --node-id "$node_id" --reason DRAIN_NODE_REASON_PREEMPTION \
    --reason-message "drain.sh: simulated preemption of $node" --deadline-remaining-seconds "$deadline"
echo "node $node ($node_id) is draining: preempted in $deadline s"
