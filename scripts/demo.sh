#!/usr/bin/env bash
# Fresh machine -> installed -> the offline end-to-end demo (explain, train, evaluate, match)
# on real entity data shipped by registry packages. About 8 1/2 minutes on 2 CPU cores (measured: README, "The demo").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1
exec .venv/bin/python examples/demo.py "$@"
