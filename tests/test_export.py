"""Round trips: lora repack, svd, PEFT loads, vLLM layout, dense ΔW, merged model."""

import json
import shutil

import pytest
import torch
from fixtures import load_base, random_ids, train_bert_classifier
from peft import PeftModel
from safetensors.torch import load_file, save_file

import adaptzip
from adaptzip import linalg
from adaptzip.errors import BaseModelError, ExportError, OptionError
from adaptzip.options import FitOptions

VARIANTS = {
    "plain": {},
    "fp16": {"dtype": torch.float16},
    "patterns": {"use_rslora": True, "lora_alpha": 12, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"o_proj": 3}},
    "carry": {"target_modules": ["q_proj", "v_proj"], "modules_to_save": ["lm_head"], "lora_bias": True},
    "dora_emb": {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_dora": True},
}


def _adapter(make_lora, variant):
    return make_lora(f"exp_{variant}", steps=4, **VARIANTS[variant])


@torch.no_grad()
def peft_logits(base_dir, lora_dir, ids):
    pm = PeftModel.from_pretrained(load_base(base_dir), lora_dir).eval()
    return pm(input_ids=ids).logits


def assert_merged_matches(merged, base_dir, lora_dir):
    """The merged model's logits equal PEFT's base + LoRA."""
    from transformers import AutoModelForCausalLM

    mm = AutoModelForCausalLM.from_pretrained(merged, torch_dtype=torch.float32).eval()
    ids = random_ids()
    with torch.no_grad():
        got = mm(input_ids=ids).logits
    torch.testing.assert_close(got, peft_logits(base_dir, lora_dir, ids), rtol=1e-4, atol=1e-4)


