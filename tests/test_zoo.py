"""Batch conversion of adapter zoos: discovery, failure isolation, resumability, kills, zoo sharing."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from clihelp import run_cli
from fixtures import one_torch_thread, train_lora

from adaptzip import api, fit, linalg, zoo
from adaptzip import container as ct
from adaptzip.adapter import load_adapter
from adaptzip.errors import AdaptzipError, ContainerError, OptionError
from adaptzip.forms import FitContext
from adaptzip.options import CalibrationOptions, FitOptions, QuantOptions
from adaptzip.zoo.run import settle

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)  # tiny matrices: one thread (training too)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def messy_zoo(tmp_path_factory, make_lora) -> Path:
    """4 good adapters (two named ``a`` at different depths), a corrupt one, an unsupported one
    (peft_type PREFIX_TUNING), a symlink to an adapter outside the zoo, and a plain folder."""
    root = tmp_path_factory.mktemp("zoo")
    z = root / "zoo"
    a1, a2 = make_lora("zoo_a1", seed=1), make_lora("zoo_a2", seed=2)
    _copy(a1, z / "a")
    _copy(a2, z / "team" / "a")
    _copy(a1, z / "team" / "b")
    _copy(a2, z / "c")
    bad = _copy(a1, z / "corrupt")
    (bad / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    pre = _copy(a1, z / "prefix")
    cfg = json.loads((pre / "adapter_config.json").read_text())
    cfg["peft_type"] = "PREFIX_TUNING"
    (pre / "adapter_config.json").write_text(json.dumps(cfg))
    outside = _copy(a2, root / "elsewhere" / "ext")
    os.symlink(outside, z / "outside")
    (z / "notes").mkdir()
    (z / "notes" / "README.txt").write_text("not an adapter")
    return z


def test_batch_converts_good_reports_bad_and_resumes(messy_zoo, tmp_path, one_thread):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        "batch", messy_zoo, "-o", out, "--to", "svd", "--budget", "0.3", "--jobs", "2", "--json"
    )
    assert code == 1, stderr
    s = json.loads(stdout)
    rows = {r["adapter"]: r for r in s["adapters"]}
    assert s["counts"] == {"converted": 4, "failed": 3}
    # with --json, stderr holds one house error line per failed adapter, naming the file at fault
    assert sorted(stderr.splitlines()) == sorted(
        f"adaptzip: error: {where}: {rows[a]['error']}"
        for a, where in (
            ("corrupt", messy_zoo / "corrupt" / "adapter_model.safetensors"),
            ("outside", messy_zoo / "outside"),
            ("prefix", messy_zoo / "prefix" / "adapter_config.json"),
        )
    )
    assert {k for k, r in rows.items() if r["status"] == "converted"} == {"a", "team/a", "team/b", "c"}
    assert "corrupt" in rows["corrupt"]["error"] or "truncated" in rows["corrupt"]["error"]
    assert "PREFIX_TUNING" in rows["prefix"]["error"] and "not supported" in rows["prefix"]["error"]
    assert "outside the zoo" in rows["outside"]["error"]
    assert "notes" not in rows
    # the mirrored layout; the two adapters named "a" do not collide; nothing written for the bad ones
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.safetensors"))
    assert written == ["a.safetensors", "c.safetensors", "team/a.safetensors", "team/b.safetensors"]
    for rel, r in rows.items():
        if r["status"] != "converted":
            continue
        c = ct.open_container(out / r["output"])
        c.verify()
        assert r["bytes"] == (out / r["output"]).stat().st_size
        assert r["ratio"] == pytest.approx(r["bytes"] / r["source_bytes"])
        assert r["bytes"] <= 0.3 * r["source_bytes"]
        assert r["rel_error"] == pytest.approx(c.manifest["metrics"]["rel_error"])
        assert 0 < r["svd_baseline_rel_error"] < 1
        assert c.manifest["source"]["sha256"] == load_adapter(messy_zoo / rel).sha256
        assert zoo.stamped_options(c.manifest["command"]) == s["options_sha256"]
    assert s["totals"]["container_bytes"] == sum(r["bytes"] for r in rows.values() if r["status"] == "converted")
    summary = json.loads((out / "batch.json").read_text())
    assert summary["counts"] == s["counts"]
    md = (out / "batch.md").read_text()
    assert "| team/a |" in md and "PREFIX_TUNING" in md
    assert not list(out.rglob("*.tmp"))

    # rerun: every good container is up to date and left untouched
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    code, stdout, _ = run_cli("batch", messy_zoo, "-o", out, "--to", "svd", "--budget", "0.3", "--jobs", "1", "--json")
    s2 = json.loads(stdout)
    assert code == 1 and s2["counts"] == {"skipped": 4, "failed": 3}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes

    # a changed source is redone, the others are not; other options redo all; --force redoes all
    src_b = messy_zoo / "team" / "b" / "adapter_model.safetensors"
    saved = src_b.read_bytes()
    try:
        shutil.copy(messy_zoo / "c" / "adapter_model.safetensors", src_b)
        code, stdout, _ = run_cli("batch", messy_zoo, "-o", out, "--budget", "0.3", "--jobs", "1", "--json")
        r3 = {r["adapter"]: r["status"] for r in json.loads(stdout)["adapters"]}
        assert r3["team/b"] == "converted" and r3["a"] == r3["c"] == r3["team/a"] == "skipped"
    finally:
        src_b.write_bytes(saved)
    code, stdout, _ = run_cli("batch", messy_zoo, "-o", out, "--budget", "0.2", "--jobs", "1", "--json")
    assert json.loads(stdout)["counts"] == {"converted": 4, "failed": 3}
    code, stdout, _ = run_cli("batch", messy_zoo, "-o", out, "--budget", "0.2", "--jobs", "1", "--json", "--force")
    assert json.loads(stdout)["counts"] == {"converted": 4, "failed": 3}


def test_batch_usage_errors_exit_2(messy_zoo, tmp_path):
    code, _, err = run_cli("batch", tmp_path / "nope", "-o", tmp_path / "o")
    assert code == 2 and "no such folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli("batch", messy_zoo, "-o", tmp_path / "o", "--opt", "bogus=1")
    assert code == 2 and "has no option 'bogus'" in err
    code, _, err = run_cli("batch", messy_zoo, "-o", messy_zoo.parent, "--jobs", "1")
    assert code == 2 and "must not contain the zoo" in err
    code, _, err = run_cli("batch", messy_zoo, "-o", tmp_path / "o", "--jobs", "0")
    assert code == 2 and "--jobs 0" in err


def test_output_paths_never_escape(tmp_path, make_lora):
    out = tmp_path / "out"
    out.mkdir()
    assert zoo.output_for(out, "team/a", "z") == (out / "team" / "a.safetensors", None)
    assert zoo.output_for(out, "", "myzoo")[0] == out / "myzoo.safetensors"
    for rel, why in [
        ("../x", "not allowed"),
        ("a/../../x", "not allowed"),
        ("_shared/x", "reserved"),
        ("batch.json/x", "reserved"),
        ("m.safetensors/x", "clash"),
        ("a\nb", "control characters"),
    ]:
        o, msg = zoo.output_for(out, rel, "z")
        assert o is None and why in msg, (rel, msg)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, out / "linked")
    o, msg = zoo.output_for(out, "linked/a", "z")
    assert o is None and "symlink" in msg
    # discovery: a symlink inside the zoo is not followed twice; hidden folders are skipped
    z = tmp_path / "z"
    _copy(make_lora("zoo_a1", seed=1), z / "real")
    os.symlink(z / "real", z / "alias")
    _copy(make_lora("zoo_a1", seed=1), z / ".hidden" / "x")
    found = list(zoo.discover(z))
    assert [(f.rel, f.status, f.problem is None) for f in found] == [
        ("alias", "ignored", False),
        ("real", "adapter", True),
    ]


def _containers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.safetensors") if zoo.SHARED_DIR not in p.parts]


def _summary_is_the_disk(s: dict, z: Path, out: Path) -> None:
    """Every adapter of the zoo once, and its status what is on disk: converted/skipped exactly
    when its container is there, verifies and carries this run's stamp; interrupted when not."""
    rows = {r["adapter"]: r for r in s["adapters"]}
    assert len(rows) == len(s["adapters"]) == len(list(z.rglob("adapter_config.json")))
    for rel, r in rows.items():
        c = out / f"{rel}.safetensors"
        if r["status"] in ("converted", "skipped"):
            ct.open_container(c).verify()
            assert zoo.stamped_options(ct.open_container(c).manifest["command"]) == s["options_sha256"]
            assert r["bytes"] == c.stat().st_size and r["ratio"] == pytest.approx(r["bytes"] / r["source_bytes"])
        else:
            assert r["status"] == "interrupted" and not c.exists(), rel


