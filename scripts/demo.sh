#!/usr/bin/env bash
# Set up on a fresh machine and run the main job end to end: build a tiny local Llama, train a
# PEFT LoRA a few steps, compress it, expand it, load the result with PEFT, print the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ADAPTZIP_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
exec "$VENV/bin/python" examples/demo.py "$@"
