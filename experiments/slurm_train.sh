#!/bin/bash
# Multi-host training on a SLURM cluster: one task per node, each task drives all GPUs of its node.
#   sbatch --nodes=2 experiments/slurm_train.sh --config mixtral_small parallel.expert=8 parallel.fsdp=2
# Every task runs the same command; moe_jax.distributed.initialize() reads the SLURM variables
# (coordinator = first node, process id = SLURM_PROCID) and the mesh then spans all nodes' GPUs
# (data=-1 fills). Put `expert` (and `tensor`) within a node where you can: those axes exchange the
# most data; data/fsdp across nodes.
#SBATCH --job-name=moe_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=runs/slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export NCCL_NVLS_ENABLE=0            # never NVLink multicast (see DESIGN.md, Platforms)
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# Without SLURM, set JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i per host.
srun --kill-on-bad-exit=1 python experiments/train.py --no-progress "$@" \
    train.out_dir="runs/slurm-${SLURM_JOB_ID}"