def test_batch_killed_midway_then_finished(tmp_path, make_lora):
    """SIGINT to the CLI (a subprocess), then SIGTERM to an in-process batch with a worker pool:
    each stops with exit 130 / interrupted, leaves only whole containers, and a rerun finishes."""
    src = make_lora("zoo_a1", seed=1)
    z = tmp_path / "zoo"
    for i in range(16):
        _copy(src, z / f"g{i // 8}" / f"ad{i:02d}")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "adaptzip.cli",
        "batch",
        str(z),
        "-o",
        str(out),
        "--budget",
        "0.25",
        "--json",
        "--jobs",
        "1",
    ]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out.is_dir() and _containers(out)):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no container appeared"
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert err.endswith(
        "adaptzip: interrupted (finished containers are kept; rerun the same command to convert the rest)\n"
    )
    first = {q: q.stat().st_mtime_ns for q in _containers(out)}
    assert 1 <= len(first) < 16
    assert not list(out.rglob("*.tmp"))
    for q in first:
        ct.open_container(q).verify()
    s = json.loads((out / "batch.json").read_text())
    assert s == {**json.loads(stdout), "seconds": s["seconds"]}
    assert s["interrupted"] is True and s["counts"] == {"converted": len(first), "interrupted": 16 - len(first)}
    _summary_is_the_disk(s, z, out)

    # SIGTERM to this process while its pool converts: the batch's own handler takes it
    sent = []

    def killer():
        while not sent and time.monotonic() < deadline + 120:
            if len(_containers(out)) > len(first):
                os.kill(os.getpid(), signal.SIGTERM)
                sent.append(time.monotonic())
            time.sleep(0.01)

    old = signal.signal(signal.SIGTERM, lambda *a: None)  # in case it lands after the batch ended
    try:
        import threading

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        s = zoo.batch(z, out, budget=0.25, jobs=2)
        sent.append(0)
        t.join()
    finally:
        signal.signal(signal.SIGTERM, old)
    second = set(_containers(out))
    assert s["interrupted"] is True and len(first) < len(second) < 16
    assert s["counts"] == {
        "skipped": len(first),
        "converted": len(second) - len(first),
        "interrupted": 16 - len(second),
    }
    _summary_is_the_disk(s, z, out)
    assert not list(out.rglob("*.tmp"))

    s = zoo.batch(z, out, budget=0.25, jobs=1)
    assert s["interrupted"] is False and s["failed"] == 0
    assert s["counts"] == {"converted": 16 - len(second), "skipped": len(second)}
    assert len(_containers(out)) == 16 and not list(out.rglob("*.tmp"))
    for q, t_ns in first.items():  # finished containers were never rewritten
        assert q.stat().st_mtime_ns == t_ns
    for q in _containers(out):
        ct.open_container(q).verify()


