#!/usr/bin/env bash
# Fresh machine -> installed -> full test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export HF_HUB_OFFLINE=1
# -q comes from pyproject.toml (addopts); a second -q would hide the closing "N passed" line
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
