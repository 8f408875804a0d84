#!/usr/bin/env bash
# Train on one machine with one or more GPUs (one process drives them all).
#
#   launch/gpu_single_node.sh [--dry-run] CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/gpu_single_node.sh configs/llava15.py:7b_stage2 /ckpt/llava15-7b-ft \
#       --config.model.init=/ckpt/llava15-7b-stage1 --config.data.image_folder=/data/llava
#
# Relative CONFIG and WORKDIR paths are taken from where you run it; WORKDIR may be gs://...
# --dry-run prints the command instead of running it.
set -euo pipefail
usage() { awk 'NR > 1 && /^#( |$)/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -ge 2 ] || usage
CONFIG=$1 WORKDIR=$2; shift 2
# Resolve the caller's relative paths before moving to the repository.
[ -e "${CONFIG%%:*}" ] && CONFIG="$(cd "$(dirname "${CONFIG%%:*}")" && pwd)/$(basename "$CONFIG")"
case "$WORKDIR" in *://* | /*) ;; *) WORKDIR="$PWD/$WORKDIR" ;; esac
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
CMD=(python -m llava_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@")
if [ "$DRY_RUN" = 1 ]; then
  echo "cd $(printf '%q' "$PWD")"
  printf '%q ' "${CMD[@]}"; echo
  exit 0
fi
exec "${CMD[@]}"