# ------------------------------------------------------------------ zoo-level shared basis
def _train_zoo(base: Path, root: Path, same_init: bool, n: int = 6) -> Path:
    for k in range(n):  # lr 5e-3: A moves little from its initialisation, as in real LoRA training
        train_lora(base, root / f"ad{k}", init_seed=0 if same_init else 100 + k, data_seed=k, lr=5e-3)
    return root


def _energy_weighted(paths: list[Path], sources: list[Path]) -> tuple[int, float]:
    """Total bytes (shared files counted once) and sqrt(Σ err²/Σ‖ΔW‖²) recomputed from the sources."""
    num = den = 0.0
    total = 0
    shared = set()
    for p, s in zip(paths, sources):
        c = ct.open_container(p)
        ad = load_adapter(s)
        tg = fit.targets(ad, FitContext())
        n2 = sum(t.norm2 for t in tg)
        e = fit.evaluate(c.form(), ad, FitContext()).rel_error
        num += e * e * n2
        den += n2
        total += p.stat().st_size
        if c.shared_path is not None:
            shared.add(c.shared_path)
    return total + sum(q.stat().st_size for q in shared), math.sqrt(num / den)


@pytest.fixture(scope="module")
def zoos(llama_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("shzoo")
    return _train_zoo(llama_base, root / "same", True), _train_zoo(llama_base, root / "diff", False)


def test_shared_basis_pays_for_a_same_init_zoo(zoos, tmp_path, one_thread):
    same, _ = zoos
    sep = zoo.batch(same, tmp_path / "sep", budget=0.25, jobs=1)
    sh = zoo.batch(same, tmp_path / "sh", budget=0.25, jobs=1, shared_basis=True)
    g = sh["sharing"]["groups"][0]
    assert g["adapters"] == 6 and g["decision"] == "shared", g
    assert g["overlap"] > 0.8 > 0.2 > g["overlap_random"]
    # one init seed shares A only: LoRA starts B at zero, so B's column spaces are near the random level
    assert g["overlap_random"] < g["overlap_out_random"] < g["overlap_out"] < 0.5 * g["overlap"]
    srcs = [same / f"ad{k}" for k in range(6)]
    b_sep, e_sep = _energy_weighted([tmp_path / "sep" / f"ad{k}.safetensors" for k in range(6)], srcs)
    b_sh, e_sh = _energy_weighted([tmp_path / "sh" / f"ad{k}.safetensors" for k in range(6)], srcs)
    assert b_sh < b_sep and e_sh <= e_sep + 1e-9, (b_sh, b_sep, e_sh, e_sep)
    assert b_sep == sep["totals"]["zoo_bytes"] == g["separate"]["bytes"]
    assert b_sh == sh["totals"]["zoo_bytes"] == g["shared"]["bytes"]
    assert e_sh == pytest.approx(g["shared"]["rel_error"], rel=1e-6)
    assert g["estimate"]["shared_rel_error_at_equal_bytes"] < e_sep  # at the same bytes sharing is also better
    assert sh["counts"] == {"shared": 6}
    shared_files = list((tmp_path / "sh" / zoo.SHARED_DIR).iterdir())
    assert len(shared_files) == 1 and shared_files[0].name == f"{ct.file_sha256(shared_files[0])}.safetensors"

    # a shared container is an svd container whose A comes from the shared file: verify, form, expand
    c = ct.open_container(tmp_path / "sh" / "ad0.safetensors")
    assert c.verify()["shared"] == str(shared_files[0].absolute())
    ad = load_adapter(srcs[0])
    assert fit.evaluate(c.form(), ad, FitContext()).rel_error == pytest.approx(
        c.manifest["metrics"]["rel_error"], rel=1e-6
    )
    api.expand(c.path, tmp_path / "peft0")
    back = load_adapter(tmp_path / "peft0")
    f = c.form()
    exported = {m.name: m for m in back.modules}  # modules fitted at rank 0 are left out of the export
    for i, m in enumerate(c.modules):
        Bc, Ac = f.factors(i)
        if m.name not in exported:
            assert Ac.shape[0] == 0
            continue
        B, A = back.factors(exported[m.name])
        assert torch.allclose(B @ A, (Bc @ Ac).detach(), atol=1e-6)

    # rerun: all up to date, nothing rewritten
    mt = {p: p.stat().st_mtime_ns for p in (tmp_path / "sh").rglob("*.safetensors")}
    again = zoo.batch(same, tmp_path / "sh", budget=0.25, jobs=1, shared_basis=True)
    assert again["counts"] == {"skipped": 6} and again["sharing"]["groups"][0]["decision"] == "shared"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sh").rglob("*.safetensors")} == mt

    # the shared file is hash-checked, and its absence is named
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "sh", moved)
    data = bytearray(shared_files[0].read_bytes())
    data[-1] ^= 0xFF
    (moved / zoo.SHARED_DIR / shared_files[0].name).write_bytes(bytes(data))
    with pytest.raises(ContainerError, match="modified or corrupted"):
        api.verify(moved / "ad1.safetensors")
    shutil.rmtree(moved / zoo.SHARED_DIR)
    with pytest.raises(ContainerError, match=r"shared file _shared/[0-9a-f]{64}\.safetensors .* is missing"):
        api.expand(moved / "ad1.safetensors", tmp_path / "peft1")
    # without --shared-basis a rerun converts them back into separate containers
    back_sep = zoo.batch(same, tmp_path / "sh", budget=0.25, jobs=1)
    assert back_sep["counts"] == {"converted": 6} and back_sep["totals"]["shared_bytes"] == 0


