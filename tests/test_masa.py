"""MASA form: closed-form optimum, grouping, experts, bytes, expand, CLI, PEFT load."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from clihelp import RESULT_KEYS, run_json
from fixtures import lora_key, write_adapter

import adaptzip
from adaptzip import api, fit
from adaptzip.container import open_container
from adaptzip.errors import ContainerError, OptionError
from adaptzip.forms import FitContext, get_form, make_config
from adaptzip.forms.masa import MasaForm
from adaptzip.options import FitOptions

# ----------------------------------------------------------------------------- synthetic adapter
# 5 layers: q (48→40), down (72→48); "fc" whose in-features change at layer 2 (48 then 56), so one
# type key has two expert sets; lm_head has no layer index (its own group).
LAYERS = 5
R_SRC = 6
ALPHA = 12.0


def _spec() -> list[tuple[str, int, int]]:
    out = []
    for i in range(LAYERS):
        out.append((f"model.layers.{i}.self_attn.q_proj", 48, 40))
        out.append((f"model.layers.{i}.mlp.down_proj", 72, 48))
        out.append((f"model.layers.{i}.mlp.fc", 48 if i < 2 else 56, 32))
    out.append(("lm_head", 48, 100))
    return out


def synthetic_adapter(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """A PEFT-format LoRA dir with decaying spectra and a component shared by neighbouring layers
    (so sharing A is neither trivial nor hopeless)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    common: dict[int, torch.Tensor] = {}
    for name, n_in, n_out in _spec():
        common.setdefault(n_in, torch.randn(R_SRC, n_in, generator=g))
        A = 0.6 * common[n_in] + torch.randn(R_SRC, n_in, generator=g)
        B = torch.randn(n_out, R_SRC, generator=g) * torch.arange(1, R_SRC + 1).float().pow(-1.0) * 0.1
        tensors[lora_key(name, "A")] = A.to(dtype)
        tensors[lora_key(name, "B")] = B.to(dtype)
    return write_adapter(
        path, tensors, {"r": R_SRC, "lora_alpha": ALPHA, "target_modules": ["q_proj", "down_proj", "fc", "lm_head"]}
    )


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return synthetic_adapter(tmp_path_factory.mktemp("masa") / "synth")


def expected_groups(ad, S: int) -> list[list[str]]:
    """The grouping rule written out independently: per (type, in) in layer order, runs of S."""
    names = [m.name for m in ad.modules]
    runs: dict[tuple, list[str]] = {}
    for i in range(LAYERS):
        for t, n_in in (("self_attn.q_proj", 48), ("mlp.down_proj", 72), ("mlp.fc", 48 if i < 2 else 56)):
            runs.setdefault((t, n_in), []).append(f"model.layers.{i}.{t}")
    groups = [["lm_head"]]
    for run in runs.values():
        groups += [run[j : j + S] for j in range(0, len(run), S)]
    return sorted(groups, key=lambda g: names.index(g[0]))


def dense(ad, m) -> torch.Tensor:
    B, A = ad.factors(m, torch.float64)
    return B @ A


def fit_form(ad, stats=None, seed=0, **opts) -> MasaForm:
    form_cls = get_form("masa")
    return form_cls.fit(ad, make_config(form_cls, opts), FitContext(stats=stats, seed=seed))


