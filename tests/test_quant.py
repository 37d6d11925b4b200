"""Quantised storage: packing, error bounds, byte formula, containers, auto allocation,
verify, expand, fake quantisation. Real adapters from tests/fixtures.py; nothing mocked."""

from __future__ import annotations

import json
import math

import pytest
import torch
from clihelp import run_cli
from safetensors import safe_open
from safetensors.torch import save_file

import adaptzip
from adaptzip import api, fit, qsearch
from adaptzip import container as ct
from adaptzip import quant as qz
from adaptzip.adapter import load_adapter
from adaptzip.budget import parse_budget
from adaptzip.errors import ContainerError, OptionError
from adaptzip.forms import FitContext, get_form
from adaptzip.options import CalibrationOptions, FitOptions, QuantOptions


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_exact_all_codes_odd_lengths(bits):
    every = torch.arange(1 << bits)
    for n in (0, 1, 3, 5, 7, 15, 17, 31, 33, 1001):
        codes = every.repeat(n // len(every) + 1)[:n]
        codes = codes[torch.randperm(n, generator=torch.Generator().manual_seed(n))]
        packed = qz.pack_bits(codes, bits)
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(n * bits / 8)
        assert torch.equal(qz.unpack_bits(packed, bits, n), codes.long())
    # every code survives in every position of a byte-crossing stream
    assert torch.equal(qz.unpack_bits(qz.pack_bits(every, bits), bits, len(every)), every)


def test_int4_nibble_order_and_zero_padding():
    # low nibble first: byte j = c[2j] | c[2j+1] << 4; an odd tail leaves the high nibble 0
    assert qz.pack_bits(torch.tensor([1, 2, 15, 0, 7]), 4).tolist() == [0x21, 0x0F, 0x07]
    assert qz.pack_bits(torch.tensor([3, 1, 2]), 2).tolist() == [0b100111]
    # 3 bits cross bytes: codes 5, 6, 7 → bits 101 011 111 (LSB first) → 0b11110101, 0b1
    assert qz.pack_bits(torch.tensor([5, 6, 7]), 3).tolist() == [0b11110101, 0b1]


# ----------------------------------------------------------------------------- error bounds
def _check_bound(x: torch.Tensor, tq: qz.TensorQuant) -> float:
    """Check |x − x̂| against the scheme's bound per value; returns the relative Frobenius error."""
    rows = qz.to_rows(x, tq.axis)
    R, n = rows.shape
    b = tq.row_bits(R)[0]
    c = qz.quantize_rows(rows, b, tq.group_size, tq.zero)
    xh = qz.dequantize_rows(c.codes, c.scale, c.zero, b, tq.group_size)
    s = c.scale.float().repeat_interleave(tq.group_size, 1)[:, :n]
    err = (rows - xh).abs()
    tol = 1e-6 * rows.abs().max() + 1e-12
    if b == 8 or tq.zero:
        assert bool((err <= s / 2 + tol).all()), float((err - s / 2).max())
        # the scale is max|x|/qmax rounded up to fp16 (≤ 2^-10 relative above; 2^-24 among subnormals)
        amax = torch.nn.functional.pad(rows.abs(), (0, (-n) % tq.group_size)).view(R, -1, tq.group_size).amax(-1)
        if b == 8:
            assert bool((c.scale.float() <= amax / 127 * (1 + 2**-10) + 2**-24).all())
    else:
        z = ((1 << b) - 1) / 2
        bound = torch.maximum(s / 2, rows.abs() - z * s)  # in range: s/2; clipped: its excess
        assert bool((err <= bound + tol).all())
    # the stored (packed) form decodes to exactly the same values
    parts = qz.encode("T", x, tq, torch.float16)
    assert torch.equal(qz.decode("T", parts, tq, tuple(x.shape), torch.float16), qz.from_rows(xh, x.shape, tq.axis))
    return float((rows - xh).norm() / rows.norm())


@pytest.mark.parametrize(
    "bits,zero,max_rel", [(8, False, 0.008), (4, False, 0.11), (4, True, 0.11), (3, False, 0.2), (2, False, 0.36)]
)
def test_roundtrip_error_within_bound_random(bits, zero, max_rel):
    g = torch.Generator().manual_seed(bits)
    for shape, axis, G in [
        ((7, 130), 1, 64),
        ((130, 7), 0, 64),
        ((3, 5, 40), 2, 16),
        ((16, 4096), 1, 64),
        ((1, 1), 0, 64),
    ]:
        x = torch.randn(shape, generator=g) * 0.03
        rel = _check_bound(x, qz.TensorQuant(bits, axis, G, zero))
        if x.numel() > 100:
            assert rel < max_rel, (shape, rel)


def test_roundtrip_error_within_bound_real_factors(lora_fp32):
    """Balanced SVD factors of the trained test adapter (A: k×in grouped along in, B: out×k along out)."""
    ad = load_adapter(lora_fp32)
    sv = get_form("svd")
    form = sv.fit(ad, sv.Config(), FitContext())
    rels = {4: [], 8: []}
    for i in range(len(ad.modules)):
        B, A = form.factors(i)
        for bits in (4, 8):
            rels[bits].append(_check_bound(A.detach(), qz.TensorQuant(bits, 1, 64)))
            rels[bits].append(_check_bound(B.detach(), qz.TensorQuant(bits, 0, 64)))
    assert max(rels[8]) < 0.01 and max(rels[4]) < 0.15
    assert sum(rels[4]) / len(rels[4]) > 10 * sum(rels[8]) / len(rels[8])  # 4 bits really is coarser


def test_zero_and_tiny_groups():
    x = torch.zeros(3, 70)
    x[1, 5] = 1e-9  # below fp16's range: the scale rounds up to the smallest subnormal, error ≤ s/2
    for tq in (qz.TensorQuant(8, 1, 64), qz.TensorQuant(4, 1, 64), qz.TensorQuant(4, 1, 64, True)):
        xh = qz.roundtrip(x, tq)
        assert float((xh - x).abs().max()) <= 2**-25
    with pytest.raises(qz.QuantError, match="exceeds the fp16 range"):
        qz.roundtrip(torch.full((2, 4), 1e7), qz.TensorQuant(8, 1, 64))  # scales beyond fp16


def test_mixed_rows_layout_and_bytes_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 6, generator=g)  # like B: out×k, grouped along out (axis 0)
    bits = (8, 16, 4, 3, 2, 4)
    tq = qz.TensorQuant(bits, 0, 32, zero=True)
    parts = qz.encode("B.0", x, tq, torch.float16)
    specs = qz.stored_specs("B.0", x.shape, tq, torch.float16)
    assert {k: (tuple(v.shape), v.dtype) for k, v in parts.items()} == specs
    n, ng = 100, 4
    q_bytes = math.ceil(sum(bits) * n / 8)
    formula = q_bytes + 2 * 5 * ng + 2 * 4 * ng  # q + scales (5 quantised rows) + zeros (4 rows < 8 bits)
    assert (
        sum(t.numel() * t.element_size() for t in parts.values())
        == formula
        == qz.stored_bytes(x.shape, tq, torch.float16)
    )
    dec = qz.decode("B.0", parts, tq, x.shape, torch.float16)
    assert torch.equal(dec, qz.roundtrip(x, tq, torch.float16))
    assert torch.equal(dec[:, 1], x[:, 1].half().float())  # the 16-bit row is the raw fp16 value
    rel = ((dec - x).norm(dim=0) / x.norm(dim=0)).tolist()
    assert rel[0] < 0.01 and rel[2] < 0.12 and rel[4] > rel[3] > rel[2]
    # uniform widths: q is I8 (R, n) at 8 bits, a U8 stream below
    assert qz.stored_specs("A", (4, 70), qz.TensorQuant(8, 1, 64), torch.float16)["A.q"] == ((4, 70), torch.int8)
    assert qz.stored_specs("A", (4, 70), qz.TensorQuant(4, 1, 64), torch.float16)["A.q"] == ((140,), torch.uint8)
    assert qz.stored_bytes((4, 70), qz.TensorQuant(4, 1, 64), torch.float16) == 140 + 2 * 4 * 2