def test_shared_basis_not_worth_it_for_different_inits(zoos, tmp_path, one_thread):
    _, diff = zoos
    sh = zoo.batch(diff, tmp_path / "sh", budget=0.25, jobs=1, shared_basis=True)
    g = sh["sharing"]["groups"][0]
    assert g["decision"] == "separate" and g["shared"] is None, g
    assert g["overlap"] < 0.25  # ≈ r/in for unrelated random subspaces
    assert g["overlap"] == pytest.approx(g["overlap_random"], abs=0.05)
    assert g["overlap_out"] == pytest.approx(g["overlap_out_random"], abs=0.15)
    assert g["estimate"]["shared_rel_error_at_equal_bytes"] > g["separate"]["rel_error"]
    assert g["estimate"]["shared_bytes_at_equal_error"] > g["separate"]["bytes"]
    assert sh["counts"] == {"converted": 6} and sh["totals"]["shared_bytes"] == 0
    assert not (tmp_path / "sh" / zoo.SHARED_DIR).exists()


def test_module_basis_matches_dense_svd():
    """The factored stacked basis equals the SVD of the dense stack, in both code paths."""
    g = torch.Generator().manual_seed(0)
    n_in, out = 12, 5
    for r, n in [(2, 3), (4, 5)]:  # Σr ≤ in (QR path) and Σr > in (Gram path)
        facs = [(torch.randn(out, r, generator=g), torch.randn(r, n_in, generator=g)) for _ in range(n)]
        b = linalg.module_basis(facs, n_in)
        dense = torch.cat([B.double() @ A.double() for B, A in facs], 0)
        S = torch.linalg.svdvals(dense)
        k = min(len(S), len(b.lam))
        assert torch.allclose(b.lam[:k].sqrt(), S[:k], rtol=1e-6, atol=1e-8)
        top = b.V[:3]
        Vd = torch.linalg.svd(dense, full_matrices=False).Vh[:3]
        assert torch.allclose(top.T @ top, Vd.T @ Vd, atol=1e-6)  # same subspace
        assert b.norms == pytest.approx([float((B.double() @ A.double()).pow(2).sum()) for B, A in facs])
        streamed = linalg.module_basis(iter(facs), n_in, total_rank=r * n)  # one adapter at a time when Σr > in
        assert torch.allclose(streamed.lam[:k], b.lam[:k], rtol=1e-9, atol=1e-9) and streamed.overlap == pytest.approx(
            b.overlap
        )
        # the B side: the mean pairwise cos² of the column spaces, pair by pair
        qb = [linalg.orth_rows(B.double().T) for B, _ in facs]
        pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
        direct = sum(float((qb[i] @ qb[j].T).pow(2).sum()) for i, j in pairs) / sum(
            min(qb[i].shape[0], qb[j].shape[0]) for i, j in pairs
        )
        assert b.overlap_out == pytest.approx(direct, rel=1e-9) and streamed.overlap_out == pytest.approx(
            direct, rel=1e-9
        )
    # out > in on the streamed path: the out×out Gram would outgrow the in×in one, so B is not measured
    wide = [(torch.randn(2 * n_in, 4, generator=g), torch.randn(4, n_in, generator=g)) for _ in range(4)]
    assert math.isnan(linalg.module_basis(iter(wide), n_in, total_rank=16).overlap_out)
    assert linalg.module_basis(wide, n_in).overlap_out == pytest.approx(4 / (2 * n_in), abs=0.15)
    # identical row spaces → overlap 1; the pairwise normaliser
    A = torch.randn(3, n_in, generator=g)
    same = linalg.module_basis(
        [(torch.randn(out, 3, generator=g), torch.randn(3, 3, generator=g) @ A) for _ in range(4)], n_in
    )
    assert same.overlap == pytest.approx(1.0, abs=1e-6)
    # identical column spaces → B-overlap 1, whatever the A side
    Bc = torch.randn(out, 3, generator=g)
    col = linalg.module_basis(
        [(Bc @ torch.randn(3, 3, generator=g), torch.randn(3, n_in, generator=g)) for _ in range(4)], n_in
    )
    assert col.overlap_out == pytest.approx(1.0, abs=1e-6) and col.overlap < 0.9
    assert linalg._sum_pair_min([2, 3, 3]) == 2 * (2 + 2 + 3)


