#!/usr/bin/env bash
# The Ray node commands of overtok's cluster recipes: sourced by slurm_sweep.sh, and by tests/test_sweep.py, which
# starts a head and a worker with them on one machine. Token authentication stays on: every node and the driver
# need the head's token (~/.ray/auth_token, or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH).
#   RAY_PORT (default 6379), RAY_TEMP_DIR (optional: where the node keeps its session)
set -euo pipefail
export RAY_AUTH_MODE=token
RAY=${RAY:-ray}

# start_head IP CPUS GPUS: the head node, listening on IP:RAY_PORT, no dashboard
start_head() {
    $RAY start --head --node-ip-address="$1" --port="${RAY_PORT:-6379}" --num-cpus="$2" --num-gpus="$3" \
        --include-dashboard=false ${RAY_TEMP_DIR:+--temp-dir="$RAY_TEMP_DIR"} "${@:4}"
}

# start_worker HEAD_IP IP CPUS GPUS [extra ray start flags]: a worker node joining the head
start_worker() {
    $RAY start --address="$1:${RAY_PORT:-6379}" --node-ip-address="$2" --num-cpus="$3" --num-gpus="$4" \
        ${RAY_TEMP_DIR:+--temp-dir="$RAY_TEMP_DIR"} "${@:5}"
}
