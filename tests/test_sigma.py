"""Σ sketches (:mod:`adaptzip.sigma`) and their use: exact on the source's row space, the
Nyström error bound, every linalg operation on a sketch equal to the same on its dense matrix,
fits with a sketch against fits with the exact Σ, ``SigmaHooks`` (sharing, exact splits,
embeddings) on a tiny real model, the stats file (both kinds, version 1, corrupt files) and
determinism."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures import one_torch_thread, random_ids
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from adaptzip import calibrate as cb
from adaptzip import fit, linalg, load_adapter, qsearch
from adaptzip.adapter import ModuleInfo
from adaptzip.errors import CalibrationError
from adaptzip.forms import FitContext, get_form
from adaptzip.sigma import SigmaSketch, reconstruct

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _mixer(n: int, g: torch.Generator, decay: float = 1.0) -> torch.Tensor:
    """M with x = z Mᵀ of second moment Q diag(i^-decay) Qᵀ, four outlier features ×10."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    M = Q * torch.arange(1, n + 1).pow(-decay / 2)[None, :]
    M[torch.randperm(n, generator=g)[:4]] *= 10
    return M


def _modules(n: int, types: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> list[ModuleInfo]:
    return [ModuleInfo(f"model.layers.0.self_attn.{t}", "model.layers", 0, t, n, n, 6, 12.0, 2.0) for t in types]


def _run(hooks: list[cb.SigmaHooks], feeds: list[dict[int, torch.Tensor]]) -> list[tuple[dict, dict]]:
    """Feed batches ({module index: input}) to every hooks object; their results."""
    for batch in feeds:
        for h in hooks:
            h.new_batch(None)
            for j, x in batch.items():
                h.observe(j, x)
    return [h.result() for h in hooks]


@pytest.fixture(scope="module")
def attention():
    """q/k/v fed one input, o another: the exact Σ and a rank-16 sketch from the same tokens."""
    n, g = 160, torch.Generator().manual_seed(0)
    mods = _modules(n)
    rows = [torch.randn(6, n, generator=g) / n**0.5 for _ in mods]
    M1, M2 = _mixer(n, g), _mixer(n, g, 0.5)
    feeds = []
    for _ in range(4):
        x1, x2 = torch.randn(300, n, generator=g) @ M1.T, torch.randn(300, n, generator=g) @ M2.T
        feeds.append({0: x1, 1: x1, 2: x1, 3: x2})
    (full, _), (sk, info) = _run(
        [cb.SigmaHooks(None, mods, None, rows=rows), cb.SigmaHooks(None, mods, 16, rows=rows)], feeds
    )
    return {"mods": mods, "rows": rows, "full": full, "sketch": sk, "info": info}


# ----------------------------------------------------------------------------- the sketch itself
def test_sketch_is_exact_on_the_source_row_space(attention):
    """A Σ Aᵀ and A Σ of every module equal the exact Σ's (the sketch is exact on span of the A rows
    of every module sharing the input); the diagonal is Σ's; the sketch is smaller than Σ."""
    full, sk = attention["full"], attention["sketch"]
    names = [m.name for m in attention["mods"]]
    q, k, v, o = (sk[n] for n in names)
    assert q is k is v and o is not q and isinstance(q, SigmaSketch) and isinstance(o, SigmaSketch)
    assert q.U.shape[1] == 18 and o.U.shape[1] == 6  # the exact rows: 3×6 (q/k/v), 6 (o)
    for name, A in zip(names, attention["rows"]):
        A = A.double()
        S, T = full[name].double(), sk[name].double()
        assert _rel(linalg.gram(A, T), linalg.gram(A, S)) < 1e-5, name
        assert _rel(linalg.weigh(A, T), linalg.weigh(A, S)) < 1e-5, name
        assert _rel(T.diagonal(), S.diagonal()) < 1e-5, name
        assert sk[name].nbytes < full[name].nbytes / 2
    assert attention["info"]["sketch"] == 16


def test_low_rank_part_near_the_best_rank_k():
    """The low-rank part's trace error tr(Σ − L Lᵀ) is within 2× the best rank-k error (Tropp et
    al.'s bound for a 2× oversampled sketch is (1 + k/(k−1))×, in expectation); the sketch is PSD
    and d ≥ 0."""
    n, k, g = 200, 12, torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.arange(1, n + 1, dtype=torch.float64).pow(-2.0)
    S = (Q * lam) @ Q.T
    U = linalg.orth_rows(torch.randn(8, n, generator=g, dtype=torch.float64)).T
    G = torch.randn(n, 2 * k, generator=g).half()
    sk = reconstruct(S @ torch.cat([U, G.double()], 1), U, G, S.diagonal(), k)
    err = float(S.trace() - sk.L.double().pow(2).sum())
    assert 0 < err <= 2.0 * float(lam[k:].sum())
    assert bool((sk.d >= 0).all()) and float(torch.linalg.eigvalsh(sk.dense().double())[0]) > -1e-6
    assert _rel(sk.double().diagonal(), S.diagonal()) < 1e-5
    assert _rel(sk.double().gram(U.T), U.T @ S @ U) < 1e-6  # exact on span U (here: fp64 data)


def test_linalg_on_a_sketch_equals_linalg_on_its_matrix():
    n, g = 90, torch.Generator().manual_seed(2)
    U = linalg.orth_rows(torch.randn(5, n, generator=g, dtype=torch.float64)).T
    L = torch.randn(n, 12, generator=g, dtype=torch.float64)
    L -= U @ (U.T @ L)
    sk = SigmaSketch(L, U, torch.rand(n, generator=g, dtype=torch.float64))
    D = sk.dense()
    A, A2, M = (torch.randn(r, n, generator=g, dtype=torch.float64) for r in (4, 3, 7))
    B, B2 = torch.randn(30, 4, generator=g, dtype=torch.float64), torch.randn(30, 3, generator=g, dtype=torch.float64)
    assert sk.shape == D.shape and sk.dtype == torch.float64 and sk.float().dtype == torch.float32
    pairs = [
        (A @ sk, A @ D),
        (sk @ M.T, D @ M.T),
        (linalg.weigh(A, sk), A @ D),
        (linalg.gram(A, sk), A @ D @ A.T),
        (linalg.gram(A, sk, A2), A @ D @ A2.T),
        (sk.diagonal(), D.diagonal()),
        (sk.trace(), D.trace()),
        (linalg.sq_norm(B, A, sk), linalg.sq_norm(B, A, D)),
        (linalg.inner(B, A, B2, A2, sk), linalg.inner(B, A, B2, A2, D)),
        (linalg.sq_error(B, A, B2, A2, sk), linalg.sq_error(B, A, B2, A2, D)),
        (linalg.lstsq_B(B, A, A2, sk), linalg.lstsq_B(B, A, A2, D)),
        (sk.float().to(torch.float64).L, L),
    ]
    for i, (got, want) in enumerate(pairs):
        assert _rel(got, want) < 1e-5, i
    s1, s2 = linalg.factored_svd(B, A, sk), linalg.factored_svd(B, A, D)
    assert _rel(s1.S, s2.S) < 1e-5
    for r in (1, 3):
        (b1, a1), (b2, a2) = s1.truncate(r), s2.truncate(r)
        assert _rel(b1 @ a1, b2 @ a2) < 1e-4
    o1 = qsearch.direction_options(*s1.truncate(4), sk, [4, 8, 16], 16, torch.float16)
    o2 = qsearch.direction_options(*s2.truncate(4), D, [4, 8, 16], 16, torch.float16)
    assert o1[0] == o2[0] and _rel(o1[1], o2[1]) < 1e-4


# ----------------------------------------------------------------------------- fits
FIT_OPTIONS = {"vblora": {"vector_len": 32, "bank": 32}}


@pytest.fixture(scope="module")
def tiny_stats(lora_fp32):
    """Σ of the tiny test adapter's modules from synthetic activations (q/k/v and gate/up sharing
    their input): exact and a rank-4 sketch (every slot sketched: in 64/96 > 4 + 2p + 1)."""
    ad = load_adapter(lora_fp32)
    g = torch.Generator().manual_seed(3)
    rows = [A for _, _, A in ad.iter_factors()]
    slot = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}
    key = [(m.layer, slot[m.type.rsplit(".", 1)[-1]]) for m in ad.modules]
    mix = {kk: _mixer(m.in_features, g) for kk, m in zip(key, ad.modules)}
    feeds = []
    for _ in range(3):
        xs = {kk: torch.randn(256, M.shape[1], generator=g) @ M.T for kk, M in mix.items()}
        feeds.append({j: xs[kk] for j, kk in enumerate(key)})
    (full, _), (sk, _) = _run(
        [cb.SigmaHooks(None, ad.modules, None, rows=rows), cb.SigmaHooks(None, ad.modules, 4, rows=rows)], feeds
    )
    assert all(isinstance(s, SigmaSketch) for s in sk.values())
    return ad, full, sk


