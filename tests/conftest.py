import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see adaptzip/__init__.py)

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and CI has 2 cores

from fixtures import make_base, train_lora  # noqa: E402  (after sys.path and the offline flags)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "llama")


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "gpt2", kind="gpt2")


@pytest.fixture(scope="session")
def lora_fp32(llama_base, tmp_path_factory) -> Path:
    """r=8, alpha=16, all linear modules of a 3-layer tiny Llama (GQA-narrow k/v), trained 8 steps."""
    return train_lora(llama_base, tmp_path_factory.mktemp("ad") / "lora_fp32")


@pytest.fixture(scope="session")
def make_lora(llama_base, tmp_path_factory):
    """Factory: make_lora(name, **train_lora kwargs) -> adapter dir (cached per name)."""
    cache: dict[str, Path] = {}

    def make(name: str, base: Path | None = None, **kw) -> Path:
        if name not in cache:
            cache[name] = train_lora(base or llama_base, tmp_path_factory.mktemp("ad") / name, **kw)
        return cache[name]

    return make
