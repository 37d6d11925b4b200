"""Real fixtures built locally: tiny transformers models saved as safetensors directories and
PEFT LoRA adapters trained a few steps (so B ≠ 0). No model hub, no mocks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from adaptzip.container import payload_sha256
from adaptzip.options import FitOptions
from adaptzip.runtime import single_thread

# For tests whose subject is not the weight-space fit (sizes, containers, distillation, auto's
# choice): a few optimiser steps (a bslora fit at its own rule takes 10–30 s on the tiny models,
# and auto fits every candidate form).
FAST_FIT = FitOptions(steps=5)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama_config(
    layers: int = 3, hidden: int = 64, inter: int = 96, vocab: int = 128, heads: int = 4, kv_heads: int = 2, **more
) -> LlamaConfig:
    """A tiny Llama (GQA when kv_heads < heads); ``more``: any other LlamaConfig field."""
    return LlamaConfig(
        **{
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "vocab_size": vocab,
            "max_position_embeddings": 128,
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            **more,
        }
    )


def make_base(path: Path, kind: str = "llama", seed: int = 0, **cfg) -> Path:
    """A tiny randomly initialised causal LM saved with save_pretrained (safetensors)."""
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(tiny_llama_config(**cfg))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(
                n_embd=cfg.get("hidden", 64),
                n_layer=cfg.get("layers", 2),
                n_head=4,
                vocab_size=cfg.get("vocab", 128),
                n_positions=128,
                bos_token_id=1,
                eos_token_id=2,
            )
        )
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    return path


def load_base(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)


def train_lora(
    base_dir: Path,
    out: Path,
    *,
    steps: int = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    lr: float = 2e-2,
    init_seed: int | None = None,
    data_seed: int | None = None,
    **lora_kwargs,
) -> Path:
    """Train a PEFT LoRA a few steps on random token sequences and save it in ``dtype``.

    ``init_seed`` fixes the LoRA initialisation (A) independently of the data (``data_seed``), as in
    pipelines that train many adapters from one seed."""
    model = load_base(base_dir)
    kw = {
        "r": 8,
        "lora_alpha": 16,
        "target_modules": LLAMA_TARGETS if model.config.model_type == "llama" else ["c_attn", "c_proj", "c_fc"],
    }
    kw.update(lora_kwargs)
    torch.manual_seed(seed if init_seed is None else init_seed)
    pm = get_peft_model(model, LoraConfig(**kw))
    g = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    vocab = model.config.vocab_size
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ids = torch.randint(3, vocab, (4, 24), generator=g)
        ids[:, 1::2] = (ids[:, ::2] * 7 + 3) % vocab  # a learnable pattern
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    if dtype != torch.float32:
        for p in pm.parameters():
            if p.requires_grad:
                p.data = p.data.to(dtype)
    pm.save_pretrained(out)
    return out


def train_bert_classifier(base: Path, out: Path, *, steps: int, lr: float, seq: int = 24, **lora_kwargs) -> Path:
    """A tiny BERT sequence classifier (3 labels) saved to ``base`` and a PEFT SEQ_CLS LoRA on it
    (head in modules_to_save; ``lora_kwargs`` for LoraConfig), trained ``steps`` Adam steps on
    random token rows labelled by their first token, saved to ``out``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=128,
        num_labels=3,
    )
    m = BertForSequenceClassification(cfg)
    m.save_pretrained(base)
    pm = get_peft_model(m, LoraConfig(task_type="SEQ_CLS", **lora_kwargs))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(4, 128, (8, seq), generator=g)
        loss = pm(input_ids=ids, labels=ids[:, 0] % 3).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(out)
    return out


# What PEFT writes for a plain LoRA; write_adapter's ``config`` overrides or extends it.
PEFT_LORA_CONFIG = {
    "peft_type": "LORA",
    "base_model_name_or_path": "synthetic",
    "task_type": "CAUSAL_LM",
    "bias": "none",
    "fan_in_fan_out": False,
    "use_rslora": False,
    "use_dora": False,
}


def lora_key(module: str, factor: str) -> str:
    """PEFT's tensor name of a module's factor ``A`` or ``B``: ``base_model.model.<module>.lora_A.weight``."""
    return f"base_model.model.{module}.lora_{factor}.weight"


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """A PEFT LoRA directory written by hand (synthetic adapters of chosen shapes and spectra):
    ``tensors`` (PEFT names, see :func:`lora_key`) as ``adapter_model.safetensors`` and
    ``config`` (at least ``r``, ``lora_alpha``, ``target_modules``) over :data:`PEFT_LORA_CONFIG`
    as ``adapter_config.json``. The directory must not exist."""
    path.mkdir(parents=True)
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({**PEFT_LORA_CONFIG, **config}))
    return path


