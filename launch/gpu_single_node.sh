#!/usr/bin/env bash
# Train on one machine with one or more GPUs (one process drives them all).
#
#   launch/gpu_single_node.sh configs/llava15.py:7b_stage2 /ckpt/llava15-7b-ft \
#       --config.model.init=/ckpt/llava15-7b-stage1 --config.data.image_folder=/data/llava
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,6p' "$0"; exit 2
fi
CONFIG=$1 WORKDIR=$2; shift 2
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
exec python -m llava_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@"
