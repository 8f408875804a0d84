#!/usr/bin/env bash
# The accelerator benchmarks in one call: bench/accelerator.sh OUT [--shape small] [--remat full] ...
# Runs ours and transformers/torch in separate processes and prints one markdown table (bench/suite.py).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m bench.suite "$@"