def test_allocate_to_a_target_is_the_smallest_greedy_prefix():
    """The zoo's shared ranks: the smallest greedy prefix whose residual 23 − gain is ≤ the target."""
    lams = [torch.tensor([9.0, 4.0, 1.0]), torch.tensor([8.0, 1.0])]
    assert linalg.allocate(lams, [1.0, 2.0], target_gain=23.0 - 23.0) == [0, 0]
    assert linalg.allocate(lams, [1.0, 2.0], target_gain=23.0 - 10.0) == [2, 0]  # 9/1, then 4/1 beats 8/2
    assert linalg.allocate(lams, [1.0, 2.0], target_gain=23.0 - 0.0) == [3, 2]
    assert linalg.allocate(lams, [1.0, 2.0], target_gain=23.0 - -1.0) is None


def test_options_are_checked_before_any_work(messy_zoo, tmp_path):
    with pytest.raises(OptionError, match="no option 'nope'"):
        zoo.batch(messy_zoo, tmp_path / "o", options={"nope": 1})
    with pytest.raises(OptionError, match="--executor"):
        zoo.batch(messy_zoo, tmp_path / "o", executor="dask")
    with pytest.raises(AdaptzipError, match="budget"):
        zoo.batch(messy_zoo, tmp_path / "o", budget="lots")
    assert not (tmp_path / "o").exists()
    for kw in (
        {"calibration": CalibrationOptions(base_model=tmp_path, calib=tmp_path / "t.txt")},
        {"quant": QuantOptions("int8")},
    ):
        with pytest.raises(OptionError, match="--shared-basis fits in weight space"):
            zoo.batch(messy_zoo, tmp_path / "o", shared_basis=True, **kw)
    assert not (tmp_path / "o").exists()