def test_check_parts_rejects_bad_values():
    x = torch.randn(4, 64)
    tq = qz.TensorQuant(8, 1, 64)
    parts = qz.encode("A", x, tq, torch.float16)
    parts["A.q"] = parts["A.q"].clone()
    parts["A.q"][0, 0] = -128
    with pytest.raises(qz.QuantError, match="−128"):
        qz.check_parts("A", parts, tq, (4, 64), torch.float16)
    tq3 = qz.TensorQuant(3, 1, 64)
    p3 = qz.encode("A", torch.randn(1, 3), tq3, torch.float16)  # 9 bits: 7 padding bits
    p3["A.q"] = p3["A.q"].clone()
    p3["A.q"][-1] |= 0x80
    with pytest.raises(qz.QuantError, match="padding"):
        qz.check_parts("A", p3, tq3, (1, 3), torch.float16)


# ----------------------------------------------------------------------------- containers
@pytest.fixture(scope="module")
def runs(lora_fp32, tmp_path_factory):
    """svd at 25% of the source's bytes, fp16 containers: none / int4 / auto (+ int4 again, seeded)."""
    d = tmp_path_factory.mktemp("quant")
    fp16 = FitOptions(dtype="fp16", seed=3)
    out = {}
    for q in ("none", "int4", "auto"):
        out[q] = api.compress(
            lora_fp32, d / f"{q}.safetensors", to="svd", budget=0.25, fitting=fp16, quant=QuantOptions(q)
        )
    out["int4_again"] = api.compress(
        lora_fp32, d / "int4_again.safetensors", to="svd", budget=0.25, fitting=fp16, quant=QuantOptions("int4")
    )
    out["auto_again"] = api.compress(
        lora_fp32, d / "auto_again.safetensors", to="svd", budget=0.25, fitting=fp16, quant=QuantOptions("auto")
    )
    out["budget"] = parse_budget(0.25, load_adapter(lora_fp32).bytes)
    return out