def dense_deltas(lora_dir) -> dict[str, torch.Tensor]:
    ad = adaptzip.load_adapter(lora_dir)
    return {m.name: (B @ A) for m, B, A in ad.iter_factors()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_lora_repack_is_exact(make_lora, llama_base, tmp_path, variant):
    src = _adapter(make_lora, variant)
    c = tmp_path / "c.safetensors"
    adaptzip.compress(src, c, to="lora")
    adaptzip.verify(c)
    out = tmp_path / "out"
    adaptzip.expand(c, out)
    a, b = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (
        json.loads((src / "adapter_config.json").read_text()),
        json.loads((out / "adapter_config.json").read_text()),
    )
    for k in (
        "r",
        "lora_alpha",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "use_dora",
        "modules_to_save",
        "lora_bias",
    ):
        assert ca.get(k) == cb.get(k), k
    # the expanded config names exactly the modules it carries (PEFT then adapts those and no other)
    assert cb["target_modules"] == [m.name for m in adaptzip.load_adapter(src).modules]
    ids = random_ids()
    assert torch.equal(peft_logits(llama_base, src, ids), peft_logits(llama_base, out, ids))


@pytest.mark.parametrize("variant", ["plain", "patterns", "carry", "dora_emb"])
def test_svd_full_rank_same_delta_and_outputs(make_lora, llama_base, tmp_path, variant):
    src = _adapter(make_lora, variant)
    c = tmp_path / "c.safetensors"
    res = adaptzip.compress(src, c, to="svd", rank=8, fitting=FitOptions(dtype="fp32"))  # the source's rank
    assert res.rel_error < 1e-5
    out = tmp_path / "out"
    adaptzip.expand(c, out)
    d0, d1 = dense_deltas(src), dense_deltas(out)
    assert d0.keys() == d1.keys()
    for k in d0:
        assert float((d0[k] - d1[k]).norm() / d0[k].norm()) < 1e-5, k
    ids = random_ids()
    torch.testing.assert_close(
        peft_logits(llama_base, out, ids), peft_logits(llama_base, src, ids), rtol=1e-4, atol=1e-5
    )


def test_expanded_equals_hand_applied_delta(lora_fp32, llama_base, tmp_path):
    """The PEFT load of a lossy container gives exactly base + ΔŴ applied by hand."""
    c = tmp_path / "c.safetensors"
    adaptzip.compress(lora_fp32, c, to="svd", rank=2)
    out = tmp_path / "out"
    adaptzip.expand(c, out, dtype="fp32")
    form = adaptzip.open_container(c).form()
    model = load_base(llama_base)
    sd = model.state_dict()
    with torch.no_grad():
        for i, m in enumerate(form.modules_info):
            B, A = form.factors(i)
            sd[m.name + ".weight"] += B @ A
    model.load_state_dict(sd)
    ids = random_ids()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch.testing.assert_close(peft_logits(llama_base, out, ids), ref, rtol=1e-4, atol=1e-5)


def test_budget_never_exceeded_and_beats_uniform(lora_fp32, tmp_path):
    from adaptzip import fit
    from adaptzip.forms import FitContext, get_form

    ad = adaptzip.load_adapter(lora_fp32)
    svd, ctx = get_form("svd"), FitContext()
    for rank in (1, 2, 4):  # at the payload of a uniform rank-k cut, global allocation fits better
        uni = svd.fit(ad, svd.Config(rank=rank), ctx)
        payload = uni.float_params() * 4
        cfg = svd.config_for_budget(ad, svd.Config(), payload, 4, ctx)
        alloc = svd.fit(ad, cfg, ctx)
        assert alloc.float_params() <= uni.float_params()
        assert fit.evaluate(alloc, ad, ctx).rel_error < fit.evaluate(uni, ad, ctx).rel_error
    with pytest.raises(OptionError, match="below the container's fixed overhead"):
        adaptzip.compress(lora_fp32, tmp_path / "tiny.safetensors", to="svd", budget=0.02)
    assert not (tmp_path / "tiny.safetensors").exists()
    fracs = (0.12, 0.2, 0.25, 0.5)
    for frac in fracs:  # the whole file fits, and little of the budget is left unused
        r = adaptzip.compress(
            lora_fp32, tmp_path / f"f{frac}.safetensors", to="svd", budget=frac, fitting=FitOptions(baseline=False)
        )
        assert (tmp_path / f"f{frac}.safetensors").stat().st_size == r.bytes <= frac * ad.bytes
        assert r.bytes > frac * ad.bytes - 2 * 4 * (96 + 64) - 512
    errs = [adaptzip.open_container(tmp_path / f"f{f}.safetensors").manifest["metrics"]["rel_error"] for f in fracs]
    assert errs == sorted(errs, reverse=True)  # more bytes never fits worse


def test_dense_export(make_lora, gpt2_base, lora_fp32, tmp_path):
    for src in (
        lora_fp32,
        make_lora("gpt2x", base=gpt2_base, steps=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
    ):
        c = tmp_path / f"{src.name}.safetensors"
        adaptzip.compress(src, c, to="lora")
        d = tmp_path / f"{src.name}.delta.safetensors"
        res = adaptzip.expand(c, d, to="dense")
        dense = load_file(d)
        ad = adaptzip.load_adapter(src)
        assert res["tensors"] == len(ad.modules) == len(dense)
        for m, B, A in ad.iter_factors():
            want = (B @ A).T if m.fan_in_fan_out else B @ A
            assert torch.allclose(dense[m.name + ".weight"], want, atol=1e-6), m.name
        if "gpt2" in src.name:  # Conv1D weights are (in, out): the dense ΔW must match their shape
            base_sd = load_base(gpt2_base).state_dict()
            for k, v in dense.items():
                assert v.shape == base_sd[k].shape, k


@pytest.mark.parametrize("variant", ["plain", "patterns", "dora_emb"])
def test_merged_equals_peft(make_lora, llama_base, tmp_path, variant):
    src = _adapter(make_lora, variant)
    c = tmp_path / "c.safetensors"
    adaptzip.compress(src, c, to="svd", rank=3, fitting=FitOptions(dtype="fp32"))
    out = tmp_path / "peft"
    adaptzip.expand(c, out)
    if variant == "dora_emb":  # DoRA on an embedding cannot be merged by us: refused clearly
        with pytest.raises(ExportError, match="embedding"):
            adaptzip.expand(c, tmp_path / "merged", to="merged", base_model=llama_base)
        return
    merged = tmp_path / "merged"
    adaptzip.expand(c, merged, to="merged", base_model=llama_base)
    assert_merged_matches(merged, llama_base, out)


def test_merged_dora_and_gpt2(make_lora, llama_base, gpt2_base, tmp_path):
    cases = [
        (llama_base, make_lora("dora_lin", steps=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
        (
            gpt2_base,
            make_lora("gpt2m", base=gpt2_base, steps=3, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
        ),
    ]
    for base, src in cases:
        c = tmp_path / f"{src.name}.safetensors"
        adaptzip.compress(src, c, to="lora")
        merged = tmp_path / f"{src.name}.merged"
        adaptzip.expand(c, merged, to="merged", base_model=base)
        assert_merged_matches(merged, base, src)


def test_merged_refuses_bias_without_base_bias(make_lora, llama_base, tmp_path):
    src = _adapter(make_lora, "carry")
    c = tmp_path / "c.safetensors"
    adaptzip.compress(src, c, to="lora")
    with pytest.raises(BaseModelError, match="no bias"):
        adaptzip.expand(c, tmp_path / "m", to="merged", base_model=llama_base)
    assert not (tmp_path / "m").exists()


def test_vllm_layout(make_lora, lora_fp32, tmp_path):
    c = tmp_path / "c.safetensors"
    adaptzip.compress(lora_fp32, c, to="svd", budget=0.3)
    ranks = adaptzip.open_container(c).manifest["state"]["ranks"]
    out = tmp_path / "v"
    res = adaptzip.expand(c, out, target="vllm")
    cfg = json.loads((out / "adapter_config.json").read_text())
    R = max(ranks)
    assert cfg["r"] == R == res["r"] and cfg["lora_alpha"] == R and cfg["use_rslora"] is False
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    sd = load_file(out / "adapter_model.safetensors")
    assert all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in sd)
    assert all(v.shape[0 if k.endswith("lora_A.weight") else 1] == R for k, v in sd.items())
    form = adaptzip.open_container(c).form()
    d0 = dense_deltas(out)
    for i, m in enumerate(form.modules_info):
        B, A = form.factors(i)
        assert torch.allclose(d0[m.name], B @ A, atol=1e-6), m.name
    # a max rank below the form's rank is re-factored by SVD, with its error reported
    full = tmp_path / "full.safetensors"
    adaptzip.compress(lora_fp32, full, to="lora")
    res = adaptzip.expand(full, tmp_path / "v1", target="vllm", max_lora_rank=1)
    assert res["r"] == 1 and len(res["refactored"]) == 21 and all(0 < e < 1 for e in res["refactored"].values())
    with pytest.raises(ExportError, match="max-lora-rank 7"):
        adaptzip.expand(full, tmp_path / "v7", target="vllm", max_lora_rank=7)
    dora = tmp_path / "dora.safetensors"
    adaptzip.compress(_adapter(make_lora, "dora_emb"), dora, to="lora")
    with pytest.raises(ExportError, match="DoRA"):
        adaptzip.expand(dora, tmp_path / "vd", target="vllm")
    assert not (tmp_path / "vd").exists()


def test_determinism(lora_fp32, tmp_path):
    for form, kw, dtype in (("svd", {"budget": 0.25}, None), ("lora", {}, "fp16")):
        a = adaptzip.compress(
            lora_fp32, tmp_path / f"{form}1.safetensors", to=form, fitting=FitOptions(dtype=dtype, seed=3), **kw
        )
        b = adaptzip.compress(
            lora_fp32, tmp_path / f"{form}2.safetensors", to=form, fitting=FitOptions(dtype=dtype, seed=3), **kw
        )
        assert (tmp_path / f"{form}1.safetensors").read_bytes() == (tmp_path / f"{form}2.safetensors").read_bytes()
        assert a.bytes == b.bytes


def test_factored_svd_weighted_is_optimal(lora_fp32):
    """Weighted truncation beats the plain one in the Σ-norm (and matches a dense reference)."""
    ad = adaptzip.load_adapter(lora_fp32)
    m, B, A = next(ad.iter_factors())
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, m.in_features, generator=g) * torch.linspace(0.1, 3, m.in_features)
    Sigma = X.T @ X / 500
    L = torch.linalg.cholesky(Sigma.double() + 1e-6 * Sigma.diagonal().mean().double() * torch.eye(m.in_features))
    sw, sp = linalg.factored_svd(B, A, Sigma), linalg.factored_svd(B, A)
    for k in (1, 2, 4):
        e_w = float(linalg.sq_error(B, A, *sw.truncate(k), Sigma))
        e_p = float(linalg.sq_error(B, A, *sp.truncate(k), Sigma))
        assert e_w < e_p
        dense = torch.linalg.svdvals(B.double() @ A.double() @ L)
        assert e_w == pytest.approx(float((dense[k:] ** 2).sum()), rel=1e-3)


# ----------------------------------------------------------------------------- every update reaches PEFT
def peft_updates(pm) -> dict[str, torch.Tensor]:
    """scaling · B @ A (float64) of every LoRA layer PEFT built, by module name."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, mod in pm.base_model.model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in mod.scaling:
            if "default" in mod.lora_A:
                B, A = mod.lora_B["default"].weight, mod.lora_A["default"].weight
            else:
                B, A = mod.lora_embedding_B["default"], mod.lora_embedding_A["default"]
            out[name] = (B.detach().double() @ A.detach().double()) * mod.scaling["default"]
    return out


def load_checked(base_dir, lora_dir):
    """PeftModel.from_pretrained, plus PEFT's own load result of the same directory (a second
    adapter): its missing and unexpected keys, and the warnings the load gave."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(load_base(base_dir), lora_dir)
        res = pm.load_adapter(lora_dir, adapter_name="again")
    said = [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    return pm, res, said


@pytest.fixture(scope="module")
def peft_sources(make_lora, llama_base, gpt2_base, tmp_path_factory):
    """Real PEFT adapters of several kinds, with the base each belongs to."""
    mism_src = make_lora("pl_mism_src", steps=3, target_modules=["q_proj", "v_proj", "gate_proj"])
    mism = tmp_path_factory.mktemp("mism") / "mismatched"
    shutil.copytree(mism_src, mism)
    cfg = json.loads((mism / "adapter_config.json").read_text())
    (mism / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["k_proj", "o_proj"]}))
    return {
        "all_linear": (llama_base, make_lora("pl_all", steps=3)),
        "q_v": (llama_base, make_lora("pl_qv", steps=3, target_modules=["q_proj", "v_proj"])),
        "gpt2_conv1d": (gpt2_base, make_lora("pl_gpt2", base=gpt2_base, steps=3, fan_in_fan_out=True)),
        "embedding": (llama_base, make_lora("pl_emb", steps=3, target_modules=["q_proj", "embed_tokens"])),
        "mismatched_config": (llama_base, mism),
        "patterns": (llama_base, _adapter(make_lora, "patterns")),
    }


MODULES = {"all_linear": 21, "q_v": 6, "gpt2_conv1d": 8, "embedding": 4, "mismatched_config": 9, "patterns": 21}


@pytest.mark.parametrize("case", list(MODULES))
def test_every_update_reaches_peft(peft_sources, tmp_path, case):
    """svd at the source's rank (lossless), expanded, loaded by PEFT: no missing or unexpected key,
    and every module's scaling · B @ A equals the source's update, including an adapter whose
    adapter_config.json names other modules than its tensors (PEFT loading the source itself drops
    those updates)."""
    base, src = peft_sources[case]
    ad = adaptzip.load_adapter(src)
    want = {m.name: (B.double() @ A.double()) for m, B, A in ad.iter_factors()}
    assert len(want) == MODULES[case]
    c = tmp_path / "c.safetensors"
    res = adaptzip.compress(src, c, to="svd", rank=max(m.rank for m in ad.modules), fitting=FitOptions(dtype="fp32"))
    assert res.rel_error < 1e-6
    out = tmp_path / "peft"
    adaptzip.expand(c, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["target_modules"] == list(want) and cfg["layers_to_transform"] is None
    pm, load, said = load_checked(base, out)
    assert load.unexpected_keys == [] and load.missing_keys == [] and said == [], (load, said)
    got = peft_updates(pm)
    assert sorted(got) == sorted(want)
    errs = {n: float((got[n] - want[n]).norm() / want[n].norm()) for n in want}
    assert max(errs.values()) < 1e-6, errs
    if case == "mismatched_config":  # the source itself: PEFT adapts k/o, and q/v/gate are dropped unsaid
        assert adaptzip.load_adapter(src).config_mismatch["in_config_not_in_tensors"] == ["k_proj", "o_proj"]
        pm_src, load_src, _ = load_checked(base, src)
        assert len(load_src.unexpected_keys) == 2 * 9  # lora_A and lora_B of every module with tensors
        assert not set(peft_updates(pm_src)) & set(want)


def test_merged_onto_another_width_names_the_base_file(lora_fp32, tmp_path):
    from clihelp import run_cli
    from fixtures import make_base

    wide = make_base(tmp_path / "wide", hidden=128)
    c = tmp_path / "c.safetensors"
    adaptzip.compress(lora_fp32, c, to="lora")
    cause = (
        "module model.layers.0.mlp.down_proj: its update is [64, 96] but the base weight "
        "model.layers.0.mlp.down_proj.weight is [128, 96] (a base model of another size than the adapter's?)"
    )
    with pytest.raises(BaseModelError) as e:
        adaptzip.expand(c, tmp_path / "merged", to="merged", base_model=wide)
    assert (e.value.path, e.value.cause) == (str(wide / "model.safetensors"), cause)
    code, out, err = run_cli("expand", c, "--to", "merged", "--base-model", wide, "-o", tmp_path / "m2")
    assert (code, out, err) == (2, "", f"adaptzip: error: {wide / 'model.safetensors'}: {cause}\n")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "m2").exists()


def test_merged_keeps_every_update_next_to_the_tensors_peft_saves(make_lora, llama_base, gpt2_base, tmp_path):
    """PEFT saves some tensors of the layers it adapts: the base weight of an adapted embedding
    (``…embed_tokens.base_layer.weight``) and, with bias="all"/"lora_only", every trained bias
    (``…c_attn.base_layer.bias``). The merged model takes those tensors AND adds ΔW on top."""
    emb = make_lora("emb_head", steps=4, target_modules=["q_proj", "embed_tokens", "lm_head"])
    keys = load_file(emb / "adapter_model.safetensors")
    assert any(k.endswith("embed_tokens.base_layer.weight") for k in keys)  # the premise
    bias = make_lora("gpt2bias", base=gpt2_base, steps=3, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    assert any(k.endswith("c_attn.base_layer.bias") for k in load_file(bias / "adapter_model.safetensors"))
    for base, src in ((llama_base, emb), (gpt2_base, bias)):
        c = tmp_path / f"{src.name}.safetensors"
        adaptzip.compress(src, c, to="lora")
        merged = tmp_path / f"{src.name}.merged"
        adaptzip.expand(c, merged, to="merged", base_model=base)
        assert_merged_matches(merged, base, src)


RUNTIME = {  # PEFT features under which an adapter is more than W x + ΔW x on every token
    "aLoRA": {"alora_invocation_tokens": [5, 6], "task_type": "CAUSAL_LM"},
    "trainable tokens": {"trainable_token_indices": [3, 5, 7]},
    "layer replication": {"layer_replication": [[0, 2], [1, 3]]},
}


@pytest.mark.parametrize("feature", list(RUNTIME))
def test_peft_features_beyond_plain_lora_stay_with_peft_and_are_refused_elsewhere(
    feature, make_lora, llama_base, tmp_path
):
    """--to peft keeps the feature (PEFT applies it as before, logits equal); dense, merged,
    peft-native and vLLM cannot express it and refuse it, writing nothing."""
    made = make_lora(
        f"rt_{feature.replace(' ', '_')}", steps=3, target_modules=["q_proj", "v_proj"], **RUNTIME[feature]
    )
    src = tmp_path / "src"  # B set (an aLoRA trained on text without its invocation keeps B = 0)
    shutil.copytree(made, src)
    g = torch.Generator().manual_seed(0)
    t = load_file(src / "adapter_model.safetensors")
    t = {k: torch.randn(v.shape, generator=g) * 0.1 if ".lora_B." in k else v for k, v in t.items()}
    save_file(t, src / "adapter_model.safetensors")
    c, s = tmp_path / "c.safetensors", tmp_path / "s.safetensors"
    adaptzip.compress(src, c, to="lora")
    adaptzip.compress(src, s, to="bslora-ke", budget=0.9, fitting=FitOptions(steps=5, baseline=False))
    ids = random_ids()
    ids[:, 4:6] = torch.tensor([5, 6])  # aLoRA's invocation: its update applies from there on
    adaptzip.expand(c, tmp_path / "peft")
    with torch.no_grad():
        base_logits = load_base(llama_base)(input_ids=ids).logits
    want = peft_logits(llama_base, src, ids)
    assert float((want - base_logits).abs().max()) > 1e-3  # the feature's adapter does change the output
    torch.testing.assert_close(peft_logits(llama_base, tmp_path / "peft", ids), want, rtol=0, atol=1e-5)
    for to, cont, kw in (
        ("dense", c, {}),
        ("merged", c, {"base_model": llama_base}),
        ("peft-native", s, {}),
        ("peft", c, {"target": "vllm"}),
    ):
        out = tmp_path / f"{to}-{kw.get('target', '')}"
        with pytest.raises(ExportError, match=feature):
            adaptzip.expand(cont, out, to=to, **kw)
        assert not out.exists()


def test_merged_classifier_with_bias_all_uses_the_trained_head(tmp_path):
    """bias="all" on a sequence classifier: PEFT saves the head three times (its trained
    modules_to_save copy, the original module's bias, a plain copy), all naming the base's
    ``classifier.bias``. The merged model takes the copy PEFT runs with, and equals PEFT."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    train_bert_classifier(
        tmp_path / "base",
        tmp_path / "lora",
        steps=5,
        lr=3e-2,
        seq=16,
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        bias="all",
    )
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert sum(k.endswith("classifier.modules_to_save.bias") or k.endswith("original_module.bias") for k in keys) == 2
    c = tmp_path / "c.safetensors"
    adaptzip.compress(tmp_path / "lora", c, to="lora")
    adaptzip.expand(c, tmp_path / "merged", to="merged", base_model=tmp_path / "base")
    ids = random_ids()
    with torch.no_grad():
        got = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(input_ids=ids).logits
        base = BertForSequenceClassification.from_pretrained(tmp_path / "base").eval()
        want = PeftModel.from_pretrained(base, tmp_path / "lora").eval()(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
