#!/bin/bash
# shellcheck shell=bash
# Llama-3.1-8B QLoRA, ZeRO-3, one node x 8 GPUs. From the repository root:
#   mkdir -p logs && sbatch slurm/train_8b.sh model.path=/shared/models/llama-3.1-8b data.sources.0.path=/shared/train.jsonl
#SBATCH --job-name=harness-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=08:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
RECIPE=${RECIPE:-harness/recipes/llama3_8b_qlora.yaml}
# shellcheck source=slurm/launch.sh
source "${HARNESS_DIR:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh"
