"""VB-LoRA form: storage (uint8 indices, fp16 weights, bytes formula), fit quality vs a random
start, soft/hard errors, budget, PEFT-native export (loads with PeftModel and equals our expand),
lossless expand, determinism, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from clihelp import RESULT_KEYS, run_cli, run_json
from safetensors import safe_open

import adaptzip
from adaptzip import api, fit
from adaptzip.adapter import ModuleInfo, load_adapter
from adaptzip.container import open_container
from adaptzip.errors import ExportError, OptionError
from adaptzip.forms import FitContext, make_config
from adaptzip.forms.vblora import VbloraForm, _Batched, resolve_vector_len, stored_bytes
from adaptzip.options import FitOptions

# b = 16 divides every dimension of the tiny Llama (64, 96, 32); a short fit keeps the file fast.
OPTS = ["--vector-len", "16", "--bank", "256", "--topk", "2", "--opt", "steps=30", "--opt", "refit_steps=30"]
CFG = {"vector_len": 16, "bank": 256, "topk": 2, "steps": 30, "refit_steps": 30}


def _compress_cli(lora: Path, cwd: Path, monkeypatch) -> dict:
    monkeypatch.chdir(cwd)  # the same relative output (and so the same recorded command) in both directories
    return run_json("compress", lora, "-o", "c.safetensors", "--to", "vblora", *OPTS)


@pytest.fixture(scope="module")
def compressed(lora_fp32, tmp_path_factory):
    """The same compress run twice (two directories, same seed): (json, path, path2)."""
    mp = pytest.MonkeyPatch()
    try:
        d1, d2 = tmp_path_factory.mktemp("vb1"), tmp_path_factory.mktemp("vb2")
        res = _compress_cli(lora_fp32, d1, mp)
        _compress_cli(lora_fp32, d2, mp)
    finally:
        mp.undo()
    return res, d1 / "c.safetensors", d2 / "c.safetensors"


def test_cli_json_keys_and_metrics(compressed):
    d, path, _ = compressed
    assert RESULT_KEYS <= d.keys(), RESULT_KEYS - d.keys()
    assert d["form"] == "vblora" and d["bytes"] == path.stat().st_size
    assert d["ratio"] == pytest.approx(d["bytes"] / d["source_bytes"])
    # soft and final hard top-k errors are reported; the final one is the container's error
    assert 0 < d["soft_rel_error"] < 1 and 0 < d["hard_rel_error"] < 1
    assert d["hard_rel_error"] == pytest.approx(d["rel_error"], rel=1e-3)
    assert d["init_rel_error"] >= d["hard_rel_error"] - 1e-6
    assert d["worst_module_rel_error"] >= d["rel_error"] * 0.999
    assert 0 <= d["svd_baseline_rel_error"] < 1
    assert d["state"]["rank"] == 8  # default: the source's rank


def test_same_seed_byte_identical_and_verify(compressed):
    _, p1, p2 = compressed
    assert p1.read_bytes() == p2.read_bytes()
    assert api.verify(p1)["ok"]


def test_storage_dtypes_and_bytes_formula(compressed, lora_fp32):
    d, path, _ = compressed
    c = open_container(path)
    ad = adaptzip.load_adapter(lora_fp32)
    r, b, k, h = 8, 16, 2, 256
    n = sum(r * (m.in_features + m.out_features) // b for m in ad.modules)
    assert n == c.manifest["state"]["subvectors"] == 1392
    with safe_open(path, framework="pt") as f:
        assert f.get_slice("topk_indices").get_dtype() == "U8"  # h ≤ 256
        assert f.get_slice("topk_weights").get_dtype() == "F16"
        assert f.get_slice("bank").get_dtype() == "F32"  # the container dtype (source fp32)
        assert f.get_slice("topk_weights").get_shape() == [n, k - 1]
    payload = h * b * 4 + n * k * 1 + n * (k - 1) * 2
    assert payload == stored_bytes(n, h, b, k, 4) == 256 * 16 * 4 + 1392 * (2 * 1 + 1 * 2)
    with open(path, "rb") as fh:
        header = 8 + int.from_bytes(fh.read(8), "little")
    assert path.stat().st_size == header + payload  # the rest is the header (manifest)
    assert header < 16384
    assert d["stored_params"] == h * b


def test_expand_is_lossless_and_form_round_trips(compressed, lora_fp32, tmp_path):
    d, path, _ = compressed
    c = open_container(path)
    form = c.form()
    # the loaded form gives the metric the fit measured on its own form: nothing lost in storage
    ctx = FitContext()
    ad = adaptzip.load_adapter(lora_fp32)
    assert fit.evaluate(form, ad, ctx).rel_error == pytest.approx(d["rel_error"], abs=1e-9)
    # storing again is the identity (finalize is idempotent)
    stored = c.tensors(["bank", "topk_indices", "topk_weights"])
    again = form.tensors()
    assert all(torch.equal(stored[n], again[n]) for n in stored)
    # the batched objective the fit uses equals the shared one
    tg = fit.targets(ad, ctx)
    with torch.no_grad():
        want = float(fit.module_sq_errors(form, tg, torch.float64).sum()) / sum(t.norm2 for t in tg)
        assert float(_Batched(form, tg)()) == pytest.approx(want, rel=1e-4)
    # expand --to peft writes exactly the form's factors (scale 1)
    api.expand(path, tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    with safe_open(tmp_path / "peft" / "adapter_model.safetensors", framework="pt") as f:
        for i, m in enumerate(c.modules):
            B, A = form.factors(i)
            key = f"base_model.model.{m.name}"
            assert torch.equal(f.get_tensor(f"{key}.lora_A.weight"), A.detach())
            assert torch.equal(f.get_tensor(f"{key}.lora_B.weight"), B.detach())
    assert cfg["r"] == cfg["lora_alpha"] == 8 and not cfg.get("rank_pattern")


def _vblora_layers(model):
    from peft.tuners.vblora.layer import Linear

    return {n.removeprefix("base_model.model."): mod for n, mod in model.named_modules() if isinstance(mod, Linear)}


@pytest.mark.parametrize("topk_only", [True, False])
def test_peft_native_vblora_equals_our_expand(compressed, llama_base, tmp_path, topk_only):
    from fixtures import load_base, random_ids
    from peft import PeftModel

    from adaptzip.forms.vblora_peft import to_peft_vblora

    _, path, _ = compressed
    c = open_container(path)
    form = c.form()
    out = tmp_path / "vb"
    if topk_only:  # through the CLI
        info = run_json("expand", path, "--to", "peft-vblora", "-o", out)
    else:
        info = to_peft_vblora(c, out, topk_only=False)
    assert info["save_only_topk_weights"] is topk_only
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "VBLORA" and (cfg["num_vectors"], cfg["vector_length"], cfg["topk"], cfg["r"]) == (
        256,
        16,
        2,
        8,
    )
    api.expand(path, tmp_path / "lora")
    ids = random_ids()
    with torch.no_grad():
        vb = PeftModel.from_pretrained(load_base(llama_base), out).eval()
        lo = PeftModel.from_pretrained(load_base(llama_base), tmp_path / "lora").eval()
        layers = _vblora_layers(vb)
        assert len(layers) == len(c.modules) == 21
        worst = 0.0
        for i, m in enumerate(c.modules):
            B, A = form.factors(i)
            want = B @ A
            got = layers[m.name].get_delta_weight("default")
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        assert worst < 1e-5
        y_vb, y_lo = vb(input_ids=ids).logits, lo(input_ids=ids).logits
        plain = load_base(llama_base).eval()(input_ids=ids).logits
    assert float((y_vb - y_lo).abs().max()) < 1e-4
    assert float((y_lo - plain).abs().max()) > 1e-3  # the update matters


def test_fit_beats_random_start(compressed, lora_fp32):
    d, _, _ = compressed
    ad = adaptzip.load_adapter(lora_fp32)
    rnd = VbloraForm.fit(ad, make_config(VbloraForm, {**CFG, "init": "random"}), FitContext(seed=0))
    # same h, b, k, r and steps (same bytes): the k-means + convex-code start ends far lower
    assert d["hard_rel_error"] <= 0.8 * rnd.fit_info["hard_rel_error"]
    assert rnd.fit_info["init_rel_error"] > 1.0 > d["init_rel_error"]


def test_budget_picks_bank_and_reports_choice(lora_fp32, tmp_path):
    ad = adaptzip.load_adapter(lora_fp32)
    res = api.compress(
        lora_fp32,
        tmp_path / "b.safetensors",
        to="vblora",
        budget=0.15,
        fitting=FitOptions(baseline=False),
        options={"vector_len": 16, "steps": 3, "refit_steps": 3},
    )
    assert res.bytes <= int(0.15 * ad.bytes)
    ch = res.metrics["budget_choice"]
    assert res.config["bank"] == ch["bank"] and ch["rank"] == res.state["rank"] == 8
    assert ch["payload_bytes"] <= ch["budget_payload_bytes"] < ch["next_bank_payload_bytes"]
    n = res.state["subvectors"]
    assert ch["payload_bytes"] == stored_bytes(n, ch["bank"], 16, 2, 4)
    # over 256 vectors the indices become int16 (and the choice accounts for it)
    cfg = VbloraForm.config_for_budget(ad, VbloraForm.Config(vector_len=16), 20 * 16 * 4 * 100, 4, FitContext())
    assert cfg.bank > 256 and stored_bytes(n, cfg.bank, 16, 2, 4) <= 20 * 16 * 4 * 100


def test_vector_len_must_divide_every_module(lora_fp32, tmp_path):
    code, _, err = run_cli(
        "compress", lora_fp32, "-o", tmp_path / "x.safetensors", "--to", "vblora", "--vector-len", "64"
    )
    assert code == 2 and "--vector-len 64 does not divide module" in err
    # the default: the largest length ≤ 256 dividing every dimension (64 and 96 here → 32)
    ad = load_adapter(lora_fp32)
    assert VbloraForm.config_for_budget(ad, VbloraForm.Config(), 10**6, 2, FitContext()).vector_len == 32
    assert resolve_vector_len(ad.modules, VbloraForm.Config()).vector_len == 32
    assert resolve_vector_len(ad.modules, VbloraForm.Config(vector_len=16)).vector_len == 16
    big = [
        ModuleInfo(f"m{i}", None, 0, "q_proj", i_, o, 8, 8.0, 1.0)
        for i, (i_, o) in enumerate([(4096, 4096), (4096, 11008), (11008, 4096)])
    ]
    assert resolve_vector_len(big, VbloraForm.Config()).vector_len == 256  # the paper's b for Llama shapes
    odd = [ModuleInfo("m", None, 0, "q_proj", 7, 9, 1, 1.0, 1.0)]
    with pytest.raises(OptionError, match="no sub-vector length > 1"):
        resolve_vector_len(odd, VbloraForm.Config())
    with pytest.raises(OptionError, match="--vector-len 64 does not divide module") as e:
        api.compress(lora_fp32, tmp_path / "x.safetensors", to="vblora", options={"vector_len": 64})
    msg = str(e.value)
    assert msg.startswith(str(lora_fp32))  # the path, then one line
    assert "--vector-len 64 does not divide module model.layers.0.mlp.down_proj (in 96, out 64)" in msg
    assert "values that divide every module's dimensions: 32, 16, 8, 4, 2" in msg and "\n" not in msg
    assert not (tmp_path / "x.safetensors").exists()


def test_peft_vblora_refuses_other_forms(lora_fp32, tmp_path):
    api.compress(
        lora_fp32, tmp_path / "s.safetensors", to="svd", options={"rank": 2}, fitting=FitOptions(baseline=False)
    )
    with pytest.raises(ExportError, match="--to peft-vblora: not offered by form svd"):
        api.expand(tmp_path / "s.safetensors", tmp_path / "out", to="peft-vblora")
    assert not (tmp_path / "out").exists()


def test_calibration_lifecycle(compressed):
    """Live training: unfreeze (soft, all logits) keeps ΔŴ; training moves it; finalize freezes the
    top-k again and puts the weights on the stored grid (what tensors() stores)."""
    from adaptzip.quant import parameter_map

    _, path, _ = compressed
    form = open_container(path).form()
    assert parameter_map(form)["bank"][2] is form.vector_bank  # the stored bank is the parameter (QAT hooks it)
    before = [form.factors(i) for i in range(3)]
    form.unfreeze()
    assert form.soft and form.logits_A[0].shape == (8, form.modules_info[0].in_features // 16, 256)
    for i in range(3):
        B, A = form.factors(i)
        assert torch.allclose(B @ A, before[i][0] @ before[i][1], atol=1e-6)
    groups = form.trainable_groups()
    assert groups[0]["params"] == [form.vector_bank] and 0 < groups[0]["lr_scale"] < 1  # bank lr relative to its RMS
    opt = torch.optim.SGD([p for g in groups for p in g["params"]], lr=1e-2)
    loss = sum((form.factors(i)[0] @ form.factors(i)[1]).pow(2).sum() for i in range(3))
    loss.backward()
    opt.step()
    form.finalize()
    assert not form.soft
    t = form.tensors()
    idx, w = form.topk_arrays()
    assert torch.equal(t["topk_indices"].long(), idx)
    # the weights now lie on the fp16 grid (softmax(log w) = w up to fp32 rounding)
    assert torch.allclose(t["topk_weights"].float(), w[:, :-1], rtol=1e-6, atol=0)
    assert torch.all(w[:, -1] >= w[:, 0])  # the largest weight is the implicit one
    assert float((w.sum(1) - 1).abs().max()) < 1e-6


def test_peft_vblora_keeps_modules_to_save(make_lora, llama_base, tmp_path):
    """A saved copy of a whole module (modules_to_save) travels into the PEFT VB-LoRA dir."""
    from fixtures import load_base, random_ids
    from peft import PeftModel

    src = make_lora("mts", modules_to_save=["lm_head"], target_modules=["q_proj", "v_proj"])
    path = tmp_path / "m.safetensors"
    api.compress(
        src,
        path,
        to="vblora",
        fitting=FitOptions(baseline=False),
        options={"vector_len": 32, "bank": 16, "steps": 3, "refit_steps": 3},
    )
    api.expand(path, tmp_path / "vb", to="peft-vblora")
    api.expand(path, tmp_path / "lora")
    cfg = json.loads((tmp_path / "vb" / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == ["lm_head"]
    ids = random_ids()
    with torch.no_grad():
        y_vb = PeftModel.from_pretrained(load_base(llama_base), tmp_path / "vb").eval()(input_ids=ids).logits
        y_lo = PeftModel.from_pretrained(load_base(llama_base), tmp_path / "lora").eval()(input_ids=ids).logits
        plain = load_base(llama_base).eval()(input_ids=ids).logits
    assert float((y_vb - y_lo).abs().max()) < 1e-4
    assert float((y_lo - plain).abs().max()) > 1e-3


def test_quantisation_aware_training_hooks_the_bank(compressed):
    """With --quant, distillation sees the bank through a fake quantiser: the trainable groups must
    still be leaf parameters, and a step must move the latent bank."""
    from adaptzip import container as ct
    from adaptzip import quant as qz

    _, path, _ = compressed
    form = open_container(path).form()
    storage = ct.storage_plan(form, "int8", 64, torch.float32)
    assert set(storage.tensors) == {"bank"}  # indices and fp16 weights are never quantised
    handle = qz.attach_fake_quant(form, storage, torch.float32)
    assert handle.names == ["bank"]
    groups = form.trainable_groups()
    params = [p for g in groups for p in g["params"]]
    assert all(p.is_leaf for p in params)
    latent = groups[0]["params"][0]
    before = latent.detach().clone()
    opt = torch.optim.Adam([{"params": g["params"], "lr": 1e-3 * g.get("lr_scale", 1.0)} for g in groups])
    B, A = form.factors(0)
    (B @ A).pow(2).sum().backward()
    opt.step()
    assert float((latent.detach() - before).abs().max()) > 0
