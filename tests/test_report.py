"""``adaptzip report``: every number equals a direct recomputation; charts and files are written."""

from __future__ import annotations

import json

import pytest
import torch
from clihelp import run_json
from fixtures import one_torch_thread

from adaptzip import api, budget, fit, report
from adaptzip import container as ct
from adaptzip.adapter import load_adapter
from adaptzip.errors import OptionError, OutputExists
from adaptzip.forms import FitContext
from adaptzip.options import FitOptions, QuantOptions

PNG = b"\x89PNG\r\n\x1a\n"


one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)  # tiny matrices: one thread


@pytest.fixture(scope="module")
def src(make_lora):
    """A trained r=8 LoRA of the tiny Llama (trained here, under one thread)."""
    return make_lora("report_src", seed=3)


@pytest.fixture(scope="module")
def containers(src, tmp_path_factory):
    d = tmp_path_factory.mktemp("rep")
    api.compress(src, d / "svd25.safetensors", to="svd", budget=0.25)
    api.compress(src, d / "svd50.safetensors", to="svd", budget=0.5)
    api.compress(src, d / "lora16.safetensors", to="lora", fitting=FitOptions(dtype="fp16"))
    return d


def test_report_against_source_equals_recomputation(containers, src, tmp_path):
    paths = [containers / n for n in ("svd25.safetensors", "svd50.safetensors", "lora16.safetensors")]
    res = report.report(paths, against=src, out=tmp_path / "r")
    ad = load_adapter(src)
    fp16 = sum(m.rank * (m.in_features + m.out_features) for m in ad.modules) * 2
    for p, r in zip(paths, res["containers"]):
        c = ct.open_container(p)
        form = c.form()
        ev = fit.evaluate(form, ad, FitContext())
        size = p.stat().st_size
        assert r["bytes"] == size and r["effective_bytes"] == size
        assert r["ratio_source"] == pytest.approx(size / ad.bytes)
        assert r["fp16_lora_bytes"] == fp16 and r["ratio_fp16_lora"] == pytest.approx(size / fp16)
        assert r["params"]["source"] == ad.n_params and r["params"]["stored"] == form.float_params()
        assert r["rel_error"] == pytest.approx(ev.rel_error, rel=1e-9)
        if c.dtype == torch.float32:  # the manifest's claim holds (fp16: rounding the claim may not include)
            assert r["rel_error"] == pytest.approx(c.manifest["metrics"]["rel_error"], rel=1e-5, abs=1e-7)
        else:
            assert 0 < r["rel_error"] < 1e-3
        got = {m["name"]: m["rel_error"] for m in r["modules"]}
        assert got == pytest.approx({m.name: e for m, e in zip(ad.modules, ev.module_rel_errors)}, rel=1e-9)
        errs = [m["rel_error"] for m in r["modules"]]
        assert errs == sorted(errs, reverse=True)  # worst first
        base, bsize = budget.svd_baseline(ad, size, c.dtype, FitContext())
        assert r["svd_baseline_bytes"] == bsize
        assert r["svd_baseline_rel_error"] == pytest.approx(fit.evaluate(base, ad, FitContext()).rel_error, rel=1e-9)
        assert len(r["spectra"]) == 4
        sp = r["spectra"][0]
        i = next(j for j, m in enumerate(ad.modules) if m.name == sp["module"])
        B, A = ad.factors(ad.modules[i])
        assert sp["source"] == pytest.approx(
            torch.linalg.svdvals((B @ A).double()).tolist()[: len(sp["source"])], rel=1e-4, abs=1e-7
        )
    # svd at 25% is worse than at 50%; the lossless repack is best; the recomputed svd curve is monotone
    e = [r["rel_error"] for r in res["containers"]]
    assert e[2] < e[1] < e[0]
    curve = next(iter(res["sources"].values()))["svd_curve"]
    assert [c["rel_error"] for c in sorted(curve, key=lambda c: c["bytes"])] == sorted(
        (c["rel_error"] for c in curve), reverse=True
    )
    # files: report.md embeds every PNG, report.json holds the same numbers
    files = res["files"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert len(files["images"]) == 3 * 2 + 1
    for img in files["images"]:
        assert (tmp_path / "r" / img).read_bytes()[:8] == PNG
        assert f"]({img})" in md
    js = json.loads((tmp_path / "r" / "report.json").read_text())
    assert [c["rel_error"] for c in js["containers"]] == pytest.approx(e)
    assert js["containers"][0]["modules"][0] == res["containers"][0]["modules"][0]
    with pytest.raises(OutputExists, match=r"exists \(use --force to replace it\)"):
        report.report(paths[:1], out=tmp_path / "r")


def test_report_from_manifest_metrics_and_accuracy(containers, src, tmp_path):
    """Without --against: numbers come from the manifest; accuracy metrics (as calibration writes
    them) are shown."""
    ad = load_adapter(src)
    form = ct.open_container(containers / "svd25.safetensors").form()
    ev = fit.evaluate(form, ad, FitContext())
    extra = {
        **ev.to_json(),
        "module_rel_errors": ev.module_rel_errors,
        "kl_before": 0.0123,
        "kl_after": 0.0061,
        "top1_agreement": 0.93,
        "improvement_kept": 0.97,
        "svd_baseline_kl_after": 0.0088,
    }
    tensors, man = ct.build(form, ad, torch.float32, metrics=extra, command="test")
    p = tmp_path / "calibrated.safetensors"
    ct.write(p, tensors, man)
    res = report.report([p], out=tmp_path / "r")
    r = res["containers"][0]
    assert r["errors_from"] == "manifest" and r["rel_error"] == extra["rel_error"]
    assert {m["name"]: m["rel_error"] for m in r["modules"]} == {
        m.name: e for m, e in zip(ad.modules, ev.module_rel_errors)
    }
    assert r["accuracy"] == {
        "kl_before": 0.0123,
        "kl_after": 0.0061,
        "top1_agreement": 0.93,
        "improvement_kept": 0.97,
        "svd_baseline_kl_after": 0.0088,
    }
    assert r["storage"] is None
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| kl_after | 0.0061 |" in md
    # compress stores per-module errors: report shows them from the manifest as they were measured
    plain = report.report([containers / "svd25.safetensors"])["containers"][0]
    stored = ct.open_container(containers / "svd25.safetensors").manifest["metrics"]["module_rel_errors"]
    assert sorted(m["rel_error"] for m in plain["modules"]) == pytest.approx(sorted(stored), rel=1e-12)


def test_report_refuses_a_wrong_source_and_cli_json(containers, make_lora):
    other = make_lora("report_other", seed=7)
    with pytest.raises(OptionError, match="is not the source"):
        report.report([containers / "svd25.safetensors"], against=other)
    js = run_json("report", containers / "svd25.safetensors", containers / "lora16.safetensors")  # exit code 0
    assert [c["form"] for c in js["containers"]] == ["svd", "lora"]
    assert js["containers"][0]["bytes"] == (containers / "svd25.safetensors").stat().st_size


def test_report_bit_allocation_of_a_quantised_container(src, tmp_path):
    """A container written with --quant: the storage section's bits are counted per tensor and value."""
    p = tmp_path / "q.safetensors"
    api.compress(src, p, to="svd", budget=0.25, quant=QuantOptions("int4"))
    c = ct.open_container(p)
    st = c.manifest["storage"]
    r = report.report([p], against=src, out=tmp_path / "r")["containers"][0]
    assert r["storage"]["scheme"] == st["scheme"] and r["storage"]["tensors"] == len(st["tensors"])
    specs = {
        k: v for k, v in report.get_form("svd").tensor_specs(c.modules, c.form().config, c.manifest["state"]).items()
    }
    want: dict[str, int] = {}
    for name, t in st["tensors"].items():
        n = 1
        for d in specs[name][0]:
            n *= d
        if isinstance(t["bits"], list):
            for b in t["bits"]:
                want[str(b)] = want.get(str(b), 0) + n // len(t["bits"])
        else:
            want[str(t["bits"])] = want.get(str(t["bits"]), 0) + n
    assert r["storage"]["values_by_bits"] == want
    assert r["rel_error"] == pytest.approx(fit.evaluate(c.form(), load_adapter(src), FitContext()).rel_error)
    assert "Bit allocation (`int4`" in (tmp_path / "r" / "report.md").read_text()
