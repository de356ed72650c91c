# Shared by the local-cluster scripts: where a cluster's pid files, logs and Ray temp dir live.
# A cluster is named by its GCS port, so several can coexist on one host without touching each other.
set -euo pipefail

state_dir() {  # state_dir PORT
    echo "${RAYTRAIN_CLS_CLUSTER_DIR:-/tmp/raytrain-cls-cluster}-$1"
}

# Token authentication stays on: every client needs the token (~/.ray/auth_token, RAY_AUTH_TOKEN, or
# RAY_AUTH_TOKEN_PATH). Nothing here turns it off.
export RAY_AUTH_MODE=token

wait_for_pid_exit() {  # wait_for_pid_exit PID SECONDS
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.5
    done
}
