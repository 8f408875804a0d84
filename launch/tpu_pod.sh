#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: every host runs the same command; JAX finds the others.
#
#   launch/tpu_pod.sh [--dry-run] TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/llava15.py:7b gs://bucket/llava15-7b \
#       --config.model.init=gs://bucket/llava15-7b-init --config.data.image_folder=gs://bucket/llava
#
# The package, configs/, launch/ and setup.py (and CONFIG, if it is a file of the repository elsewhere)
# are copied to every host and installed there with GCS support; `jax[tpu]` replaces the CPU jax.
# Nothing else is: local workdirs, adapters and exported models stay here. Keep WORKDIR, model
# directories and data on gs:// (every host sees them).
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
# What `pip install -e .` and the training command need, and nothing a local run or export left.
SHIP=(llava_jax configs launch setup.py)
CONFIG_FILE=${CONFIG%%:*}
case "$CONFIG_FILE" in
  configs/* | /* | *://*) ;;
  *) if [ -f "$REPO/$CONFIG_FILE" ]; then SHIP+=("$CONFIG_FILE"); fi ;;
esac
REMOTE="set -e; mkdir -p ~/llava_jax && tar -C ~/llava_jax -xzf ~/llava_jax.tgz && cd ~/llava_jax; \
python3 -m venv .venv && . .venv/bin/activate; pip install -q -e '.[gcs]' 'jax[tpu]'; $TRAIN"
CMDS=(
  "$(printf '%q ' tar -C "$REPO" --exclude=__pycache__ --exclude='*.pyc' -czf /tmp/llava_jax.tgz "${SHIP[@]}")"
  "$(printf '%q ' gcloud compute tpus tpu-vm scp /tmp/llava_jax.tgz "$TPU":~/ --zone "$ZONE" --worker=all)"
  "$(printf '%q ' gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$REMOTE")"
)
for c in "${CMDS[@]}"; do
  if [ "$DRY_RUN" = 1 ]; then echo "$c"; else eval "$c"; fi
done