def test_svd_fit_with_the_sketch_is_the_exact_sigma_fit(tiny_stats):
    """The svd form's Σ-optimum needs only A Σ Aᵀ: same error (under the exact Σ) within 1e-4."""
    ad, full, sk = tiny_stats
    ev = FitContext(stats=full)
    svd = get_form("svd")
    for rank in (1, 3):
        e_full = fit.evaluate(svd.fit(ad, svd.Config(rank=rank), FitContext(stats=full)), ad, ev).rel_error
        e_sk = fit.evaluate(svd.fit(ad, svd.Config(rank=rank), FitContext(stats=sk)), ad, ev).rel_error
        assert e_sk == pytest.approx(e_full, rel=1e-4)
    # and the source's own Σ-norms are the exact Σ's
    for t_f, t_s in zip(fit.targets(ad, ev), fit.targets(ad, FitContext(stats=sk))):
        assert t_s.norm2 == pytest.approx(t_f.norm2, rel=1e-5)


@pytest.mark.parametrize(
    ("name", "opts", "tol"),
    [
        ("bslora-gt", {"ranks": (2, 2, 2)}, 1e-4),  # closed form: a weighted SVD of rank L + levels
        ("bslora-ss", {"ranks": (2, 2, 4), "steps": 10}, 0.01),
        ("masa", {"group": 3, "rank": 4}, 0.01),
        ("vblora", {"rank": 2, "steps": 10, "refit_steps": 10}, 0.01),
    ],
)
def test_other_forms_with_the_sketch(tiny_stats, name, opts, tol):
    """Forms whose rows leave the source's row space weigh those rows with the sketch's
    approximation: at rank 4 on in 64/96 (k/in ≈ 0.05) their error under the exact Σ stays within
    ``tol`` (relative) of the exact-Σ fit's (measured here: +0.001% bslora-ss, +0.07% masa, +0.04%
    vblora; bench/bench_sigma.py measures more forms, budgets and spectra)."""
    ad, full, sk = tiny_stats
    cls = get_form(name)
    cfg = cls.Config(**{**FIT_OPTIONS.get(name, {}), **opts})
    ev = FitContext(stats=full)
    e_full = fit.evaluate(cls.fit(ad, cfg, FitContext(stats=full, max_steps=10)), ad, ev).rel_error
    e_sk = fit.evaluate(cls.fit(ad, cfg, FitContext(stats=sk, max_steps=10)), ad, ev).rel_error
    assert e_sk <= e_full * (1 + tol)


