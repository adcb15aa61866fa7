# shellcheck shell=bash
# Site settings, sourced by slurm/launch.sh before anything starts. Copy this file to
# slurm/env/<your-cluster>.sh, edit it, and select it with `HARNESS_SITE=<your-cluster> sbatch ...`.
# Everything here is a default: a variable already set in the submitting shell wins.

# --- software: modules, container, Python ---------------------------------------------------------
# module load cuda/12.4 nccl/2.21          # site modules, if any
# PYTHON=/shared/envs/harness/bin/python   # else $HARNESS_DIR/.venv/bin/python, else python3

# --- network: which interfaces NCCL and gloo use ---------------------------------------------------
# Leave unset to let NCCL choose. Typical: NCCL_SOCKET_IFNAME=ib0 (IPoIB) or =eth0; exclude with ^docker,lo.
# export NCCL_SOCKET_IFNAME=^docker,lo
# export GLOO_SOCKET_IFNAME=eth0
# export NCCL_IB_HCA=mlx5                  # InfiniBand / RoCE adapters
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}      # INFO to debug; with INFO, one file per host and process:
if [ "$NCCL_DEBUG" = INFO ]; then export NCCL_DEBUG_FILE=${NCCL_DEBUG_FILE:-logs/nccl.%h.%p.txt}; fi

# --- hangs: fail with a trace instead of waiting forever -------------------------------------------
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}      # flight recorder: each rank's last collectives
export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
export TORCH_FR_DUMP_TEMP_FILE=${TORCH_FR_DUMP_TEMP_FILE:-$PWD/logs/flight_recorder/rank_}
export PYTHONFAULTHANDLER=1

# --- node-local caches: JIT-compiled kernels must not race on a shared file system -----------------
NODE_CACHE=${NODE_CACHE:-${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/harness-${USER:-$(id -un)}}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$NODE_CACHE/triton}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$NODE_CACHE/torch_extensions}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}  # compute nodes read local model directories only

# --- CPU threads per process (the tests run CPU ranks; GPU jobs rarely need more than a few) -------
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
