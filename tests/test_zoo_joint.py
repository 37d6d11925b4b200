"""Joint zoo compression (Compress-then-Serve): ΔW_a ≈ U C_a V with U, V shared by a cluster and
a full or diagonal core per adapter (form ``joint``, shared-file kind ``joint-basis``).

The zoos are synthetic adapters of the tiny Llama whose updates really share a basis (each
module: a common U0 (out×6), V0 (6×in), a per-adapter core, plus two weak private directions):
the batch must find the joint form, store it only when bytes and error both beat the separate
containers, and leave ordinary containers that verify, expand and load in PEFT."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fixtures import TINY_LLAMA_MODULES, lora_key, one_torch_thread, write_adapter

import adaptzip
from adaptzip import container as ct
from adaptzip import fit, linalg, zoo
from adaptzip.adapter import load_adapter
from adaptzip.forms import FitContext

_threads = pytest.fixture(autouse=True, scope="module")(one_torch_thread)
K0 = 6


def joint_zoo(root: Path, n: int, diagonal: bool, seed: int = 0) -> Path:
    """n adapters (r = 8, 2 layers, every linear module) with ΔW_a = U0 C_a V0 + weak private
    directions; C_a diagonal or full."""
    g = torch.Generator().manual_seed(seed)
    basis = {}
    for layer in range(2):
        for t, (_, n_in, n_out) in TINY_LLAMA_MODULES.items():
            U0 = torch.linalg.qr(torch.randn(n_out, K0, generator=g))[0]
            V0 = torch.linalg.qr(torch.randn(n_in, K0, generator=g))[0].T
            basis[(layer, t)] = (U0, V0)
    for a in range(n):
        tensors = {}
        for (layer, t), (U0, V0) in basis.items():
            block, n_in, n_out = TINY_LLAMA_MODULES[t]
            C = torch.diag(torch.rand(K0, generator=g) + 0.5) if diagonal else torch.randn(K0, K0, generator=g) * 0.5
            B = torch.cat([U0 @ C, 0.003 * torch.randn(n_out, 2, generator=g)], 1)
            A = torch.cat([V0, torch.randn(2, n_in, generator=g) / n_in**0.5], 0)
            name = f"model.layers.{layer}.{block}.{t}"
            tensors[lora_key(name, "A")], tensors[lora_key(name, "B")] = A.contiguous(), (B / 2).contiguous()
        write_adapter(root / f"ad{a}", tensors, {"r": 8, "lora_alpha": 16, "target_modules": list(TINY_LLAMA_MODULES)})
    return root


def test_joint_basis_recovers_a_shared_basis():
    """The alternating fit finds the planted K0-dimensional basis: K0 directions capture all but
    the weak private energy, and the energy never falls with more iterations."""
    g = torch.Generator().manual_seed(1)
    U0 = torch.linalg.qr(torch.randn(40, K0, generator=g))[0]
    V0 = torch.linalg.qr(torch.randn(32, K0, generator=g))[0].T
    facs = [(U0 @ torch.randn(K0, K0, generator=g), V0) for _ in range(5)]
    weak = [(1e-3 * torch.randn(40, 1, generator=g), torch.randn(1, 32, generator=g)) for _ in facs]
    private = sum(float(linalg.sq_norm(b, a)) for b, a in weak)
    facs = [(torch.cat([B, b], 1), torch.cat([A, a])) for (B, A), (b, a) in zip(facs, weak)]
    total = sum(float(linalg.sq_norm(B, A)) for B, A in facs)
    captured = []
    for iters in (0, 2, 8):
        jb = linalg.joint_basis(facs, K0, iters=iters)
        assert torch.allclose(jb.U.T @ jb.U, torch.eye(K0, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(jb.V @ jb.V.T, torch.eye(K0, dtype=torch.float64), atol=1e-10)
        captured.append(float(jb.gains(False).sum()))
    assert all(b >= a - 1e-9 * total for a, b in zip(captured, captured[1:]))  # never falls
    assert captured[-1] >= total - 1.01 * private  # all but (at most) the weak private parts
    # the cores are the least-squares optimum on the basis: the residual is orthogonal to it
    B, A = facs[0]
    C = linalg.joint_cores(jb.U, jb.V, B, A, diagonal=False)
    R = B.double() @ A.double() - jb.U @ C @ jb.V
    assert float((jb.U.T @ R @ jb.V.T).abs().max()) < 1e-8
    d = linalg.joint_cores(jb.U, jb.V, B, A, diagonal=True)
    assert torch.allclose(d, (jb.U.T @ B.double() @ A.double() @ jb.V.T).diagonal(), atol=1e-8)


@pytest.mark.parametrize(("diagonal", "core"), [(False, "full"), (True, "diag")])
def test_batch_stores_a_joint_zoo_jointly(tmp_path, diagonal, core):
    src = joint_zoo(tmp_path / "zoo", 8, diagonal)
    s = zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    g = s["sharing"]["groups"][0]
    assert g["decision"] == "shared" and g["shared"]["kind"] == f"joint-basis ({core} core)", g["reason"]
    assert set(g["candidates"]) == {"row-basis", "joint-basis (full core)", "joint-basis (diag core)"}
    chosen = g["candidates"][g["shared"]["kind"]]
    assert all(c["bytes"] is None or c["bytes"] >= chosen["bytes"] for c in g["candidates"].values())
    # total bytes and error both beat the separate containers, and at their bytes the joint form is far better
    sep = g["separate"]
    assert g["shared"]["bytes"] < 0.8 * sep["bytes"] and g["shared"]["rel_error"] <= sep["rel_error"]
    assert chosen["rel_error_at_equal_bytes"] < 0.1 * sep["rel_error"]
    assert s["counts"] == {"shared": 8} and s["totals"]["zoo_bytes"] == g["shared"]["bytes"]
    # each adapter: an ordinary container of form joint whose U, V live in the shared file
    shared = next((tmp_path / "out" / zoo.SHARED_DIR).iterdir())
    num = den = 0.0
    for a in range(8):
        c = ct.open_container(tmp_path / "out" / f"ad{a}.safetensors")
        assert c.form_name == "joint" and c.config.core == core
        assert c.manifest["modules"] == "shared" and c.table_in_shared and len(c.modules) == 14  # the table, once
        assert c.verify()["shared"] == str(shared.absolute())
        assert c.manifest["metrics"]["zoo"]["kind"] == "joint-basis"
        assert set(c.manifest["shared"]["tensors"]) == {f"{x}.{i}" for x in "UV" for i in range(14)}
        ad = load_adapter(src / f"ad{a}")
        rep = fit.evaluate(c.form(), ad, FitContext())
        assert rep.rel_error == pytest.approx(c.manifest["metrics"]["rel_error"], rel=1e-6)
        num += rep.rel_error**2 * sum(float(linalg.sq_norm(*ad.factors(m))) for m in ad.modules)
        den += sum(float(linalg.sq_norm(*ad.factors(m))) for m in ad.modules)
        if core == "diag":
            assert all(c.tensor(f"core.{i}").dim() == 1 for i in range(14))
    assert math.sqrt(num / den) == pytest.approx(g["shared"]["rel_error"], rel=1e-6)
    # expand → PEFT LoRA with every module's update equal to the form's
    c = ct.open_container(tmp_path / "out" / "ad3.safetensors")
    adaptzip.expand(c.path, tmp_path / "peft3", dtype="fp32")
    back, form = load_adapter(tmp_path / "peft3"), c.form().requires_grad_(False)
    exported = {m.name: m for m in back.modules}
    for i, m in enumerate(c.modules):
        B, A = form.factors(i)
        if m.name not in exported:  # a module fitted at rank 0 is left out of the export
            assert A.shape[0] == 0
            continue
        Bb, Ab = back.factors(exported[m.name])
        assert float(linalg.sq_error(B.double(), A.double(), Bb.double(), Ab.double())) <= 1e-10 * float(
            linalg.sq_norm(B.double(), A.double())
        )
    # a rerun finds everything up to date; the shared file is never rewritten
    mtime = shared.stat().st_mtime_ns
    again = zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    assert again["counts"] == {"skipped": 8} and shared.stat().st_mtime_ns == mtime
    # ... and is not refitted: the group's report comes from the containers, with the same figures
    g2 = again["sharing"]["groups"][0]
    assert g2["decision"] == "shared" and g2["reason"].startswith("unchanged") and "extended" not in g2
    assert g2["shared"]["bytes"] == g["shared"]["bytes"] and g2["shared"]["sha256"] == g["shared"]["sha256"]
    assert g2["shared"]["rel_error"] == pytest.approx(g["shared"]["rel_error"], rel=1e-9)
    assert g2["separate"]["bytes"] == sep["bytes"] and g2["separate"]["rel_error"] == pytest.approx(sep["rel_error"])


def test_unrelated_adapters_stay_separate(tmp_path):
    """Adapters with their own bases (different seeds per adapter): no kind matches the separate
    containers' error in fewer bytes, and batch.json says why for each."""
    (tmp_path / "zoo").mkdir()
    for a in range(4):
        joint_zoo(tmp_path / "one" / str(a), 1, False, seed=10 + a)
        (tmp_path / "one" / str(a) / "ad0").rename(tmp_path / "zoo" / f"ad{a}")
    s = zoo.batch(tmp_path / "zoo", tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    g = s["sharing"]["groups"][0]
    assert g["decision"] == "separate" and g["shared"] is None
    assert all(c["why"] for c in g["candidates"].values()) and "joint-basis (full core)" in g["reason"]
    assert s["counts"] == {"converted": 4}


def test_compress_to_joint_alone_is_svd_with_split_scale(lora_fp32, tmp_path):
    res = adaptzip.compress(lora_fp32, tmp_path / "j.safetensors", to="joint", options={"core": "diag"}, budget=0.3)
    svd = adaptzip.compress(lora_fp32, tmp_path / "s.safetensors", to="svd", budget=0.3)
    assert res.bytes <= int(0.3 * load_adapter(lora_fp32).bytes)
    assert res.rel_error >= svd.rel_error - 1e-9  # one more value per direction: never better than svd
    assert any(f["name"] == "joint" for f in adaptzip.list_forms())


def test_zoo_served_live_with_one_basis_and_mixed_batches(tmp_path, llama_base):
    """expand --to peft-native of a jointly stored zoo: on one base, every adapter's logits equal
    its expanded LoRA's; U and V are held once for all of them; a batch whose rows use different
    adapters runs in one pass and equals each adapter alone."""
    from fixtures import load_base, random_ids
    from peft import PeftModel

    src = joint_zoo(tmp_path / "zoo", 4, diagonal=False)
    s = zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    assert s["sharing"]["groups"][0]["shared"]["kind"].startswith("joint-basis")
    dirs = []
    for a in range(4):
        c = tmp_path / "out" / f"ad{a}.safetensors"
        adaptzip.expand(c, tmp_path / f"n{a}", to="peft-native")
        adaptzip.expand(c, tmp_path / f"p{a}", dtype="fp32")
        dirs.append((tmp_path / f"n{a}", tmp_path / f"p{a}"))
    ids = random_ids(n=4)
    with torch.no_grad():
        ref = load_base(llama_base)(ids).logits
        alone = [PeftModel.from_pretrained(load_base(llama_base), p).eval()(ids).logits for _, p in dirs]
        pm = PeftModel.from_pretrained(load_base(llama_base), dirs[0][0], adapter_name="z0").eval()
        for a in range(1, 4):
            pm.load_adapter(dirs[a][0], adapter_name=f"z{a}")
        tuner = pm.base_model
        assert len(tuner.adaptzip_shared) == 1 and sorted(tuner.adaptzip_forms) == ["z0", "z1", "z2", "z3"]
        basis = next(iter(tuner.adaptzip_shared.values()))
        assert all(tuner.adaptzip_forms[f"z{a}"].basis is basis for a in range(4))
        held = sum(
            p.numel() for n, p in tuner.named_parameters() if n.startswith(("adaptzip_forms.", "adaptzip_shared."))
        )
        c0 = ct.open_container(tmp_path / "out" / "ad0.safetensors")
        shared_values = sum(c0.tensor(n).numel() for n in c0.manifest["shared"]["tensors"])
        core_values = sum(c0.tensor(n).numel() for n in c0.tensor_names)
        assert held == shared_values + 4 * core_values  # the basis once, a core per adapter
        for a in range(4):
            pm.set_adapter(f"z{a}")
            assert float((pm(ids).logits - alone[a]).abs().max()) <= 1e-5 * float((alone[a] - ref).abs().max())
        mixed = pm(ids, adapter_names=["z2", "z0", "__base__", "z3"]).logits
    for row, a in ((0, 2), (1, 0), (3, 3)):
        assert float((mixed[row] - alone[a][row]).abs().max()) <= 1e-5 * float((alone[a] - ref).abs().max())
    assert torch.allclose(mixed[2], ref[2], atol=1e-6)
    pm.delete_adapter("z0")
    assert len(pm.base_model.adaptzip_shared) == 1  # still used by z1..z3


def test_a_grown_zoo_fits_new_adapters_to_the_existing_shared_file(tmp_path):
    """Adapters join a jointly stored cluster (here: republished copies of the two members that
    the joint form serves best, so the cluster's error target still holds): only their cores are
    fitted, to the shared file as it is (never modified); the old containers stay as they were.
    Newcomers the file cannot serve within the target make the cluster refit instead."""
    import shutil

    src = joint_zoo(tmp_path / "zoo", 6, diagonal=False)
    first = zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    assert first["counts"] == {"shared": 6}
    shared = next((tmp_path / "out" / zoo.SHARED_DIR).iterdir())
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.safetensors")} | {"_": shared.read_bytes()}
    rows = sorted(first["adapters"], key=lambda r: r["rel_error"] / r["separate_rel_error"])
    for j, r in enumerate(rows[:2]):
        shutil.copytree(Path(r["source"]), src / f"re{j}")
    grown = zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    g = grown["sharing"]["groups"][0]
    assert grown["counts"] == {"skipped": 6, "shared": 2}, grown["counts"]
    assert g["decision"] == "shared" and g["extended"]["new_adapters"] == 2 and "unchanged" in g["reason"]
    assert g["shared"]["rel_error"] <= g["separate"]["rel_error"] and g["shared"]["bytes"] < g["separate"]["bytes"]
    assert list((tmp_path / "out" / zoo.SHARED_DIR).iterdir()) == [shared] and shared.read_bytes() == before["_"]
    assert all((tmp_path / "out" / n).read_bytes() == b for n, b in before.items() if n != "_")
    for j in range(2):
        c = ct.open_container(tmp_path / "out" / f"re{j}.safetensors")
        assert c.verify()["shared"] == str(shared.absolute()) and c.manifest["metrics"]["zoo"]["extended"] is True
        assert c.table_in_shared
    # newcomers with their own bases do not fit: the cluster is refitted (a new shared file; the old one stays)
    for a in (6, 7):
        joint_zoo(tmp_path / "other" / str(a), 1, diagonal=False, seed=40 + a)
        (tmp_path / "other" / str(a) / "ad0").rename(src / f"own{a}")
    again = zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    assert shared.read_bytes() == before["_"] and again["counts"].get("failed", 0) == 0
    assert all(r["status"] in ("skipped", "shared", "converted") for r in again["adapters"])


def _anisotropic_sigma(n: int, g: torch.Generator, spread: float = 1e3) -> torch.Tensor:
    """A PSD Σ (n×n) with eigenvalues spread over ``spread`` on random axes (activations' second
    moments are dominated by a few directions)."""
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return (Q * torch.logspace(0, math.log10(spread), n, dtype=torch.float64)) @ Q.T


def _w_err(facs, U, V, Sigma, diagonal=False) -> float:
    """Σ_a ‖B_a A_a − U C_a V‖²_Σ with the Σ-optimal cores."""
    e = 0.0
    for B, A in facs:
        C = linalg.joint_cores(U, V, B, A, diagonal, Sigma=Sigma)
        X = B.double() @ A.double() - U @ (torch.diag(C) if diagonal else C) @ V
        e += float(torch.trace(X @ Sigma @ X.T))
    return e


def test_sigma_weighted_joint_and_row_bases():
    """With Σ, the joint basis, its cores and the row basis minimise the Σ-weighted error: the
    cores equal the brute-force weighted least squares, the energy table accounts for the
    weighted residual exactly, the weighted fits beat the plain ones under Σ, and Σ = I gives
    the plain fit back."""
    g = torch.Generator().manual_seed(3)
    n_in, n_out = 24, 20
    Sigma = _anisotropic_sigma(n_in, g)
    facs = [
        (
            torch.randn(n_out, 4, generator=g, dtype=torch.float64),
            torch.randn(4, n_in, generator=g, dtype=torch.float64),
        )
        for _ in range(5)
    ]
    for K in (3, 6):
        jw, ju = linalg.joint_basis(facs, K, Sigma=Sigma), linalg.joint_basis(facs, K)
        assert torch.allclose(jw.V.norm(dim=1), torch.ones(K, dtype=torch.float64))
        ew, eu = _w_err(facs, jw.U, jw.V, Sigma), _w_err(facs, ju.U, ju.V, Sigma)
        assert ew < 0.9 * eu, (K, ew, eu)
        # the weighted norms and captured energy account for the weighted residual
        assert sum(jw.norms) - float(jw.energy_full[-1]) == pytest.approx(ew, rel=1e-4)
        assert sum(jw.norms) == pytest.approx(sum(float(linalg.sq_norm(B, A, Sigma)) for B, A in facs), rel=1e-5)
        assert _w_err(facs, jw.U, jw.V, Sigma, diagonal=True) >= ew
    # cores: the brute-force minimiser of ‖(B A − U C V) R‖_F (R Rᵀ = Σ) over all k×k C
    B, A = facs[0]
    R = torch.linalg.cholesky(Sigma)
    M = torch.kron((jw.V @ R).T.contiguous(), jw.U)  # vec(U C V R) = ((V R)ᵀ ⊗ U) vec(C), column-major
    brute = torch.linalg.lstsq(M, (B @ A @ R).T.reshape(-1)).solution.reshape(6, 6).T
    got = linalg.joint_cores(jw.U, jw.V, B, A, diagonal=False, Sigma=Sigma)
    assert float((got - brute).abs().max()) < 1e-7 * float(brute.abs().max())
    eye = torch.eye(n_in, dtype=torch.float64)
    assert torch.allclose(
        linalg.joint_basis(facs, 3, Sigma=eye).energy_full, linalg.joint_basis(facs, 3).energy_full, rtol=1e-5
    )
    # the row basis (row-basis kind): B fitted on a Σ-weighted shared A
    mw, mu = linalg.module_basis(facs, n_in, cap=5, Sigma=Sigma), linalg.module_basis(facs, n_in, cap=5)

    def row_err(V) -> float:
        return sum(float(linalg.sq_error(B, A, linalg.lstsq_B(B, A, V, Sigma), V, Sigma)) for B, A in facs)

    assert row_err(mw.V) < 0.6 * row_err(mu.V)
    assert sum(mw.norms) - float(mw.lam[:5].sum()) == pytest.approx(row_err(mw.V), rel=1e-4)
    assert mw.overlap == pytest.approx(mu.overlap, abs=1e-12)  # the overlap of the plain A row spaces


def test_batch_shares_sigma_weighted_with_a_stats_file(tmp_path):
    """``batch --shared-basis --stats FILE`` (no base model): the separate containers, the shared
    bases and the cores are all Σ-weighted, every error batch.json compares is the Σ-weighted one,
    and distillation is still refused with one line."""
    from clihelp import run_cli

    from adaptzip.calibrate import save_stats
    from adaptzip.options import CalibrationOptions

    src = joint_zoo(tmp_path / "zoo", 6, diagonal=False)
    g = torch.Generator().manual_seed(5)
    ad0 = load_adapter(src / "ad0")
    stats = {m.name: _anisotropic_sigma(m.in_features, g, 100.0).float() for m in ad0.modules}
    save_stats(tmp_path / "base.stats.safetensors", stats, {"tokens": 1})
    cal = CalibrationOptions(stats_file=tmp_path / "base.stats.safetensors")
    s = zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True, calibration=cal)
    grp = s["sharing"]["groups"][0]
    assert grp["weighted"] is True and grp["decision"] == "shared", grp["reason"]
    ctx = FitContext(stats={k: v.double() for k, v in stats.items()})
    num = den = 0.0
    for r in s["adapters"]:
        c = ct.open_container(tmp_path / "out" / r["output"])
        ad = load_adapter(r["source"])
        assert c.manifest["metrics"]["weighted"] is True
        rep = fit.evaluate(c.form(), ad, ctx)
        assert rep.rel_error == pytest.approx(r["rel_error"], rel=1e-5)
        n2 = sum(float(linalg.sq_norm(*ad.factors(m), ctx.sigma(m))) for m in ad.modules)
        num, den = num + rep.rel_error**2 * n2, den + n2
    assert math.sqrt(num / den) == pytest.approx(grp["shared"]["rel_error"], rel=1e-5)
    assert (
        grp["shared"]["rel_error"] <= grp["separate"]["rel_error"] and grp["shared"]["bytes"] < grp["separate"]["bytes"]
    )
    # the separate errors compared are those of the Σ-weighted svd containers the batch makes alone
    sep = {r["adapter"]: r for r in zoo.batch(src, tmp_path / "sep", budget=0.25, jobs=1, calibration=cal)["adapters"]}
    for r in s["adapters"]:
        assert r["separate_rel_error"] == pytest.approx(sep[r["adapter"]]["rel_error"], rel=1e-9)
        assert r["separate_bytes"] == sep[r["adapter"]]["bytes"]
        assert ct.open_container(tmp_path / "sep" / r["output"]).manifest["metrics"]["weighted"] is True
    code, out, err = run_cli(
        "batch", src, "-o", tmp_path / "o2", "--shared-basis", "--base-model", tmp_path, "--calib", tmp_path / "t.txt"
    )
    assert code != 0 and out == "" and err.count("\n") == 1 and "distillation" in err, err