def test_batch_without_budget(make_lora, tmp_path):
    """No --budget: each adapter at its form's own configuration; the summary still writes."""
    z = tmp_path / "z"
    _copy(make_lora("zoo_a1", seed=1), z / "a")
    s = zoo.batch(z, tmp_path / "o", options={"rank": 2}, jobs=1)
    assert s["counts"] == {"converted": 1} and s["options"].get("budget") is None
    assert "budget `None`" in (tmp_path / "o" / "batch.md").read_text()


def test_clusters_split_a_mixed_zoo(zoos):
    """Same-seed adapters cluster together; each own-seed adapter stays alone."""
    same, diff = zoos
    ads = [load_adapter(same / f"ad{k}") for k in range(6)] + [load_adapter(diff / f"ad{k}") for k in range(6)]
    order = [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]  # interleaved: the result must not depend on order
    cl = zoo.cluster_by_overlap([ads[i] for i in order])
    assert sorted(map(sorted, cl)) == [[0, 2, 4, 6, 8, 10], [1], [3], [5], [7], [9], [11]]


def test_settle_reads_the_disk(make_lora, tmp_path):
    """The row of a job that gave none (interrupted, cancelled, its worker gone, not reached) is
    what is on disk: converted when this run wrote an up-to-date container, skipped when it was
    up to date before (not with --force), interrupted otherwise."""
    z = tmp_path / "z"
    _copy(make_lora("zoo_a1", seed=1), z / "a")
    _copy(make_lora("zoo_a2", seed=2), z / "b")
    out = tmp_path / "o"
    s = zoo.batch(z, out, budget=0.25, jobs=1)
    (out / "b.safetensors").unlink()
    rows = {r["adapter"]: r for r in s["adapters"]}

    def job(rel: str, force: bool = False) -> zoo.Job:
        return zoo.Job(
            rel=rel,
            src=str(z / rel),
            out=str(out / f"{rel}.safetensors"),
            out_rel=f"{rel}.safetensors",
            to="svd",
            budget=0.25,
            options={},
            fitting=FitOptions(),
            calibration=None,
            quant=QuantOptions(),
            force=force,
            digest=s["options_sha256"],
            command=None,
            shared_basis=False,
        )

    mtime = (out / "a.safetensors").stat().st_mtime_ns
    now = settle(job("a"), since_ns=mtime)
    assert now["status"] == "converted" and now["bytes"] == rows["a"]["bytes"] == (out / "a.safetensors").stat().st_size
    assert now["ratio"] == pytest.approx(rows["a"]["ratio"]) and now["rel_error"] == pytest.approx(
        rows["a"]["rel_error"]
    )
    assert settle(job("a"), since_ns=mtime + 1)["status"] == "skipped"
    assert settle(job("a", force=True), since_ns=mtime + 1)["status"] == "interrupted"
    assert settle(job("b"), since_ns=0)["status"] == "interrupted"  # no container
    assert settle(replace(job("a"), digest="0" * 64), since_ns=0)["status"] == "interrupted"  # other options


