#!/usr/bin/env bash
# Set up a virtual environment (if missing) and run every check: lint, then the whole test
# suite including the slow group (kill-and-resume, torchrun DDP/FSDP, speedrun smoke) and the
# cross-checks against transformers. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,ref]'
# The demo page test drives Debian's chromium (playwright's own browser download is not used).
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; } ||
  echo "chromium could not be installed: the demo page test will be skipped" >&2
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -m "slow or not slow" -q "$@"
