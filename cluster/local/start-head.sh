#!/usr/bin/env bash
# Start a local Ray head for testing: token auth on, dashboard bound to 127.0.0.1, stoppable by its own pid.
#   cluster/local/start-head.sh [--port 6390] [--dashboard-port 8290] [--num-cpus 2]
# Activate the venv first: `ray job submit` entrypoints run with the python that `ray start` saw.
# Prints the addresses, where the token is, and how to stop this cluster (and only this one).
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"

port=6390 dash=8290 cpus=2 agent=""
while [ $# -gt 0 ]; do
    case $1 in
        --port) port=$2; shift 2 ;;
        --dashboard-port) dash=$2; shift 2 ;;
        --num-cpus) cpus=$2; shift 2 ;;
        --agent-port) agent=$2; shift 2 ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
done
agent=${agent:-$((dash + 10))}  # the head's dashboard agent, which runs submitted jobs
command -v ray >/dev/null || { echo "ray is not on PATH: activate the project's venv first" >&2; exit 1; }

dir=$(state_dir "$port")
mkdir -p "$dir"
if [ -f "$dir/head.pid" ] && kill -0 "$(cat "$dir/head.pid")" 2>/dev/null; then
    echo "a head is already running for port $port (pid $(cat "$dir/head.pid")); stop it with cluster/local/stop.sh --port $port" >&2
    exit 1
fi
ray get-auth-token --generate >/dev/null  # creates ~/.ray/auth_token when missing; never prints it here

# --block keeps `ray start` in the foreground as the parent of every Ray process of this node: SIGTERM to it
# shuts the node down cleanly, and setsid gives it its own process group for a hard kill (see stop.sh).
setsid ray start --head --block --port "$port" --num-cpus "$cpus" \
    --dashboard-host 127.0.0.1 --dashboard-port "$dash" --dashboard-agent-listen-port "$agent" \
    --disable-usage-stats \
    --temp-dir "$dir/ray" > "$dir/head.log" 2>&1 < /dev/null &
echo $! > "$dir/head.pid"

token_file=${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}
for _ in $(seq 120); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(ray get-auth-token 2>/dev/null)" \
        "http://127.0.0.1:$dash/api/jobs/" || true)
    [ "$code" = 200 ] && break
    kill -0 "$(cat "$dir/head.pid")" 2>/dev/null || { echo "ray start failed; see $dir/head.log" >&2; tail -20 "$dir/head.log" >&2; exit 1; }
    sleep 0.5
done
[ "$code" = 200 ] || { echo "the dashboard did not come up on 127.0.0.1:$dash; see $dir/head.log" >&2; exit 1; }
# The job server answers before the agent that runs jobs is up; a submission in between gets "No available
# agent". Wait for the agent's health check too.
for _ in $(seq 240); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $(ray get-auth-token 2>/dev/null)" \
        "http://127.0.0.1:$agent/api/healthz" || true)
    [ "$code" = 200 ] && break
    sleep 0.5
done
[ "$code" = 200 ] || { echo "the job agent did not come up on port $agent; see $dir/head.log" >&2; exit 1; }

ip=$(ray get-head-ip 2>/dev/null || hostname -I 2>/dev/null | awk '{print $1}')
cat <<MSG
Ray head running (pid $(cat "$dir/head.pid"), $cpus CPUs, token authentication on)
  GCS address:     127.0.0.1:$port   (other nodes: ray start --address <this host's IP>:$port)
  dashboard/jobs:  http://127.0.0.1:$dash
  token file:      $token_file   (clients: export RAY_AUTH_MODE=token; the file is read automatically)
  logs:            $dir/head.log
Submit:  RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:$dash --working-dir . -- raytrain-cls train -c jobs/digits_smoke.yaml
Driver:  RAY_AUTH_MODE=token RAY_ADDRESS=127.0.0.1:$port raytrain-cls train
Stop:    cluster/local/stop.sh --port $port
MSG