def _stored_error(path, adapter_dir) -> float:
    c = ct.open_container(path)
    return fit.evaluate(c.form(), load_adapter(adapter_dir), FitContext()).rel_error


def test_quantised_svd_beats_fp16_at_the_same_bytes(runs, lora_fp32):
    budget = runs["budget"]
    errs = {q: _stored_error(runs[q].output, lora_fp32) for q in ("none", "int4", "auto")}
    for q in ("none", "int4", "auto"):
        assert runs[q].bytes <= budget
        assert runs[q].bytes == ct.open_container(runs[q].output).bytes  # the real file size
        assert errs[q] == pytest.approx(runs[q].rel_error, rel=1e-9)  # metrics describe what is stored
    assert errs["int4"] < 0.75 * errs["none"], errs
    assert errs["auto"] < 0.75 * errs["none"], errs
    # int4 carries more rank than fp16 in the same bytes
    assert runs["int4"].state["ranks"]["total"] > 1.5 * runs["none"].state["ranks"]["total"]


def test_auto_within_budget_and_never_worse_than_considered(runs, lora_fp32):
    r = runs["auto"]
    auto = r.quant["auto"]
    assert r.bytes <= runs["budget"]
    considered = {c["candidate"]: c for c in auto["considered"]}
    assert {"none", "int8", "int4", "mixed", "2-bit", "3-bit"} <= set(considered)
    assert all(c["bytes"] <= runs["budget"] for c in auto["considered"])
    assert r.rel_error <= min(c["rel_error"] for c in auto["considered"]) + 1e-12
    assert r.rel_error == pytest.approx(considered[auto["chosen"]]["rel_error"])
    # the fixed candidates are exactly what --quant int4 / none give at this budget
    assert considered["int4"]["rel_error"] == pytest.approx(runs["int4"].rel_error, rel=1e-9)
    assert r.rel_error <= runs["int4"].rel_error and r.rel_error <= runs["none"].rel_error
    # the allocation is reported per module type and per rank position, and recorded in the manifest
    bits = r.quant["bits"]
    assert set(bits["by_type"]) == {m.type_key for m in load_adapter(lora_fp32).modules}
    assert sum(t["directions"] for t in bits["by_type"].values()) == sum(
        m.rank for m in load_adapter(lora_fp32).modules
    )
    assert len(bits["by_position"]) == 8 and bits["by_position"][0]["kept"] >= bits["by_position"][-1]["kept"]
    man = ct.open_container(r.output).manifest
    assert man["storage"]["scheme"] == "auto"
    assert qsearch.describe_storage(man) == bits


