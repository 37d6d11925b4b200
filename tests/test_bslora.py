"""BSLoRA forms (bslora-ss, bslora-gt, bslora-ke): optimum anchors, transforms on mixed and
non-divisible dims, Σ weighting, expand round trip, budget, CLI, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from clihelp import RESULT_KEYS, run_cli, run_json
from fixtures import lora_key, one_torch_thread, write_adapter

import adaptzip
from adaptzip import api, fit, linalg
from adaptzip.adapter import ModuleInfo, split_layer
from adaptzip.container import open_container
from adaptzip.errors import ContainerError, OptionError
from adaptzip.forms import FitContext, get_form, make_config
from adaptzip.forms.bslora import KroneckerExtension, layer_groups, make_layout
from adaptzip.options import FitOptions

FORMS = ("bslora-ss", "bslora-gt", "bslora-ke")


_one_thread = pytest.fixture(autouse=True)(one_torch_thread)  # tiny matrices: one thread per test
FAST = {"bslora-ss": {"steps": 20}, "bslora-ke": {"steps": 20}, "bslora-gt": {}}  # keep the suite quick


# ----------------------------------------------------------------------------- synthetic adapters
def synthetic_adapter(
    path: Path, spec: list[tuple[str, int, int]], rank: int = 6, alpha: float = 12.0, seed: int = 0, common: float = 0.5
) -> Path:
    """A PEFT-format LoRA dir; updates of one in-size share part of their row space (so sharing
    has something to find) and have decaying spectra."""
    g = torch.Generator().manual_seed(seed)
    base: dict[int, torch.Tensor] = {}
    tensors = {}
    for name, n_in, n_out in spec:
        base.setdefault(n_in, torch.randn(rank, n_in, generator=g))
        A = common * base[n_in] + torch.randn(rank, n_in, generator=g)
        B = torch.randn(n_out, rank, generator=g) * torch.arange(1, rank + 1).float().pow(-1.0) * 0.1
        tensors[lora_key(name, "A")] = A
        tensors[lora_key(name, "B")] = B
    targets = sorted({n.rsplit(".", 1)[-1] for n, _, _ in spec})
    return write_adapter(path, tensors, {"r": rank, "lora_alpha": alpha, "target_modules": targets})


# 3 layers of mixed, non-divisible dims (q 40→40, k 40→24 GQA-like, up 40→56, down 56→40) and an
# lm_head without a layer index (inter part only).
MIXED = [
    (f"model.layers.{i}.{t}", n_in, n_out)
    for i in range(3)
    for t, n_in, n_out in (
        ("self_attn.q_proj", 40, 40),
        ("self_attn.k_proj", 40, 24),
        ("mlp.up_proj", 40, 56),
        ("mlp.down_proj", 56, 40),
    )
]
MIXED.append(("lm_head", 40, 72))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return synthetic_adapter(tmp_path_factory.mktemp("bsl") / "mixed", MIXED)


def _fit(adapter, name: str, stats=None, seed: int = 0, **opts):
    cls = get_form(name)
    ctx = FitContext(stats=stats, seed=seed)
    form = cls.fit(adapter, make_config(cls, {**FAST[name], **opts}), ctx)
    return form, fit.evaluate(form, adapter, ctx)


def _svd_error(adapter, rank: int, stats=None) -> float:
    ctx = FitContext(stats=stats)
    svd = get_form("svd")
    return fit.evaluate(svd.fit(adapter, make_config(svd, {"rank": rank}), ctx), adapter, ctx).rel_error


def _random_spd(n: int, g: torch.Generator) -> torch.Tensor:
    """A strongly anisotropic SPD matrix (eigenvalues spread over 4 decades)."""
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return ((Q * torch.logspace(0, -4, n, dtype=torch.float64)) @ Q.T).float()


# ----------------------------------------------------------------------------- optimum anchors
@pytest.mark.parametrize("name", FORMS)
@pytest.mark.parametrize("L", [1, 3])
def test_local_only_reaches_truncated_svd_optimum(lora_fp32, name, L):
    """r_intra = r_inter = 0: the fit is the per-module Eckart–Young optimum (within 0.1%)."""
    ad = adaptzip.load_adapter(lora_fp32)
    form, rep = _fit(ad, name, ranks=(L, 0, 0))
    best = _svd_error(ad, L)
    assert best > 0.05  # the rank really truncates
    assert abs(rep.rel_error - best) <= 1e-3 * best
    assert form.float_params() == L * sum(m.in_features + m.out_features for m in ad.modules)


@pytest.mark.parametrize("name", FORMS)
def test_sigma_weighted_local_only_optimum_and_shared_path(mixed, name):
    """With a random SPD Σ per module: (L,0,0) reaches the Σ-weighted SVD optimum; with shared
    parts the weighted fit beats that optimum and beats the unweighted fit in the weighted norm."""
    ad = adaptzip.load_adapter(mixed)
    g = torch.Generator().manual_seed(3)
    stats = {m.name: _random_spd(m.in_features, g) for m in ad.modules}
    _, rep = _fit(ad, name, stats=stats, ranks=(2, 0, 0))
    best = _svd_error(ad, 2, stats)
    assert abs(rep.rel_error - best) <= 1e-3 * best
    ranks = (2, 2, 8) if name != "bslora-gt" else (2, 2, 4)
    form_w, rep_w = _fit(ad, name, stats=stats, ranks=ranks)
    assert form_w.fit_info["weighted"] is True
    assert rep_w.rel_error <= best * (1 + 1e-6)
    form_u, _ = _fit(ad, name, ranks=ranks)
    unweighted_in_sigma = fit.evaluate(form_u, ad, FitContext(stats=stats)).rel_error
    assert rep_w.rel_error < unweighted_in_sigma


def test_gt_is_the_svd_of_rank_L_plus_levels(mixed):
    """GT's gated parts are rank 1 per module: its optimum is the truncated SVD of rank L + levels
    (lm_head has no layer, so one level fewer)."""
    ad = adaptzip.load_adapter(mixed)
    form, rep = _fit(ad, "bslora-gt", ranks=(2, 3, 5), shared_size=16)
    ctx = FitContext()
    for i, (m, t) in enumerate(zip(ad.modules, fit.targets(ad, ctx))):
        k = 2 + (m.layer is not None) + 1
        best = linalg.factored_svd(t.B, t.A).S.double()[k:].pow(2).sum()
        err = linalg.sq_error(t.B.double(), t.A.double(), *(x.detach().double() for x in form.factors(i)))
        assert abs(float(err) - float(best)) <= 1e-6 * t.norm2, m.name
        for lv in form.layout.levels_of(i):  # each gated part is rank 1
            TB, TA = (x.detach() for x in form.level_factors(lv, i))
            s = torch.linalg.svdvals((TB @ TA).double())
            assert float(s[1]) <= 1e-6 * float(s[0])


@pytest.mark.parametrize("name", ["bslora-ss", "bslora-ke"])
def test_more_rank_never_fits_worse(mixed, name):
    ad = adaptzip.load_adapter(mixed)
    chain = [(1, 0, 0), (1, 2, 0), (1, 2, 4), (2, 2, 4), (2, 4, 4), (2, 4, 8), (4, 4, 8)]
    errs = [_fit(ad, name, ranks=r, steps=40)[1].rel_error for r in chain]
    for (r0, e0), (r1, e1) in zip(zip(chain, errs), zip(chain[1:], errs[1:])):
        assert e1 <= e0 * (1 + 2e-3), f"{r1}: {e1} > {r0}: {e0}"
    assert errs[-1] < errs[0] * 0.8
    # the shared parts earn something over the local-only SVD of the same L
    assert errs[2] < _svd_error(ad, 1) * 0.995


def test_ke_fits_dims_that_s_does_not_divide(mixed):
    """s = 16 against dims 24, 40, 56, 72 (1.5, 2.5, 3.5, 4.5 blocks): kernels of ⌈dim/s⌉, cropped,
    and the fit still beats the local-only optimum of the same L."""
    ad = adaptzip.load_adapter(mixed)
    form, rep = _fit(ad, "bslora-ke", ranks=(1, 2, 4), shared_size=16, steps=30)
    assert form.state_info["shared_size"] == 16 and "shared_size_clamped_from" not in form.fit_info
    for i, m in enumerate(ad.modules):
        k = form._pos["inter"][i]
        assert tuple(form.per_module["inter"]["A"][k].shape) == (1, math.ceil(m.in_features / 16))
        assert tuple(form.per_module["inter"]["B"][k].shape) == (math.ceil(m.out_features / 16), 1)
    assert rep.rel_error < _svd_error(ad, 1) * 0.995


def test_gt_more_rank_never_fits_worse(mixed):
    ad = adaptzip.load_adapter(mixed)
    errs = [
        _fit(ad, "bslora-gt", ranks=r, shared_size=8)[1].rel_error
        for r in [(1, 0, 0), (1, 1, 0), (1, 1, 1), (2, 1, 1), (3, 8, 16)]
    ]
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:])), errs


# ----------------------------------------------------------------------------- transforms and shapes
BIG = [
    (f"model.layers.{i}.{t}", n_in, n_out)
    for i in range(2)
    for t, n_in, n_out in (
        ("self_attn.q_proj", 896, 896),
        ("self_attn.k_proj", 896, 128),
        ("mlp.gate_proj", 5120, 11008),
        ("mlp.down_proj", 11008, 5120),
    )
] + [("lm_head", 896, 14336)]


def _infos(spec, rank: int = 4) -> list[ModuleInfo]:
    out = []
    for name, n_in, n_out in spec:
        stack, layer, typ = split_layer(name)
        out.append(ModuleInfo(name, stack, layer, typ, n_in, n_out, rank, 8.0, 2.0))
    return out


def _random_form(cls, infos, config, seed=0):
    state = cls.make_state(infos, config)
    g = torch.Generator().manual_seed(seed)
    specs = cls.tensor_specs(infos, config, state)
    tensors = {n: torch.randn(*shape, generator=g) for n, (shape, _) in specs.items()}
    return cls.from_tensors(infos, config, state, tensors), specs, tensors


@pytest.mark.parametrize("name", FORMS)
def test_shapes_on_llama_and_qwen_sized_dims(name):
    """tensor_specs/factors on 11008, 14336, 896, 5120 and GQA-narrow dims, at tiny rank."""
    cls = get_form(name)
    infos = _infos(BIG)
    cfg = make_config(cls, {"ranks": (1, 2, 3)})
    form, specs, _ = _random_form(cls, infos, cfg)
    assert len(form.layout.slots["intra"]) == 2  # two layers; lm_head has none
    for i, m in enumerate(infos):
        B, A = form.factors(i)
        k = 1 + (2 if m.layer is not None else 0) + 3
        assert tuple(B.shape) == (m.out_features, k) and tuple(A.shape) == (k, m.in_features)
    if name == "bslora-ke":
        s = 256
        assert specs["kernel.inter.2.A"][0] == (1, math.ceil(5120 / s)) and specs["kernel.inter.2.B"][0] == (
            math.ceil(11008 / s),
            1,
        )
        assert specs["kernel.inter.0.A"][0] == (1, 4)  # 896 = 3.5 blocks of 256: 4, cropped
        assert specs["kernel.inter.8.B"][0] == (56, 1)  # 14336 / 256
        assert "kernel.intra.8.A" not in specs  # no layer: no intra part
    if name == "bslora-ss":
        assert specs["inter.B"][0] == (14336, 3) and specs["inter.A"][0] == (3, 11008)
        assert specs["intra.0.B"][0] == (11008, 2) and specs["intra.0.A"][0] == (2, 11008)
    if name == "bslora-gt":
        d = min(m.in_features for m in infos) // 4  # default d_s: the model width / 4 (896 / 4)
        assert d == 224 and form.layout.shared_size == d
        assert specs["inter.B"][0] == (d, 3) and specs["gate.inter.3.id"][0] == (11008,)
        assert specs["gate.intra.3.ou"][0] == (5120,) and specs["gate.inter.3.od"][0] == (d,)


def test_ke_crop_and_tiling_formula():
    """KE: A = (K_A ⊗ A_s)[:, :in], B = (K_B ⊗ B_s)[:out] with ⌈dim/s⌉ blocks (s ∤ dim)."""
    infos = _infos([("model.layers.0.f", 7, 11), ("model.layers.0.g", 4, 3)], rank=2)
    cfg = make_config(KroneckerExtension, {"ranks": (0, 0, 2), "shared_size": 3})
    form, specs, T = _random_form(KroneckerExtension, infos, cfg)
    assert specs["kernel.inter.0.A"][0] == (1, 3) and specs["kernel.inter.0.B"][0] == (4, 1)
    Bs, As = T["inter.B"], T["inter.A"]
    kA, kB = T["kernel.inter.0.A"][0], T["kernel.inter.0.B"][:, 0]
    dense = torch.zeros(12, 9)
    for i in range(4):
        for j in range(3):
            dense[3 * i : 3 * i + 3, 3 * j : 3 * j + 3] = kB[i] * kA[j] * (Bs @ As)
    B, A = form.factors(0)
    torch.testing.assert_close(B @ A, dense[:11, :7], rtol=1e-5, atol=1e-5)


def test_ss_uses_centred_slices():
    infos = _infos([("model.layers.0.a", 10, 7), ("model.layers.0.b", 6, 12)], rank=2)
    cls = get_form("bslora-ss")
    form, _, T = _random_form(cls, infos, make_config(cls, {"ranks": (0, 2, 0)}))
    B, A = form.factors(0)  # shared pair 12×2, 2×10: module a takes rows [2, 9), columns [0, 10)
    torch.testing.assert_close(B, T["intra.0.B"][2:9])
    torch.testing.assert_close(A, T["intra.0.A"][:, 0:10])
    B, A = form.factors(1)  # module b: rows [0, 12), columns [2, 8)
    torch.testing.assert_close(A, T["intra.0.A"][:, 2:8])


def test_layers_follow_the_adapter_structure(mixed):
    ad = adaptzip.load_adapter(mixed)
    groups = layer_groups(ad.modules)
    assert len(groups) == 3 and all(len(g) == 4 for g in groups)
    lay = make_layout(ad.modules, {"ranks": [1] * len(ad.modules), "r_intra": 2, "r_inter": 3}, False)
    head = next(i for i, m in enumerate(ad.modules) if m.name == "lm_head")
    assert lay.levels_of(head) == ["inter"]
    assert all(ad.modules[i].layer == ad.modules[g[0]].layer for g in groups for i in g)


def test_factors_are_differentiable(mixed):
    ad = adaptzip.load_adapter(mixed)
    for name in FORMS:
        cls = get_form(name)
        form, _, _ = _random_form(
            cls,
            ad.modules,
            make_config(cls, {"ranks": (1, 2, 2), **({"shared_size": 16} if name != "bslora-ss" else {})}),
        )
        i = next(i for i, m in enumerate(ad.modules) if m.layer is not None)
        B, A = form.factors(i)
        (B @ A).pow(2).sum().backward()
        lay = form.layout
        assert form.local_B[i].grad is not None and form.local_A[i].grad is not None
        assert form.shared_B["intra"][lay.slot_of["intra"][i]].grad is not None
        assert form.shared_A["inter"][0].grad is not None
        if name != "bslora-ss":
            k = form._pos["inter"][i]
            assert all(form.per_module["inter"][p][k].grad is not None for p in form.module_params)


# ----------------------------------------------------------------------------- container round trip
@pytest.mark.parametrize("name", FORMS)
def test_reported_error_equals_expanded_peft_error(lora_fp32, tmp_path, name):
    out = tmp_path / "c.safetensors"
    opts = {**FAST[name], **({"shared_size": 64} if name == "bslora-gt" else {})}
    res = api.compress(lora_fp32, out, to=name, options=opts)
    assert adaptzip.verify(out)["ok"]
    exp = tmp_path / "peft"
    adaptzip.expand(out, exp)
    src, back = adaptzip.load_adapter(lora_fp32), adaptzip.load_adapter(exp)
    e2 = n2 = 0.0
    for m in src.modules:
        B, A = (x.double() for x in src.factors(m))
        B2, A2 = (x.double() for x in back.factors(m.name))
        e2 += float(linalg.sq_error(B, A, B2, A2))
        n2 += float(linalg.sq_norm(B, A))
    assert abs(math.sqrt(e2 / n2) - res.rel_error) <= 1e-5 * res.rel_error
    c = open_container(out)
    assert c.manifest["state"]["r_inter"] == c.manifest["config"]["ranks"][2]
    assert ("inter.A" in c.tensor_names) and ("local.0.A" in c.tensor_names)


def test_gpt2_conv1d_round_trip(gpt2_base, make_lora, tmp_path):
    """fan_in_fan_out (Conv1D): factors are (out, in) like any module; expand keeps the error."""
    lora = make_lora("gpt2_bsl", base=gpt2_base)
    out = tmp_path / "g.safetensors"
    res = api.compress(lora, out, to="bslora-ke", options={"steps": 10, "shared_size": 48})
    assert any(m.fan_in_fan_out for m in adaptzip.load_adapter(lora).modules)
    adaptzip.expand(out, tmp_path / "peft")
    src, back = adaptzip.load_adapter(lora), adaptzip.load_adapter(tmp_path / "peft")
    e2 = sum(
        float(linalg.sq_error(*(x.double() for x in src.factors(m)), *(x.double() for x in back.factors(m.name))))
        for m in src.modules
    )
    n2 = sum(float(linalg.sq_norm(*(x.double() for x in src.factors(m)))) for m in src.modules)
    assert abs(math.sqrt(e2 / n2) - res.rel_error) <= 1e-5 * res.rel_error


def test_deterministic_bytes(mixed, tmp_path):
    for name in ("bslora-ke", "bslora-ss"):
        a, b = tmp_path / f"{name}-a.safetensors", tmp_path / f"{name}-b.safetensors"
        api.compress(mixed, a, to=name, fitting=FitOptions(seed=7), options={"steps": 15})
        api.compress(mixed, b, to=name, fitting=FitOptions(seed=7), options={"steps": 15})
        assert a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------------- budget, CLI, errors
@pytest.mark.parametrize("name", FORMS)
def test_budget_is_never_exceeded(lora_fp32, tmp_path, name):
    src = adaptzip.load_adapter(lora_fp32).bytes
    extra = {"shared_size": 32} if name == "bslora-gt" else {}
    for budget, limit in ((0.25, int(0.25 * src)), ("40KB", 40_000)):
        out = tmp_path / f"{name}-{limit}.safetensors"
        res = api.compress(lora_fp32, out, to=name, budget=budget, options={**FAST[name], **extra})
        assert res.bytes == out.stat().st_size <= limit
        assert res.bytes > 0.6 * limit  # the budget is used, not wasted
        c = open_container(out)
        assert c.manifest["metrics"]["budget_choice"]["budget_values"] > 0
        assert len(c.manifest["state"]["ranks"]) == len(c.modules)
        assert c.verify()["ok"]


def test_cli_compress_json_keys(lora_fp32, tmp_path):
    out = tmp_path / "ke.safetensors"
    r = run_json(
        "compress",
        str(lora_fp32),
        "-o",
        str(out),
        "--to",
        "bslora-ke",
        "--ranks",
        "2,4,8",
        "--shared-size",
        "32",
        "--opt",
        "steps=10",
        "--seed",
        "1",
    )
    assert RESULT_KEYS <= r.keys(), RESULT_KEYS - r.keys()
    assert r["form"] == "bslora-ke" and r["state"]["shared_size"] == 32 and r["config"]["ranks"] == [2, 4, 8]
    assert 0 < r["rel_error"] < 1 and r["ratio"] == pytest.approx(r["bytes"] / r["source_bytes"])
    v = run_json("verify", str(out))
    assert v["ok"] is True


def test_option_errors(lora_fp32, tmp_path):
    code, _, err = run_cli(
        "compress", str(lora_fp32), "-o", str(tmp_path / "x.safetensors"), "--to", "bslora-ss", "--ranks", "2,4"
    )
    assert code == 2 and "ranks must be three integers" in err
    code, _, err = run_cli(
        "compress", str(lora_fp32), "-o", str(tmp_path / "x.safetensors"), "--to", "bslora-ss", "--shared-size", "64"
    )
    assert code == 2 and "shared_size" in err
    for bad, msg in (((0, 0, 0), "store nothing"), ((2, -1, 4), "≥ 0, got -1")):
        with pytest.raises(OptionError, match=msg):
            make_config(get_form("bslora-ke"), {"ranks": bad})
    with pytest.raises(OptionError, match="shared_size must be ≥ 1, got 0"):
        make_config(get_form("bslora-gt"), {"shared_size": 0})


def test_bad_state_is_a_container_error():
    infos = _infos(MIXED[:2])
    with pytest.raises(ContainerError, match="2 modules"):
        get_form("bslora-ss").tensor_specs(
            infos, make_config(get_form("bslora-ss"), {}), {"ranks": [1], "r_intra": 1, "r_inter": 1}
        )
    with pytest.raises(ContainerError, match="shared_size"):
        get_form("bslora-ke").tensor_specs(
            infos, make_config(get_form("bslora-ke"), {}), {"ranks": [1, 1], "r_intra": 1, "r_inter": 1}
        )
