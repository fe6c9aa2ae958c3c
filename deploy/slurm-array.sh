#!/bin/bash
# Explain and evaluate a data set with vitcx as a Slurm job array: one task per shard, each
# resuming where it stopped if it is requeued or resubmitted. Submit as it is:
#
#   MODEL=timm/vit_base_patch16_224.augreg2_in21k_ft_in1k DATA=$HOME/data/val OUT=$HOME/runs/val \
#     sbatch deploy/slurm-array.sh
#
# then, when every task has finished, combine the shards:
#
#   vitcx merge "$OUT"/shard-* --out "$OUT/all"
#
#SBATCH --job-name=vitcx
#SBATCH --array=0-15
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=vitcx-%A_%a.log
set -euo pipefail

VITCX=${VITCX:-vitcx}                       # the vitcx binary
MODEL=${MODEL:?set MODEL to a Hub id or a checkpoint folder}
DATA=${DATA:?set DATA to a manifest.jsonl or a folder of images}
OUT=${OUT:?set OUT to the folder that receives one sub-folder per shard}
METHODS=${METHODS:-vitcx}

# The shard is SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT, read by vitcx itself; each shard
# writes its own folder, and a rerun of a task skips the images its record says are done.
exec "$VITCX" eval \
  --model "$MODEL" \
  --data "$DATA" \
  --methods "$METHODS" \
  --out "$OUT/shard-${SLURM_ARRAY_TASK_ID}" \
  --quiet
