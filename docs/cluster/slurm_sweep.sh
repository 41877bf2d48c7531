#!/usr/bin/env bash
# A sweep on a Slurm allocation: a Ray head on the first node, a worker on every other, the driver on the head.
#   sbatch docs/cluster/slurm_sweep.sh sweeps/vocab_scaling.yaml
# Needs: overtok installed on every node (the same environment), a shared filesystem for the sweep's storage_path,
# and an MLflow server the head can reach (docs/tracking.md). Nodes' Ray ports must be open between them only.
#SBATCH --job-name=overtok-sweep
#SBATCH --nodes=2
#SBATCH --exclusive
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --ntasks-per-node=1
#SBATCH --time=12:00:00
set -euo pipefail
SWEEP=${1:?usage: sbatch slurm_sweep.sh SWEEP.yaml}
TRACKING=${TRACKING_URI:?export TRACKING_URI=http://mlflow-host:5000}
STORAGE=${STORAGE:-$HOME/overtok-runs}
NODES_SH=${OVERTOK_DIR:-$SLURM_SUBMIT_DIR}/docs/cluster/ray_nodes.sh  # Slurm runs a copy of this script elsewhere
source "$NODES_SH"

nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
head=${nodes[0]}
head_ip=$(srun --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')
export RAY_PORT=${RAY_PORT:-6379}

srun --nodes=1 --ntasks=1 -w "$head" bash -c "source $NODES_SH; \
    start_head $head_ip $SLURM_CPUS_PER_TASK $SLURM_GPUS_PER_NODE --block" &
sleep 20
for node in "${nodes[@]:1}"; do
    ip=$(srun --nodes=1 --ntasks=1 -w "$node" hostname --ip-address | awk '{print $1}')
    srun --nodes=1 --ntasks=1 -w "$node" bash -c "source $NODES_SH; \
        start_worker $head_ip $ip $SLURM_CPUS_PER_TASK $SLURM_GPUS_PER_NODE --block" &
done
sleep 20
overtok sweep "$SWEEP" --address "$head_ip:$RAY_PORT" --tracking-uri "$TRACKING" --set ray.storage_path="$STORAGE"
