#!/usr/bin/env bash
# Train on a Cloud TPU VM or pod slice: every host runs the same command; JAX finds the others.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu_pod.sh my-v5p-64 us-east5-a configs/llava15.py:7b gs://bucket/llava15-7b \
#       --config.model.init=gs://bucket/llava15-7b-init --config.data.image_folder=/data/llava
#
# The repository is copied to every host and installed there; `jax[tpu]` replaces the CPU jax.
# Preemption: the training loop saves a checkpoint on SIGTERM; run the same command again to resume.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4; shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
tar -C "$REPO" --exclude=.git --exclude=.venv --exclude=workdir -czf /tmp/llava_jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/llava_jax.tgz "$TPU":~/ --zone "$ZONE" --worker=all
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  mkdir -p ~/llava_jax && tar -C ~/llava_jax -xzf ~/llava_jax.tgz && cd ~/llava_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  python -m llava_jax.train --config=$CONFIG --workdir=$WORKDIR $*
"