# ----------------------------------------------------------------------------- hooks on a model
def _peft_base(base_dir, lora_dir):
    ad = load_adapter(lora_dir)
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), str(lora_dir))
    inner = pm.eval().base_model.model
    layers = {m.name: inner.get_submodule(m.name) for m in ad.modules}
    return ad, pm, cb.Base(base_dir, pm, None, "lm", torch.device("cpu"), layers)


def _model_pass(pm, base, ad, sketches):
    hooks = [cb.SigmaHooks(base, ad.modules, s) for s in sketches]
    with torch.no_grad():
        for h in hooks:
            h.__enter__()
        for b in range(3):
            for h in hooks:
                h.new_batch(None)
            pm(input_ids=random_ids(4, 24, seed=b))
        for h in hooks:
            h.__exit__(None, None, None)
    return [h.result()[0] for h in hooks]


def test_hooks_on_a_tiny_model(llama_base, lora_fp32):
    """The forward hooks: q/k/v and gate/up share one sketch each, exact on the A rows the base's
    LoRA layers hold; slots whose dense Σ is no larger than a sketch keep the exact Σ."""
    ad, pm, base = _peft_base(llama_base, lora_fp32)
    full, sk, small = _model_pass(pm, base, ad, [None, 4, 128])
    layer = "model.layers.1"
    q, k, v, o = (sk[f"{layer}.self_attn.{t}"] for t in ("q_proj", "k_proj", "v_proj", "o_proj"))
    gate, up, down = (sk[f"{layer}.mlp.{t}"] for t in ("gate_proj", "up_proj", "down_proj"))
    assert q is k is v and gate is up and len({id(q), id(o), id(gate), id(down)}) == 4
    assert all(isinstance(s, SigmaSketch) for s in sk.values())
    assert all(isinstance(s, torch.Tensor) for s in small.values())  # 64/96 ≤ 128 + 2p + 1: dense is smaller
    for m, _, A in ad.iter_factors():
        assert _rel(linalg.gram(A.double(), sk[m.name]), linalg.gram(A.double(), full[m.name])) < 1e-5, m.name
        assert torch.equal(small[m.name], full[m.name])