def test_batch_table_keeps_the_names(messy_zoo, tmp_path):
    """At 80 columns (a pipe, a small terminal) and 60, the table keeps the adapter names and the
    statuses (folded when long) and leaves out the least useful columns."""
    import io

    from rich.console import Console

    from adaptzip.cli import batch_table

    s = zoo.batch(messy_zoo, tmp_path / "o", budget=0.3, jobs=1)
    every = ["adapter", "source bytes", "container bytes", "ratio", "error", "svd-baseline error", "time", "status"]
    for width, dropped in (
        (200, []),
        (80, ["source bytes", "time"]),
        (60, ["source bytes", "svd-baseline error", "time"]),
    ):
        con = Console(width=width, file=io.StringIO(), force_terminal=False)
        t = batch_table(s, width)
        assert [str(c.header) for c in t.columns] == [c for c in every if c not in dropped]
        con.print(t)
        lines = con.file.getvalue().splitlines()
        assert max(len(x) for x in lines) <= width
        first_cells = [x.split("│")[1].strip() for x in lines if x.startswith("│")]
        names = [r["adapter"] for r in s["adapters"]]
        assert [c for c in first_cells if c] == names  # every name, whole, in the first column
        text = " ".join(x.split("│")[-2].strip() for x in lines if x.startswith("│"))
        assert "failed: peft_type 'PREFIX_TUNING' is not supported" in " ".join(text.split())