def random_ids(n: int = 2, length: int = 16, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def one_torch_thread():
    """Generator for a pytest fixture: torch on one thread while it is active, the previous count after
    (:func:`adaptzip.runtime.single_thread`). The test matrices are tiny, so on a loaded 2-core machine
    one thread is far faster than two (training included). Kept free of pytest so that bench scripts
    can import this module; a test module makes it a fixture with
    ``pytest.fixture(autouse=True)(one_torch_thread)`` (add ``scope="module"`` to set it once per module)."""
    with single_thread():
        yield


# (in, out) of every LoRA target of :func:`tiny_llama_config`'s defaults (hidden 64, MLP 96, 2 of 4
# heads for k/v: 32), and where each sits in a layer.
TINY_LLAMA_MODULES = {
    "q_proj": ("self_attn", 64, 64),
    "k_proj": ("self_attn", 64, 32),
    "v_proj": ("self_attn", 64, 32),
    "o_proj": ("self_attn", 64, 64),
    "gate_proj": ("mlp", 64, 96),
    "up_proj": ("mlp", 64, 96),
    "down_proj": ("mlp", 96, 64),
}


def tiny_llama_adapter(
    path: Path,
    *,
    r: int = 8,
    alpha: float = 16,
    layers: int = 3,
    targets: tuple[str, ...] | list[str] = tuple(LLAMA_TARGETS),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    dora: bool = False,
    config: dict | None = None,
) -> Path:
    """A synthetic PEFT LoRA for the tiny Llama of :func:`make_base` (same module names and shapes,
    so it also merges into and calibrates on that base): seeded random A and B ≠ 0, no training.
    ``dora`` adds DoRA magnitude vectors (``use_dora``). Written by :func:`write_adapter`."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for t in targets:
            block, n_in, n_out = TINY_LLAMA_MODULES[t]
            name = f"model.layers.{i}.{block}.{t}"
            tensors[lora_key(name, "A")] = (torch.randn(r, n_in, generator=g) * 0.2).to(dtype)
            tensors[lora_key(name, "B")] = (torch.randn(n_out, r, generator=g) * 0.05).to(dtype)
            if dora:
                tensors[f"base_model.model.{name}.lora_magnitude_vector"] = (
                    1 + 0.1 * torch.rand(n_out, generator=g)
                ).to(dtype)
    cfg = {"r": r, "lora_alpha": alpha, "target_modules": list(targets), "use_dora": dora, **(config or {})}
    return write_adapter(path, tensors, cfg)


def tree_state(root: Path) -> dict[str, str]:
    """Every entry below ``root`` (symlinks not followed) by relative path: ``dir``,
    ``link -> <target>`` or ``file <sha256>``: two states compare equal exactly when nothing was
    added, removed or changed (inputs byte-identical, no output or temporary file left)."""
    import hashlib
    import os

    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            elif os.path.isdir(p):
                out[rel] = "dir"
            else:
                try:
                    with open(p, "rb") as f:
                        out[rel] = "file " + hashlib.sha256(f.read()).hexdigest()
                except PermissionError:  # a case's unreadable input (not root): same before and after
                    out[rel] = "file (unreadable)"
    return out


# ---------------------------------------------------------------- safetensors bytes (formats/container.md)
def read_safetensors_raw(path: Path) -> tuple[dict, bytes]:
    """(header object, payload bytes) of a safetensors file, parsed by hand (no library checks)."""
    import struct

    b = Path(path).read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8 : 8 + n]), b[8 + n :]


def write_safetensors_raw(path: Path, header: dict, payload: bytes) -> None:
    """Write a header object and payload as safetensors bytes (compact JSON, space-padded to 8)."""
    import struct

    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(hb)) + hb + payload)


SPEC_HASH_DTYPE = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def spec_payload_sha256(header: dict, payload: bytes) -> str:
    """``payload_sha256`` as formats/container.md §5 defines it, from the bytes alone (independent
    of adaptzip's own code): per tensor in name order, name, dtype and shape, then its raw bytes."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        shape = "[" + ", ".join(str(d) for d in info["shape"]) + "]"
        h.update(f"{name}\0{SPEC_HASH_DTYPE[info['dtype']]}\0{shape}\0".encode())
        b, e = info["data_offsets"]
        h.update(payload[b:e])
    return h.hexdigest()


def rewrite_container(src, dst, edit_tensors=None, edit_manifest=None, rehash=False):
    """Copy a container, changing tensors and/or the manifest; ``rehash``: recompute the payload hash
    (an edit made by someone who knows the format)."""
    with safe_open(src, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    manifest = json.loads(meta["adaptzip"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_manifest:
        edit_manifest(manifest)
    if rehash:
        manifest["payload_sha256"] = payload_sha256(tensors)
    save_file(tensors, dst, metadata={"adaptzip": json.dumps(manifest)})
    return dst
