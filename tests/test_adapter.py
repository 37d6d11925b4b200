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


def _hand_adapter(path, a, b, **config):
    """One module (``model.layers.0.self_attn.q_proj``) with factors ``a``, ``b`` written by hand."""
    from fixtures import lora_key, write_adapter

    name = "model.layers.0.self_attn.q_proj"
    return write_adapter(
        path,
        {lora_key(name, "A"): a, lora_key(name, "B"): b},
        {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], **config},
    )


def test_refuses_integer_factors(tmp_path):
    g = torch.Generator().manual_seed(0)
    d = _hand_adapter(
        tmp_path / "i32", torch.randint(-3, 3, (2, 16), dtype=torch.int32, generator=g), torch.randn(8, 2)
    )
    with pytest.raises(
        AdapterError,
        match=r"adapter_model\.safetensors: tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight "
        r"has dtype I32: LoRA factors must be floating point \(F32, F16, BF16\)$",
    ):
        adaptzip.load_adapter(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_non_finite_factors(tmp_path, bad):
    """A NaN/Inf in a factor is named when read (it used to surface as a LinAlgError in the fit)."""
    from clihelp import run_cli

    b = torch.randn(8, 2)
    b[3, 1] = bad
    d = _hand_adapter(tmp_path / "nan", torch.randn(2, 16), b)
    ad = adaptzip.load_adapter(d)  # the header is fine: values are checked when first read
    cause = (
        r"tensor base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_B\.weight holds non-finite values "
        r"\(NaN or Inf\)"
    )
    with pytest.raises(AdapterError, match=cause):
        ad.factors(ad.modules[0])
    with pytest.raises(AdapterError, match=cause):
        adaptzip.compress(d, tmp_path / "c.safetensors", to="svd", rank=1)
    with pytest.raises(AdapterError, match=cause):
        adaptzip.inspect(d)
    code, out, err = run_cli("compress", d, "--to", "svd", "--rank", "1", "-o", tmp_path / "cli.safetensors")
    assert (code, out) == (2, "")
    assert err == f"adaptzip: error: {d / 'adapter_model.safetensors'}: " + cause.replace("\\", "") + "\n"
    assert not (tmp_path / "c.safetensors").exists() and not (tmp_path / "cli.safetensors").exists()


def test_refuses_rank_zero(tmp_path):
    """A rank-0 module carries no update; it is refused with its name (it used to divide by zero)."""
    d = _hand_adapter(tmp_path / "r0", torch.zeros(0, 16), torch.zeros(8, 0), r=0)
    cause = r"module model\.layers\.0\.self_attn\.q_proj has rank 0 \(.*lora_A\.weight is \[0, 16\]\): a rank-0 module carries no update"
    for call in (adaptzip.load_adapter, adaptzip.inspect):
        with pytest.raises(AdapterError, match=cause):
            call(d)


def test_refuses_bad_patterns(lora_fp32, tmp_path):
    d = tmp_path / "pat"
    shutil.copytree(lora_fp32, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj(": 4}}))
    with pytest.raises(
        AdapterError, match=r"adapter_config\.json: rank_pattern key 'q_proj\(' is not a valid regular expression"
    ):
        adaptzip.load_adapter(d)
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "alpha_pattern": {"q_proj": "8"}}))
    with pytest.raises(AdapterError, match=r"alpha_pattern\['q_proj'\] must be a number, got '8'"):
        adaptzip.load_adapter(d)


def test_config_mismatch_reported(make_lora, tmp_path):
    """Tensors of q/v/gate under a config that says k_proj/o_proj: PEFT would drop those updates.
    ``inspect`` (and the adapter's summary) say which modules and which config entries disagree."""
    src = make_lora("mism_src", steps=3, target_modules=["q_proj", "v_proj", "gate_proj"])
    d = tmp_path / "mism"
    shutil.copytree(src, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["k_proj", "o_proj", "v_proj"]}))
    ad = adaptzip.load_adapter(d)
    mm = ad.config_mismatch
    assert mm["in_config_not_in_tensors"] == ["k_proj", "o_proj"]
    assert mm["in_tensors_not_in_config"] == [
        f"model.layers.{i}.{t}" for i in range(3) for t in ("mlp.gate_proj", "self_attn.q_proj")
    ]
    assert mm["message"] == (
        "adapter_config.json disagrees with the weights: 6 of 9 modules with LoRA tensors (mlp.gate_proj, "
        "self_attn.q_proj) are not in its target_modules: PEFT loading this adapter drops their update; "
        "target_modules k_proj, o_proj match no module with LoRA tensors"
    )
    info = adaptzip.inspect(d)
    assert info["config_mismatch"] == mm
    assert adaptzip.load_adapter(src).config_mismatch is None and adaptzip.inspect(src)["config_mismatch"] is None
    # PEFT's other selectors count too: a regex, layers_to_transform, exclude_modules
    for extra, dropped in (
        ({"target_modules": r".*\.(q_proj|v_proj)"}, 3),
        ({"target_modules": ["q_proj", "v_proj", "gate_proj"], "layers_to_transform": [0, 2]}, 3),
        (
            {
                "target_modules": ["q_proj", "v_proj", "gate_proj"],
                "exclude_modules": ["model.layers.1.self_attn.q_proj"],
            },
            1,
        ),
    ):
        (d / "adapter_config.json").write_text(json.dumps({**cfg, **extra}))
        got = adaptzip.load_adapter(d).config_mismatch
        assert len(got["in_tensors_not_in_config"]) == dropped and got["in_config_not_in_tensors"] == [], extra
    # PEFT writes all-linear with exclude_modules as every linear name, the excluded ones too:
    # those entries are excluded, not unused, and nothing is reported
    ex = make_lora("mism_exclude", steps=2, target_modules="all-linear", exclude_modules=["k_proj", "down_proj"])
    written = json.loads((ex / "adapter_config.json").read_text())["target_modules"]
    assert any(t.endswith("k_proj") for t in written)  # the premise
    assert adaptzip.load_adapter(ex).config_mismatch is None


def test_symlink_loops_are_named(lora_fp32, tmp_path):
    import os

    os.symlink("loop", tmp_path / "loop")
    with pytest.raises(AdapterError, match=r"/loop: is a symbolic link that loops back on itself$"):
        adaptzip.load_adapter(tmp_path / "loop")
    d = tmp_path / "ad"
    shutil.copytree(lora_fp32, d)
    (d / "adapter_model.safetensors").unlink()
    os.symlink("adapter_model.safetensors", d / "adapter_model.safetensors")
    with pytest.raises(
        AdapterError, match=r"ad/adapter_model\.safetensors: is a symbolic link that loops back on itself$"
    ):
        adaptzip.inspect(d)
    (d / "adapter_model.safetensors").unlink()
    os.symlink("gone.safetensors", d / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=r"ad/adapter_model\.safetensors: is a symbolic link to a missing target$"):
        adaptzip.load_adapter(d)
