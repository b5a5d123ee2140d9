#!/usr/bin/env bash
# The day a GPU is lent: kernel tests, build analysis, decisions/s, training speed and the 1M-step projection
# in one JSON + markdown table under benchmarks/results/ (see benchmarks/gpu.py). On a CPU: --dry-run.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu.py "$@"