def test_hooks_embedding_sigma_is_token_frequencies(llama_base, make_lora):
    lora = make_lora("sigma_emb", target_modules=["q_proj", "embed_tokens"])
    ad, pm, base = _peft_base(llama_base, lora)
    full, sk = _model_pass(pm, base, ad, [None, 4])
    emb = next(m for m in ad.modules if m.kind == "embedding")
    freq = torch.cat([random_ids(4, 24, seed=b).reshape(-1) for b in range(3)]).bincount(minlength=emb.in_features)
    for st in (full, sk):
        S = st[emb.name]
        assert isinstance(S, SigmaSketch) and S.L.shape[1] == S.U.shape[1] == 0
        assert torch.allclose(S.d, freq.float() / freq.sum())


def test_split_when_sharing_breaks_is_exact():
    """Two modules share their input on the first batch; later the second gets its own input, then
    misses a batch: each Σ is exactly the second moment of its own inputs (exact Σ and sketch)."""
    n, g = 120, torch.Generator().manual_seed(4)
    mods = _modules(n, ("q_proj", "k_proj"))
    rows = [torch.randn(6, n, generator=g) for _ in mods]
    M = _mixer(n, g)
    xs = [torch.randn(100, n, generator=g) @ M.T for _ in range(5)]
    feeds = [{0: xs[0], 1: xs[0]}, {0: xs[1], 1: xs[2]}, {0: xs[3]}, {0: xs[4], 1: xs[4]}]
    own = [[xs[0], xs[1], xs[3], xs[4]], [xs[0], xs[2], xs[4]]]
    (full, _), (sk, _) = _run(
        [cb.SigmaHooks(None, mods, None, rows=rows), cb.SigmaHooks(None, mods, 8, rows=rows)], feeds
    )
    for m, A, x in zip(mods, rows, own):
        X = torch.cat(x).double()
        want = X.T @ X / X.shape[0]
        assert _rel(full[m.name], want) < 1e-6
        assert _rel(linalg.gram(A.double(), sk[m.name]), A.double() @ want @ A.double().T) < 1e-5
        assert _rel(sk[m.name].double().diagonal(), want.diagonal()) < 1e-5
    assert full[mods[0].name] is not full[mods[1].name]