def test_seed_determinism_byte_identical(runs):
    for a, b in (("int4", "int4_again"), ("auto", "auto_again")):
        with open(runs[a].output, "rb") as fa, open(runs[b].output, "rb") as fb:
            assert fa.read() == fb.read()


def test_verify_passes_and_catches_tampered_scales(runs, tmp_path):
    for q in ("int4", "auto"):
        res = adaptzip.verify(runs[q].output)
        assert res["ok"]
    src = runs["int4"].output
    with safe_open(src, "pt") as f:
        meta = f.metadata()
        ts = {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in ts if k.endswith(".scale"))[0]
    cases = {"sha256": lambda t: t * 2, "non-finite": lambda t: t * float("nan"), "shape": lambda t: t[:, :0]}
    for why, change in cases.items():
        bad = dict(ts)
        bad[name] = change(ts[name].clone()).contiguous()
        p = tmp_path / f"{why}.safetensors"
        save_file(bad, str(p), metadata=meta)
        with pytest.raises(ContainerError, match=why):
            adaptzip.verify(p)
    # a scale stored in the wrong dtype
    bad = dict(ts)
    bad[name] = ts[name].float()
    save_file(bad, str(tmp_path / "dtype.safetensors"), metadata=meta)
    with pytest.raises(ContainerError, match="dtype"):
        adaptzip.verify(tmp_path / "dtype.safetensors")


def test_stored_layout_matches_manifest(runs):
    c = ct.open_container(runs["int4"].output)
    st = c.manifest["storage"]
    assert st["scheme"] == "int4" and st["group_size"] == 64
    ranks = c.manifest["state"]["ranks"]
    shapes = dict(c._shapes)
    n_q = 0
    for i, m in enumerate(c.modules):
        for f, axis, n_long in (("A", 1, m.in_features), ("B", 0, m.out_features)):
            name = f"{f}.{i}"
            if name not in st["tensors"]:  # kept in fp16: scales + header entries would not pay for it
                assert shapes[name][1] == "F16" and ranks[i] * n_long * 2 <= 256 + 64
                continue
            n_q += 1
            assert st["tensors"][name] == {"bits": 4, "axis": axis, "group_size": 64, "zero": False}
            assert name not in shapes
            assert shapes[f"{name}.q"] == ((math.ceil(ranks[i] * n_long / 2),), "U8")
            assert shapes[f"{name}.scale"] == ((ranks[i], math.ceil(n_long / 64)), "F16")
            want = (ranks[i], m.in_features) if f == "A" else (m.out_features, ranks[i])
            assert tuple(c.tensor(name).shape) == want  # dequantised on read, in the logical shape
    assert n_q >= 1.5 * len(c.modules)


def test_expand_quantised_container_loads_with_peft(runs, llama_base, tmp_path):
    from fixtures import load_base, random_ids
    from peft import PeftModel

    c = ct.open_container(runs["auto"].output)
    form = c.form()
    out = tmp_path / "peft32"
    api.expand(c.path, out, dtype="fp32")
    back = load_adapter(out)
    for i, m in enumerate(back.modules):
        B, A = back.factors(m)
        B2, A2 = form.factors(i)
        assert torch.equal(B @ A, (B2 @ A2).detach())  # exact w.r.t. the dequantised container
    model = PeftModel.from_pretrained(load_base(llama_base), out)
    with torch.no_grad():
        y = model(random_ids()).logits
    assert torch.isfinite(y).all()
    api.expand(c.path, tmp_path / "peft16")  # default: the container dtype (fp16), rounded once
    assert load_adapter(tmp_path / "peft16").dtype == torch.float16