def test_a_shared_container_is_ordinary_for_every_reader(tmp_path, llama_base):
    """A joint container whose module table and U, V live in the shared file: report, expand
    --to peft (and for vLLM), dense and merged all give its form's ΔW."""
    from safetensors.torch import load_file

    from adaptzip import report

    src = joint_zoo(tmp_path / "zoo", 4, diagonal=True)
    zoo.batch(src, tmp_path / "out", budget=0.25, jobs=1, shared_basis=True)
    path = tmp_path / "out" / "ad1.safetensors"
    c = ct.open_container(path)
    assert c.table_in_shared and c.form_name == "joint"
    form = c.form().requires_grad_(False)
    delta = {m.name: (lambda f: f[0].double() @ f[1].double())(form.factors(i)) for i, m in enumerate(c.modules)}
    scale = max(float(d.abs().max()) for d in delta.values())

    rep = report.report([path], against=src / "ad1")
    row = rep["containers"][0]
    assert row["form"] == "joint" and row["rel_error"] == pytest.approx(c.manifest["metrics"]["rel_error"], rel=1e-6)
    assert len(row["modules"]) == len(c.modules)

    adaptzip.expand(path, tmp_path / "dense.safetensors", to="dense")
    dense = load_file(tmp_path / "dense.safetensors")
    assert set(dense) == {f"{n}.weight" for n in delta}
    assert max(float((dense[f"{n}.weight"].double() - d).abs().max()) for n, d in delta.items()) <= 1e-6 * scale

    for target in ("peft", "vllm"):
        adaptzip.expand(path, tmp_path / target, target=target, dtype="fp32")
        back = load_adapter(tmp_path / target)
        for m in back.modules:
            B, A = back.factors(m)
            assert float((B.double() @ A.double() - delta[m.name]).abs().max()) <= 1e-6 * scale

    adaptzip.expand(path, tmp_path / "merged", to="merged", base_model=llama_base)
    from fixtures import load_base

    base, merged = load_base(llama_base).state_dict(), load_base(tmp_path / "merged").state_dict()
    for n, d in delta.items():
        got = merged[f"{n}.weight"].double() - base[f"{n}.weight"].double()
        assert float((got - d).abs().max()) <= 1e-5 * scale
