"""Set-up shared by the real-model examples: offline hub settings (before torch/transformers load),
the repo on sys.path, output and scratch locations."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

OUT = ROOT / "examples" / "out"
# scratch (LoRA, Σ): outside examples/out/, which examples/demo.py replaces on every run
WORK = Path(os.environ.get("ADAPTZIP_EXAMPLES_WORK", Path.home() / ".cache" / "adaptzip-examples"))
