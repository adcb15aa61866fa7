#!/bin/bash
# shellcheck shell=bash
# Llama-3.1-70B QLoRA, ZeRO-3, 8 nodes x 8 GPUs. From the repository root:
#   mkdir -p logs && sbatch slurm/train_70b.sh model.path=/shared/models/llama-3.1-70b data.sources.0.path=/shared/train.jsonl
#   sbatch --nodes=4 --partition=gpu --account=proj slurm/train_70b.sh ...   # counts come from Slurm at run time
#SBATCH --job-name=harness-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
# --signal: 15 min before the limit the batch shell gets USR1, the ranks save and the job requeues.
# Partition and account: pass them on the sbatch command line or with SBATCH_PARTITION / SBATCH_ACCOUNT.
RECIPE=${RECIPE:-harness/recipes/llama3_70b_qlora.yaml}
# shellcheck source=slurm/launch.sh
source "${HARNESS_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"
