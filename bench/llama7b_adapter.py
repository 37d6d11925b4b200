"""A synthetic PEFT LoRA adapter shaped like one trained on Llama-7B (no base model needed).

``build_llama7b_adapter(out_dir)`` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with
the keys PEFT saves for ``target_modules = q,k,v,o,gate,up,down``::

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

Shapes (Llama-7B; k/v GQA-narrow by default, 8 KV heads of 128 like Llama-2-70B/3-8B):
q,o 4096×4096, k,v 4096→1024, gate/up 4096→11008, down 11008→4096.

Spectra imitate a trained LoRA: A (r×in) is PEFT's kaiming-uniform initialisation (rows nearly
orthogonal in high dimension, norm ≈ 1/√3), B (out×r) = U · diag(σ) · R with U orthonormal columns,
R a random rotation and σ_i = s_m · i^(−p_m), p_m ∈ [0.6, 1.4] and a log-normal module scale s_m
(MLP and late layers a little larger), so that ranks must be allocated unevenly across modules.
Deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 4096
INTER = 11008
KV = 1024  # 8 KV heads × 128 (GQA-narrow k/v)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def module_shapes(kv_dim: int = KV, hidden: int = HIDDEN, inter: int = INTER) -> dict[str, tuple[str, int, int]]:
    """type -> (submodule, in_features, out_features) of a Llama layer (default: Llama-7B's)."""
    return {
        "q_proj": ("self_attn", hidden, hidden),
        "k_proj": ("self_attn", hidden, kv_dim),
        "v_proj": ("self_attn", hidden, kv_dim),
        "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }


def _factors(
    n_in: int, n_out: int, r: int, scale: float, power: float, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r×n_in) kaiming-uniform like PEFT's init; B (n_out×r) = U diag(σ) R."""
    bound = 1.0 / math.sqrt(n_in)  # kaiming_uniform_(a=√5) on an (r, in) weight
    A = (torch.rand(r, n_in, generator=g) * 2 - 1) * bound
    U, _ = torch.linalg.qr(torch.randn(n_out, r, generator=g))  # n_out×r, orthonormal columns
    R, _ = torch.linalg.qr(torch.randn(r, r, generator=g))  # r×r rotation
    sigma = scale * torch.arange(1, r + 1, dtype=torch.float32).pow(-power)
    B = (U * sigma) @ R  # n_out×r
    return A, B


def build_llama7b_adapter(
    out_dir,
    layers: int = 32,
    rank: int = 16,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    kv_dim: int = KV,
    alpha: float | None = None,
) -> Path:
    """Write a Llama-7B-shaped PEFT LoRA directory to ``out_dir`` and return its path.

    ``layers`` decoder layers, uniform rank ``rank``, ``lora_alpha = alpha`` (default 2·rank),
    tensors stored in ``dtype``. About 73.7 MB at the defaults (36.8 M parameters in fp16)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    alpha = float(2 * rank if alpha is None else alpha)
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    shapes = module_shapes(kv_dim)
    for i in range(layers):
        depth = i / max(1, layers - 1)
        for t, (sub, n_in, n_out) in shapes.items():
            # module magnitude: log-normal, MLP ×1.5, growing with depth; decay exponent per module
            s = (
                0.05
                * math.exp(0.5 * float(torch.randn(1, generator=g)))
                * (1.5 if sub == "mlp" else 1.0)
                * (0.7 + 0.6 * depth)
            )
            p = 0.6 + 0.8 * float(torch.rand(1, generator=g))
            A, B = _factors(n_in, n_out, rank, s, p, g)
            key = f"base_model.model.model.layers.{i}.{sub}.{t}"
            tensors[f"{key}.lora_A.weight"] = A.to(dtype).contiguous()
            tensors[f"{key}.lora_B.weight"] = B.to(dtype).contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "llama-7b-shaped",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(ATTN + MLP),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": False,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    a = ap.parse_args()
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    print(build_llama7b_adapter(a.out_dir, a.layers, a.rank, a.seed, dt))