# ----------------------------------------------------------------------------- other forms, options
def test_fixed_schemes_on_lora_form(lora_fp32, tmp_path):
    ad = load_adapter(lora_fp32)
    res = {}
    for q in ("int8", "int4", "int4-asym"):
        r = api.compress(
            lora_fp32,
            tmp_path / f"{q}.safetensors",
            to="lora",
            fitting=FitOptions(dtype="fp16"),
            quant=QuantOptions(q, group_size=32),
        )
        adaptzip.verify(r.output)
        res[q] = r
        assert r.quant["scheme"] == q and r.quant["quantised_tensors"] == 2 * len(ad.modules)
    assert res["int8"].rel_error < 0.01 < res["int4"].rel_error < 0.2
    assert res["int4-asym"].rel_error < 0.2
    assert res["int4"].bytes < res["int8"].bytes < 0.5 * ad.bytes
    man = ct.open_container(res["int4-asym"].output).manifest
    assert man["storage"]["tensors"]["A.0"]["zero"] is True and man["storage"]["tensors"]["A.0"]["group_size"] == 32


def test_auto_per_tensor_on_lora_form(lora_fp32, tmp_path):
    budget = parse_budget(0.3, load_adapter(lora_fp32).bytes)
    r = api.compress(
        lora_fp32,
        tmp_path / "auto.safetensors",
        to="lora",
        budget=budget,
        fitting=FitOptions(dtype="fp16"),
        quant=QuantOptions("auto"),
    )
    assert r.bytes <= budget
    assert r.rel_error <= min(c["rel_error"] for c in r.quant["auto"]["considered"]) + 1e-12
    assert r.quant["auto"]["chosen"].startswith("per-tensor") or r.quant["auto"]["chosen"] in ("int4", "int8")
    adaptzip.verify(r.output)


def test_option_errors(lora_fp32, tmp_path):
    with pytest.raises(OptionError, match="--budget"):
        api.compress(lora_fp32, tmp_path / "a.safetensors", quant=QuantOptions("auto"))
    with pytest.raises(OptionError, match="--quant"):
        QuantOptions("int3")
    with pytest.raises(OptionError, match="group-size"):
        QuantOptions("int4", group_size=0)


def test_cli_quant_options(lora_fp32, tmp_path):
    code, out, err = run_cli(
        "compress",
        lora_fp32,
        "-o",
        tmp_path / "c.safetensors",
        "--to",
        "svd",
        "--rank",
        "4",
        "--quant",
        "int4",
        "--group-size",
        "32",
        "--dtype",
        "fp16",
        "--json",
    )
    assert code == 0, err
    r = json.loads(out)
    assert r["quant"]["scheme"] == "int4" and r["quant"]["group_size"] == 32
    code, _, err = run_cli("compress", lora_fp32, "-o", tmp_path / "d.safetensors", "--quant", "auto")
    assert code == 2 and "--budget" in err
    code, _, err = run_cli("compress", lora_fp32, "-o", tmp_path / "e.safetensors", "--quant", "int5")
    assert code != 0 and "int5" in err and "int4-asym" in err
    code, out, _ = run_cli("compress", "--help")
    assert "--quant" in out and "--group-size" in out


