"""Reading PEFT LoRA directories: dtypes, patterns, rsLoRA, Conv1D, carried tensors, .bin."""

import fractions
import json
import shutil

import pytest
import torch
from fixtures import load_base
from peft import PeftModel
from safetensors.torch import load_file

import adaptzip
from adaptzip import linalg
from adaptzip.adapter import split_layer
from adaptzip.errors import AdapterError, UnsupportedAdapter


def peft_scalings(base_dir, lora_dir) -> dict[str, float]:
    """The scaling PEFT itself gives each module (the ground truth for our reader)."""
    pm = PeftModel.from_pretrained(load_base(base_dir), lora_dir)
    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling:
            out[name] = float(mod.scaling["default"])
    return out


def test_reads_modules_layers_types(lora_fp32):
    ad = adaptzip.load_adapter(lora_fp32)
    assert len(ad.modules) == 3 * 7
    q0 = ad.module("model.layers.0.self_attn.q_proj")
    assert (q0.layer, q0.type, q0.in_features, q0.out_features, q0.rank) == (0, "self_attn.q_proj", 64, 64, 8)
    k2 = ad.module("model.layers.2.self_attn.k_proj")
    assert (k2.in_features, k2.out_features) == (64, 32)  # GQA-narrow
    d1 = ad.module("model.layers.1.mlp.down_proj")
    assert (d1.in_features, d1.out_features) == (96, 64)
    assert q0.scale == pytest.approx(16 / 8)
    assert ad.n_params == sum(m.rank * (m.in_features + m.out_features) for m in ad.modules)
    assert ad.bytes == (lora_fp32 / "adapter_model.safetensors").stat().st_size
    B, A = ad.factors(q0)
    raw = load_file(lora_fp32 / "adapter_model.safetensors")
    assert torch.equal(A, raw["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
    assert torch.allclose(B, 2.0 * raw["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert float(B.abs().max()) > 0  # trained, B != 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(make_lora, dtype):
    d = make_lora(f"lora_{dtype}", dtype=dtype, steps=3)
    ad = adaptzip.load_adapter(d)
    assert ad.dtype == dtype
    B, A = ad.factors(ad.modules[0])
    assert B.dtype == torch.float32 and A.dtype == torch.float32


def test_patterns_and_rslora_match_peft(llama_base, make_lora):
    d = make_lora(
        "patterns",
        steps=3,
        use_rslora=True,
        r=8,
        lora_alpha=12,
        rank_pattern={"v_proj": 4, "layers.1.mlp.up_proj": 2},
        alpha_pattern={"o_proj": 3, "down_proj": 20},
    )
    ad = adaptzip.load_adapter(d)
    truth = peft_scalings(llama_base, d)
    assert len(truth) == len(ad.modules)
    for m in ad.modules:
        assert m.scale == pytest.approx(truth[m.name], rel=1e-12), m.name
    assert ad.module("model.layers.0.self_attn.v_proj").rank == 4
    assert ad.module("model.layers.1.mlp.up_proj").rank == 2
    assert ad.module("model.layers.0.mlp.up_proj").rank == 8
    assert ad.module("model.layers.2.mlp.down_proj").scale == pytest.approx(20 / 8**0.5)


def test_gpt2_conv1d_fan_in_fan_out(gpt2_base, make_lora):
    d = make_lora("gpt2", base=gpt2_base, steps=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ad = adaptzip.load_adapter(d)
    m = ad.module("transformer.h.0.attn.c_attn")
    assert m.fan_in_fan_out and m.dense_transposed
    assert (m.in_features, m.out_features, m.layer, m.type) == (64, 192, 0, "attn.c_attn")


def test_carried_tensors_roles(make_lora):
    d = make_lora("carry", steps=3, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_bias=True)
    ad = adaptzip.load_adapter(d)
    roles = {c.role for c in ad.carried}
    assert roles == {"modules_to_save", "lora_bias"}
    bias = [c for c in ad.carried if c.role == "lora_bias"]
    assert len(bias) == 6 and all(c.module for c in bias)


def test_dora_and_embedding(make_lora):
    d = make_lora("dora_emb", steps=3, target_modules=["q_proj", "embed_tokens"], use_dora=True)
    ad = adaptzip.load_adapter(d)
    emb = ad.module("model.embed_tokens")
    assert emb.kind == "embedding" and (emb.in_features, emb.out_features) == (128, 64) and emb.dense_transposed
    roles = sorted({c.role for c in ad.carried})
    assert roles == ["dora_magnitude", "embedding_base"]


def test_bin_weights_and_refusal(lora_fp32, tmp_path):
    d = tmp_path / "binlora"
    d.mkdir()
    shutil.copy(lora_fp32 / "adapter_config.json", d)
    torch.save(load_file(lora_fp32 / "adapter_model.safetensors"), d / "adapter_model.bin")
    ad = adaptzip.load_adapter(d)
    ref = adaptzip.load_adapter(lora_fp32)
    assert ad.weights_file.name == "adapter_model.bin"
    for m in ref.modules:
        assert torch.equal(ad.factors(m.name)[0], ref.factors(m)[0])
    # a pickle that needs more than weights_only is refused
    bad = tmp_path / "evil"
    bad.mkdir()
    shutil.copy(lora_fp32 / "adapter_config.json", bad)
    torch.save({"x": fractions.Fraction(1, 3)}, bad / "adapter_model.bin")  # not allowed by weights_only
    with pytest.raises(UnsupportedAdapter, match="weights_only"):
        adaptzip.load_adapter(bad)


@pytest.mark.parametrize(
    "name,expect",
    [
        ("model.layers.3.self_attn.q_proj", ("model.layers", 3, "self_attn.q_proj")),
        ("transformer.h.11.attn.c_attn", ("transformer.h", 11, "attn.c_attn")),
        ("bert.encoder.layer.5.attention.self.query", ("bert.encoder.layer", 5, "attention.self.query")),
        ("encoder.block.2.layer.0.SelfAttention.q", ("encoder.block", 2, "layer.0.SelfAttention.q")),
        ("lm_head", (None, None, "lm_head")),
    ],
)
def test_split_layer(name, expect):
    assert split_layer(name) == expect


def test_bad_inputs(lora_fp32, tmp_path):
    with pytest.raises(AdapterError, match="no such directory"):
        adaptzip.load_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        adaptzip.load_adapter(tmp_path / "empty")
    d = tmp_path / "vb"
    shutil.copytree(lora_fp32, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "VBLORA"}))
    with pytest.raises(UnsupportedAdapter, match="peft_type 'VBLORA'"):
        adaptzip.load_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    with pytest.raises(AdapterError, match="tensors have rank 8 but adapter_config.json says r=4"):
        adaptzip.load_adapter(d)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="invalid JSON"):
        adaptzip.load_adapter(d)
    # corrupt and truncated weights
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    data = (lora_fp32 / "adapter_model.safetensors").read_bytes()
    (d / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated"):
        adaptzip.load_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(AdapterError, match="corrupt safetensors"):
        adaptzip.load_adapter(d)


def test_spectrum_without_dense(lora_fp32):
    ad = adaptzip.load_adapter(lora_fp32)
    for _, B, A in list(ad.iter_factors())[:4]:
        s = linalg.factored_svd(B, A)
        dense = torch.linalg.svdvals((B @ A).double())
        assert torch.allclose(s.S.double(), dense[: s.S.numel()], rtol=1e-5, atol=1e-7)
    info = adaptzip.inspect(lora_fp32)
    m0 = info["modules"][0]
    assert 1.0 <= m0["effective_rank"] <= 8.0
    assert 0 < m0["energy_top"]["1"] <= m0["energy_top"]["4"] <= m0["energy_top"]["8"] == pytest.approx(1.0)