# ----------------------------------------------------------------------------- the closed form
@pytest.mark.parametrize("S,r", [(2, 4), (3, 5)])
def test_fit_reaches_stacked_svd_optimum(synth, S, r):
    ad = adaptzip.load_adapter(synth)
    form = fit_form(ad, group=S, rank=r)
    names = [m.name for m in ad.modules]
    got_groups = [[names[i] for i in g] for g in form.state_info["groups"]]
    assert got_groups == expected_groups(ad, S)
    q = [g for g in got_groups if g[0].endswith("q_proj")]
    assert [len(g) for g in q] == [S] * (LAYERS // S) + [LAYERS % S]  # the last group is smaller (5 % S ≠ 0)
    opt2 = err2 = 0.0
    with torch.no_grad():
        for g in got_groups:
            mods = [ad.module(n) for n in g]
            stack = torch.cat([dense(ad, m) for m in mods], 0)  # dense is fine in tests
            s = torch.linalg.svdvals(stack)
            opt2 += float((s[r:] ** 2).sum())
            for m in mods:
                B, A = form.factors(names.index(m.name))
                err2 += float(((dense(ad, m) - B.double() @ A.double()) ** 2).sum())
    assert opt2 > 1e-4  # not trivially exact
    assert abs(err2 - opt2) <= 1e-3 * opt2, (err2, opt2)
    # the shared evaluation agrees with the dense one
    total = sum(float((dense(ad, m) ** 2).sum()) for m in ad.modules)
    assert fit.evaluate(form, ad, FitContext()).rel_error == pytest.approx(math.sqrt(err2 / total), rel=1e-4)


def test_weighted_fit_optimum_with_proportional_sigmas(synth):
    """Σ_ℓ = c_ℓ Σ₀ (activation energy varying with depth): the weighted closed form is exact."""
    ad = adaptzip.load_adapter(synth)
    g = torch.Generator().manual_seed(3)
    base: dict[int, torch.Tensor] = {}
    stats = {}
    for m in ad.modules:
        if m.in_features not in base:
            X = torch.randn(400, m.in_features, generator=g) * torch.linspace(0.2, 3.0, m.in_features)
            base[m.in_features] = (X.T @ X / 400).double()
        c = 1.0 + 0.8 * (m.layer or 0)
        stats[m.name] = (c * base[m.in_features]).float()
    S, r = 2, 4
    form = fit_form(ad, stats=stats, group=S, rank=r)
    names = [m.name for m in ad.modules]
    opt2 = err2 = 0.0
    with torch.no_grad():
        for gi in form.state_info["groups"]:
            mods = [ad.modules[i] for i in gi]
            L0 = torch.linalg.cholesky(base[mods[0].in_features])
            stack = torch.cat([math.sqrt(1.0 + 0.8 * (m.layer or 0)) * dense(ad, m) @ L0 for m in mods], 0)
            opt2 += float((torch.linalg.svdvals(stack)[r:] ** 2).sum())
            for m in mods:
                B, A = form.factors(names.index(m.name))
                E = dense(ad, m) - B.double() @ A.double()
                err2 += float(torch.trace(E @ stats[m.name].double() @ E.T))
    assert abs(err2 - opt2) <= 1e-3 * opt2, (err2, opt2)
    # and it beats the unweighted fit under the weighted norm
    plain = fit_form(ad, group=S, rank=r)
    ctx = FitContext(stats=stats)
    assert fit.evaluate(form, ad, ctx).rel_error < fit.evaluate(plain, ad, ctx).rel_error


def test_weighted_b_is_least_squares_with_own_sigma(synth):
    """Σ_ℓ of different shapes per layer: A from the averaged shape, each B_ℓ optimal for its own Σ_ℓ
    (the gradient (B_ℓ A − ΔW_ℓ) Σ_ℓ Aᵀ vanishes)."""
    ad = adaptzip.load_adapter(synth)
    g = torch.Generator().manual_seed(5)
    stats = {}
    for m in ad.modules:
        X = torch.randn(300, m.in_features, generator=g) * torch.rand(m.in_features, generator=g) * 3
        stats[m.name] = X.T @ X / 300
    form = fit_form(ad, stats=stats, group=3, rank=4)
    with torch.no_grad():
        for i, m in enumerate(ad.modules):
            B, A = (t.double() for t in form.factors(i))
            S = stats[m.name].double()
            W = dense(ad, m)
            grad = (B @ A - W) @ S @ A.T
            assert float(grad.norm()) <= 1e-4 * float((W @ S @ A.T).norm()), m.name
    assert fit.evaluate(form, ad, FitContext(stats=stats)).rel_error < 1


def test_separate_expert_sets_per_in_features(synth):
    ad = adaptzip.load_adapter(synth)
    form = fit_form(ad, group=2, rank=4, experts=2)
    for k, gi in enumerate(form.state_info["groups"]):
        ins = {ad.modules[i].in_features for i in gi}
        types = {ad.modules[i].type_key for i in gi}
        assert len(ins) == 1 and len(types) == 1
        assert tuple(form.A[k].shape) == (2, 4, ins.pop())
    fc = [gi for gi in form.state_info["groups"] if ad.modules[gi[0]].type == "mlp.fc"]
    assert [[ad.modules[i].layer for i in gi] for gi in fc] == [[0, 1], [2, 3], [4]]


def test_experts_sum_split_and_seed(synth):
    ad = adaptzip.load_adapter(synth)
    one = fit_form(ad, rank=4, experts=1)
    five = fit_form(ad, rank=4, experts=5, seed=0)
    other = fit_form(ad, rank=4, experts=5, seed=1)
    for k in range(len(one.A)):
        A_sum = one.A[k][0]
        assert torch.equal(five.A[k].sum(0), A_sum)  # disjoint supports: exact
        assert int(((five.A[k] != 0).sum(0) > 1).sum()) == 0
        per_expert = (five.A[k] != 0).flatten(1).sum(1).float()
        assert float(per_expert.min()) > 0.1 * A_sum.numel()  # every expert holds a share
        assert not torch.equal(five.A[k], other.A[k])  # the seed picks the split…
        assert torch.equal(other.A[k].sum(0), A_sum)  # …never the sum
    for i in range(len(ad.modules)):
        assert torch.equal(five.factors(i)[0], one.factors(i)[0])
    a_one = sum(4 * ad.modules[g[0]].in_features for g in one.state_info["groups"])
    assert five.fit_info["redundant_expert_params"] == 4 * a_one
    assert one.fit_info["redundant_expert_params"] == 0
    assert five.fit_info["expert_params"] == 5 * a_one
    assert five.float_params() == 5 * a_one + sum(m.out_features * 4 for m in ad.modules)
    assert five.fit_info["redundant_expert_share"] == pytest.approx(4 * a_one / five.float_params())


def test_factors_are_differentiable(synth):
    ad = adaptzip.load_adapter(synth)
    form = fit_form(ad, rank=3, experts=2)
    B, A = form.factors(0)
    (B @ A).square().sum().backward()
    assert form.B[0].grad is not None and float(form.B[0].grad.abs().sum()) > 0
    assert form.A[0].grad is not None and torch.equal(form.A[0].grad[0], form.A[0].grad[1])


# ----------------------------------------------------------------------------- container
def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def test_container_bytes_fp16_sum_and_byte_identical(synth, tmp_path):
    ad = adaptzip.load_adapter(synth)
    fp16 = FitOptions(dtype="fp16", baseline=False)
    r1 = api.compress(synth, tmp_path / "n1.safetensors", to="masa", options={"rank": 4, "experts": 1}, fitting=fp16)
    r5 = api.compress(synth, tmp_path / "n5.safetensors", to="masa", options={"rank": 4, "experts": 5}, fitting=fp16)
    again = api.compress(
        synth, tmp_path / "n5b.safetensors", to="masa", options={"rank": 4, "experts": 5}, fitting=fp16
    )
    assert (tmp_path / "n5.safetensors").read_bytes() == (tmp_path / "n5b.safetensors").read_bytes()
    assert again.bytes == r5.bytes
    groups = r1.state["groups"]
    a = sum(4 * ad.modules[g[0]].in_features for g in groups)
    b = sum(m.out_features * 4 for m in ad.modules)
    for res, n in ((r1, 1), (r5, 5)):
        p = Path(res.output)
        payload = (n * a + b) * 2
        assert res.stored_params == n * a + b
        assert p.stat().st_size == 8 + _header_len(p) + payload  # exactly payload + header
        assert _header_len(p) < 16 * 1024
    assert r5.bytes - r1.bytes >= 4 * a * 2  # the byte cost of N = 5 is real…
    assert r5.metrics["redundant_expert_params"] == 4 * a  # …and reported
    c1, c5 = open_container(tmp_path / "n1.safetensors"), open_container(tmp_path / "n5.safetensors")
    assert c5.verify()["ok"]
    for k in range(len(groups)):
        e = c5.tensor(f"A.{k}")
        assert e.dtype == torch.float16 and e.shape[0] == 5
        assert torch.equal(e.float().sum(0).half(), c1.tensor(f"A.{k}")[0])  # sum of stored experts = stored A_sum
    assert r5.rel_error == pytest.approx(r1.rel_error, rel=1e-6, abs=1e-7)


def test_expand_is_lossless_and_peft_loads(lora_fp32, llama_base, tmp_path):
    from fixtures import load_base, random_ids
    from peft import PeftModel

    out = tmp_path / "m.safetensors"
    res = api.compress(
        lora_fp32, out, to="masa", options={"rank": 4, "group": 2, "experts": 3}, fitting=FitOptions(baseline=False)
    )
    assert api.verify(out)["ok"]
    assert res.metrics["groups"] == 7 * 2  # 7 types × ceil(3 layers / 2)
    c = open_container(out)
    form = c.form()
    api.expand(out, tmp_path / "peft")
    back = adaptzip.load_adapter(tmp_path / "peft")
    assert [m.name for m in back.modules] == [m.name for m in c.modules]
    deltas = {}
    with torch.no_grad():
        for i, m in enumerate(c.modules):
            B, A = form.factors(i)
            want = B @ A
            Bb, Ab = back.factors(m.name)
            assert back.module(m.name).rank == 4
            torch.testing.assert_close(Bb @ Ab, want, rtol=0, atol=1e-6 * float(want.abs().max()) + 1e-9)
            deltas[m.name] = want
    # PEFT applies it as base + ΔŴ
    base = load_base(llama_base)
    ids = random_ids()
    model = PeftModel.from_pretrained(load_base(llama_base), tmp_path / "peft").eval()
    with torch.no_grad():
        got = model(input_ids=ids).logits
        for name, d in deltas.items():
            base.get_submodule(name).weight += d
        want = base.eval()(input_ids=ids).logits
        plain = load_base(llama_base).eval()(input_ids=ids).logits
    assert float((got - want).abs().max()) < 1e-4
    assert float((want - plain).abs().max()) > 1e-3  # ΔŴ matters


def test_cli_compress_json(lora_fp32, tmp_path):
    out = tmp_path / "c.safetensors"
    d = run_json("compress", lora_fp32, "-o", out, "--to", "masa", "--rank", "4", "--group", "3", "--experts", "2")
    assert RESULT_KEYS <= d.keys(), RESULT_KEYS - d.keys()
    assert d["form"] == "masa" and d["config"] == {"rank": 4, "group": 3, "experts": 2}
    assert d["bytes"] == out.stat().st_size and d["ratio"] == pytest.approx(d["bytes"] / d["source_bytes"])
    assert 0 < d["rel_error"] < 1 and d["worst_module_rel_error"] >= d["rel_error"] * 0.999
    assert 0 <= d["svd_baseline_rel_error"] < 1
    assert d["redundant_expert_params"] > 0 and d["groups"] == 7


def test_budget_picks_largest_rank(synth, tmp_path):
    ad = adaptzip.load_adapter(synth)
    res = api.compress(
        synth,
        tmp_path / "b.safetensors",
        to="masa",
        budget=0.4,
        options={"group": 2},
        fitting=FitOptions(baseline=False),
    )
    assert res.bytes <= int(0.4 * ad.bytes)
    choice = res.metrics["budget_choice"]
    r = res.config["rank"]
    assert choice["rank"] == r >= 1
    assert choice["payload_bytes"] <= choice["budget_payload_bytes"] < choice["next_rank_payload_bytes"]
    assert choice["payload_bytes"] == res.stored_params * 4


def test_budget_widens_the_group_when_rank_1_does_not_fit(synth):
    """Below rank 1 at S=2, --budget doubles S until rank 1 fits (every layer keeps its B)."""
    from adaptzip.forms.masa import make_groups, stored_params

    ad = adaptzip.load_adapter(synth)
    mods = ad.modules

    def rank1(S):
        g = make_groups(mods, S)
        return sum(stored_params(mods, g, [1] * len(g), 1)) * 4

    assert rank1(4) < rank1(2)
    budget = (rank1(4) + rank1(2)) // 2
    ctx = FitContext()
    cfg = MasaForm.config_for_budget(ad, MasaForm.Config(group=2), budget, 4, ctx)
    assert cfg.group == 4 and cfg.rank >= 1
    note = ctx.cache[("masa", "budget", id(ad))]
    assert note["group"] == 4 and note["requested_group"] == 2 and note["payload_bytes"] <= budget
    f = MasaForm.fit(ad, cfg, ctx)
    assert f.float_params() * 4 <= budget and f.fit_info["budget_choice"]["group"] == 4


def test_errors_are_one_line(synth, tmp_path):
    with pytest.raises(OptionError, match="experts must be ≥ 1"):
        api.compress(synth, tmp_path / "x.safetensors", to="masa", options={"experts": 0})
    ad = adaptzip.load_adapter(synth)
    with pytest.raises(OptionError, match="needs .* payload bytes at rank 1"):
        MasaForm.config_for_budget(ad, MasaForm.Config(experts=5), 500, 4, FitContext())
    with pytest.raises(ContainerError, match="do not cover"):
        MasaForm.tensor_specs(ad.modules, MasaForm.Config(), {"groups": [[0]], "ranks": [4]})