# ----------------------------------------------------------------------------- the stats file
def _rewrite(path, edit_tensors=None, edit_meta=None):
    with safe_open(path, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["adaptzip-stats"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(path), metadata={"adaptzip-stats": json.dumps(meta)})


def test_stats_file_round_trip_both_kinds_and_version_1(attention, tmp_path):
    full, sk = attention["full"], attention["sketch"]
    names = [m.name for m in attention["mods"]]
    mixed = {**sk, names[3]: full[names[3]], "emb": SigmaSketch(torch.zeros(7, 0), torch.zeros(7, 0), torch.rand(7))}
    p = tmp_path / "s.safetensors"
    cb.save_stats(p, mixed, {"tokens": 1200})
    got, meta = cb.load_stats(p)
    assert meta["version"] == 2 and meta["slots"] == ["sketch", "full", "sketch"] and meta["tokens"] == 1200
    assert got[names[0]] is got[names[1]] is got[names[2]]
    for k, v in mixed.items():
        if isinstance(v, SigmaSketch):
            assert all(torch.equal(a, b) for a, b in zip(got[k].tensors().values(), v.tensors().values()))
        else:
            assert torch.equal(got[k], v)
    # a version-1 file (full Σ only, embeddings possibly omitted) still loads
    old = tmp_path / "v1.safetensors"
    meta1 = {"format": "adaptzip-stats", "version": 1, "modules": {names[0]: 0, names[1]: 0}, "omitted": ["emb"]}
    save_file({"sigma.0": full[names[0]]}, str(old), metadata={"adaptzip-stats": json.dumps(meta1)})
    got1, _ = cb.load_stats(old)
    assert torch.equal(got1[names[1]], full[names[0]]) and got1[names[0]] is got1[names[1]]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.__setitem__("sketch.0.d", -t["sketch.0.d"] - 1), "d has negative entries"),
        (lambda t: t["sketch.0.L"].__setitem__((0, 0), float("nan")), "L has non-finite values"),
        (lambda t: t.pop("sketch.0.U"), "tensor sketch.0.U is missing"),
        (lambda t: t.__setitem__("sketch.0.U", 2 * t["sketch.0.U"]), "U does not have orthonormal columns"),
        (lambda t: t.__setitem__("sketch.0.d", t["sketch.0.d"][:-1].contiguous()), "do not agree"),
        (lambda t: t.__setitem__("sigma.1", t["sigma.1"][:-1].contiguous()), "expected a square matrix"),
        (lambda t: t["sigma.1"].__setitem__((2, 2), float("inf")), "Σ has non-finite values"),
    ],
)
def test_corrupt_stats_file_is_one_error_naming_file_and_module(attention, tmp_path, edit, message):
    full, sk = attention["full"], attention["sketch"]
    names = [m.name for m in attention["mods"]]
    p = tmp_path / "bad.safetensors"
    cb.save_stats(p, {**sk, names[3]: full[names[3]]}, {})
    _rewrite(p, edit)
    with pytest.raises(CalibrationError) as e:
        cb.load_stats(p)
    msg = str(e.value)
    assert message in msg and str(p) in msg and "\n" not in msg
    # without an adapter, modules are checked in the file's (sorted) order: k_proj first of q/k/v
    assert f"module {names[3] if 'sigma.1' in msg or 'Σ has' in msg else names[1]}:" in msg


def test_stats_for_other_shapes_refused(lora_fp32, tmp_path):
    ad = load_adapter(lora_fp32)
    m0 = ad.modules[0]
    stats = {
        m.name: SigmaSketch(torch.zeros(m.in_features, 1), torch.zeros(m.in_features, 0), torch.ones(m.in_features))
        for m in ad.modules
    }
    stats[m0.name] = SigmaSketch(torch.zeros(5, 1), torch.zeros(5, 0), torch.ones(5))
    p = tmp_path / "other.safetensors"
    cb.save_stats(p, stats, {})
    with pytest.raises(
        CalibrationError, match=rf"module {m0.name}: Σ has shape \(5, 5\), expected size {m0.in_features}"
    ):
        cb.load_stats(p, ad)


def test_same_seed_same_bytes(attention, tmp_path):
    mods, rows = attention["mods"], attention["rows"]
    g = torch.Generator().manual_seed(5)
    x1, x2 = torch.randn(200, 160, generator=g), torch.randn(200, 160, generator=g)
    feeds = [{0: x1, 1: x1, 2: x1, 3: x2}]
    files = []
    for seed in (0, 0, 1):
        stats, info = _run([cb.SigmaHooks(None, mods, 16, rows=rows, seed=seed)], feeds)[0]
        files.append(tmp_path / f"s{len(files)}.safetensors")
        cb.save_stats(files[-1], stats, info)
    a, b, c = (f.read_bytes() for f in files)
    assert a == b and a != c