# ----------------------------------------------------------------------------- distillation hooks
def test_fake_quant_straight_through():
    x = torch.randn(6, 100, requires_grad=True)
    tq = qz.TensorQuant(4, 1, 32)
    y = qz.fake_quant(x, tq)
    assert torch.equal(y.detach(), qz.roundtrip(x.detach(), tq))
    (y * torch.arange(100.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(100.0).expand(6, 100))


def test_attach_fake_quant_on_svd(lora_fp32):
    ad = load_adapter(lora_fp32)
    ctx = FitContext()
    sv = get_form("svd")
    form = sv.fit(ad, sv.Config(rank=4), ctx)
    dt = torch.float16
    storage = ct.storage_plan(form, "int4", 64, dt)
    tensors, manifest = ct.build(form, ad, dt, storage=storage)
    stored = ct.decoded_form(form, tensors, manifest)
    e_float = fit.evaluate(form, ad, ctx).rel_error
    e_stored = fit.evaluate(stored, ad, ctx).rel_error
    assert e_stored > e_float

    h = qz.attach_fake_quant(form, storage, dt)  # QAT view: factors are what the container stores
    assert sorted(h.names) == sorted(storage.tensors) and not h.skipped
    assert fit.evaluate(form, ad, ctx).rel_error == pytest.approx(e_stored, rel=1e-6)
    loss = fit.module_sq_errors(form, fit.targets(ad, ctx)).sum()
    loss.backward()
    assert all(p.grad is not None for p in h.params)
    h.remove()
    assert fit.evaluate(form, ad, ctx).rel_error == pytest.approx(e_float, rel=1e-6)  # latent floats back


def test_group_axis_choice():
    g = torch.Generator().manual_seed(0)
    # factors: the long dimension (each rank direction its own scales)
    assert qz.choose_axis(torch.randn(4, 96, generator=g), 4, 64) == 1
    assert qz.choose_axis(torch.randn(96, 4, generator=g), 4, 64) == 0
    # a bank of vectors (rows), a few of them 50× larger: grouping along the vectors wins by far
    bank = torch.randn(433, 32, generator=g)
    bank[torch.randperm(433, generator=g)[:6]] *= 50
    assert qz.choose_axis(bank, 4, 64) == 1
    err = {ax: float((qz.roundtrip(bank, qz.TensorQuant(4, ax, 64)) - bank).norm()) for ax in (0, 1)}
    assert err[1] < 0.5 * err[0]


def test_quantisation_aware_distillation_is_what_is_stored(llama_base, tmp_path):
    """compress --base-model … --quant int4: the form is distilled through the fake quantiser and
    the metrics (KL) describe the stored container exactly."""
    from calib_fixtures import base_with_tokenizer, make_text, train_text_lora

    from adaptzip import distill

    text = make_text(600, seed=0)
    (tmp_path / "calib.txt").write_text(text)
    (tmp_path / "eval.txt").write_text(make_text(100, seed=1))
    base = base_with_tokenizer(llama_base, tmp_path / "base", text)
    lora = train_text_lora(base, tmp_path / "lora", text, steps=20)
    common = dict(
        calibration=CalibrationOptions(
            base_model=base,
            calib=tmp_path / "calib.txt",
            tokens=2000,
            eval_text=tmp_path / "eval.txt",
            seq_len=32,
            steps=10,
            device="cpu",
            stats_file=tmp_path / "stats.safetensors",
        ),
        fitting=FitOptions(dtype="fp16", baseline=False),
    )
    r = api.compress(lora, tmp_path / "q.safetensors", to="svd", budget=0.3, quant=QuantOptions("int4"), **common)
    assert r.quant["scheme"] == "int4" and r.bytes <= parse_budget(0.3, load_adapter(lora).bytes)
    adaptzip.verify(r.output)
    cal = distill.prepare(
        load_adapter(lora),
        base,
        tmp_path / "calib.txt",
        calib_tokens=2000,
        eval_text=tmp_path / "eval.txt",
        seq_len=32,
        device="cpu",
        stats_file=tmp_path / "stats.safetensors",
    )
    assert cal.evaluate(ct.open_container(r.output).form())["kl"] == pytest.approx(r.metrics["kl_after"], rel=1e-6)
    # --quant auto + distillation: bits chosen on the Σ-weighted error, then distilled through them
    a = api.compress(lora, tmp_path / "a.safetensors", to="svd", budget=0.2, quant=QuantOptions("auto"), **common)
    assert a.quant["scheme"] == "auto" and a.bytes <= parse_budget(0.2, load_adapter(lora).bytes)
    rep = a.quant["auto"]
    assert {c["candidate"] for c in rep["considered"]} >= {"none", "int8", "int4", "mixed"}
    assert rep["considered"][0]["candidate"] == rep["chosen"]
    assert rep["considered"][0]["rel_error"] == min(c["rel_error"] for c in rep["considered"])
    # distillation keeps its best held-out state: the held-out objective never rises (eval KL on
    # this tiny text may move either way by a few 1e-6; the early-stopping split is the guarantee)
    assert 0 < a.metrics["heldout_after"] <= a.metrics["heldout_before"] and a.metrics["kl_after"] > 0
    assert cal.evaluate(ct.open_container(a.output).form())["kl"] == pytest.approx(a.metrics["kl_after"], rel=1e-6)
    adaptzip.verify(a.output)
