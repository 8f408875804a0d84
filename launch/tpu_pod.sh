#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: every host runs the same command; JAX finds the others.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/llava15.py:7b gs://bucket/llava15-7b \
#       --config.model.init=gs://bucket/llava15-7b-init --config.data.image_folder=gs://bucket/llava
#
# The repository is copied to every host and installed there with its GCS support; `jax[tpu]`
# replaces the CPU jax. Keep WORKDIR, model directories and data on gs:// (every host sees them).
# Preemption: the training loop saves a checkpoint on SIGTERM; run the same command again to resume.
# --dry-run prints the commands (tar, gcloud) instead of running them.
set -euo pipefail
usage() { awk 'NR > 1 && /^#( |$)/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2; }
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -ge 4 ] || usage
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4; shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
# The remote shell gets one string: every argument quoted for it, so spaces and $ survive as typed.
TRAIN=$(printf '%q ' python -m llava_jax.train --config="$CONFIG" --workdir="$WORKDIR" "$@")
REMOTE="set -e; mkdir -p ~/llava_jax && tar -C ~/llava_jax -xzf ~/llava_jax.tgz && cd ~/llava_jax; \
python3 -m venv .venv && . .venv/bin/activate; pip install -q -e '.[gcs]' 'jax[tpu]'; $TRAIN"
CMDS=(
  "tar -C $(printf '%q' "$REPO") --exclude=.git --exclude=.venv --exclude=workdir -czf /tmp/llava_jax.tgz ."
  "$(printf '%q ' gcloud compute tpus tpu-vm scp /tmp/llava_jax.tgz "$TPU":~/ --zone "$ZONE" --worker=all)"
  "$(printf '%q ' gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$REMOTE")"
)
for c in "${CMDS[@]}"; do
  if [ "$DRY_RUN" = 1 ]; then echo "$c"; else eval "$c"; fi
done
