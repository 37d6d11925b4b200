"""Writing a ``vblora`` container as a native PEFT VB-LoRA adapter (``expand --to peft-vblora``,
offered by :meth:`adaptzip.forms.vblora.VbloraForm.native_exports`).

PEFT's ``VBLORA`` (peft/tuners/vblora) computes, per module, A = mix(logits_A) reshaped (r, in)
and B = mix(logits_B) transposed/reshaped (out, r), mix(L) = Σ_{top-k of L} softmax(top-k
logits) · bank[index], ΔW = B @ A with no scaling — the same formula as our form, so the bank is
written as is and the logits are chosen so that softmax over the top-k gives back the stored
weights: logit = log w (PEFT itself loads its ``save_only_topk_weights`` files that way).

Two layouts (formats/forms/vblora.md):

* ``save_only_topk_weights=True`` (default, compact): ``<module>.vblora_logits_{A,B}_topk_indices``
  (uint8 when h ≤ 256, else int16) and ``..._topk_weights`` (the k−1 stored weights, fp32 because
  PEFT scatters their logs into an fp32 tensor); PEFT restores the last weight as 1 − their sum,
  exactly as the container does. Loadable for inference and merging.
* ``topk_only=False``: full ``vblora_logits_{A,B}`` (r, in/b, h) / (out/b, r, h), fp32: log w at
  the selected entries and 4 below the smallest elsewhere, so training can resume in PEFT.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save_file

from ..adapter import PREFIX, TORCH_DTYPES
from ..errors import ExportError
from ..fileio import atomic_dir
from .vblora import index_dtype

if TYPE_CHECKING:  # the container hands itself to its form's exports; forms never import it
    from ..container import Container


def vblora_config(c: Container, topk_only: bool) -> dict:
    """The VBLoRAConfig dict (every field PEFT 0.21 writes) for a vblora container."""
    src = c.source_config
    cfg = c.manifest["config"]
    return {
        "peft_type": "VBLORA",
        "auto_mapping": None,
        "base_model_name_or_path": src.get("base_model_name_or_path"),
        "revision": src.get("revision"),
        "task_type": src.get("task_type"),
        "inference_mode": True,
        "r": int(c.manifest["state"]["rank"]),
        "num_vectors": int(cfg["bank"]),
        "vector_length": int(cfg["vector_len"]),
        "topk": int(cfg["topk"]),
        "target_modules": [m.name for m in c.modules],
        "exclude_modules": None,
        "save_only_topk_weights": bool(topk_only),
        "vblora_dropout": 0.0,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in c.modules),
        "bias": "none",
        "modules_to_save": src.get("modules_to_save"),
        "init_vector_bank_bound": 0.02,
        "init_logits_std": 0.1,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _check(c: Container) -> None:
    emb = [m.name for m in c.modules if m.kind == "embedding"]
    if emb:
        raise ExportError(
            c.path, f"PEFT's VB-LoRA adapts Linear/Conv1D layers only, not the embedding {emb[0]}; use --to peft"
        )
    fifo = {m.fan_in_fan_out for m in c.modules}
    if len(fifo) > 1:
        raise ExportError(
            c.path, "modules mix fan_in_fan_out True and False, which one VBLoRAConfig cannot express; use --to peft"
        )
    bad = [x for x in c.carried if x["role"] != "modules_to_save"]
    if bad:
        what = {
            "lora_bias": "a LoRA bias",
            "dora_magnitude": "a DoRA magnitude",
            "embedding_base": "a resized embedding",
        }
        raise ExportError(
            c.path, f"PEFT's VB-LoRA has no {what.get(bad[0]['role'], bad[0]['role'])} ({bad[0]['key']}); use --to peft"
        )


def to_peft_vblora(c: Container, out: Path, *, dtype: str | None = None, topk_only: bool = True) -> dict:
    """Write ``out/adapter_config.json`` (VBLORA) + ``out/adapter_model.safetensors`` so that
    ``PeftModel.from_pretrained(base, out)`` gives every module the container's ΔŴ. ``dtype``:
    the bank's dtype (default: the container's; fp32 for an int8/int4-quantised bank, which is
    written dequantised). Raises ExportError for embeddings, LoRA biases and DoRA."""
    _check(c)
    quantised = c.storage is not None and "bank" in c.storage.tensors  # read back dequantised, in fp32
    bank_dtype = (torch.float32 if quantised else c.dtype) if dtype is None else TORCH_DTYPES[dtype]
    cfg = c.manifest["config"]
    r, b, k, h = int(c.manifest["state"]["rank"]), int(cfg["vector_len"]), int(cfg["topk"]), int(cfg["bank"])
    tensors: dict[str, torch.Tensor] = {"base_model.vblora_vector_bank": c.tensor("bank").to(bank_dtype).contiguous()}
    with torch.no_grad():
        if topk_only:
            idx = c.tensor("topk_indices").to(index_dtype(h))
            w = c.tensor("topk_weights").float() if k > 1 else torch.zeros(idx.shape[0], 0)
            off = 0
            for m in c.modules:
                for part, shape in (("A", (r, m.in_features // b)), ("B", (m.out_features // b, r))):
                    n = shape[0] * shape[1]
                    key = f"{PREFIX}{m.name}.vblora_logits_{part}"
                    tensors[f"{key}_topk_indices"] = idx[off : off + n].reshape(*shape, k).contiguous()
                    tensors[f"{key}_topk_weights"] = w[off : off + n].reshape(*shape, k - 1).contiguous()
                    off += n
        else:
            form = c.form()
            form.unfreeze()
            for i, m in enumerate(c.modules):
                tensors[f"{PREFIX}{m.name}.vblora_logits_A"] = form.logits_A[i].detach().float().contiguous()
                tensors[f"{PREFIX}{m.name}.vblora_logits_B"] = form.logits_B[i].detach().float().contiguous()
        for j, x in enumerate(c.carried):  # only modules_to_save remain after _check: verbatim
            tensors[x["key"]] = c.carried_tensor(j).contiguous()
    config = vblora_config(c, topk_only)
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {
        "output": str(out),
        "target": "peft-vblora",
        "r": r,
        "num_vectors": h,
        "vector_length": b,
        "topk": k,
        "save_only_topk_weights": topk_only,
        "modules": len(c.modules),
        "bytes": (out / "adapter_model.safetensors").stat().st_size,
    }
