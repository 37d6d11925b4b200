"""Adding a form is one file plus one registry line: a small form defined here, registered the way
forms/ registers its own, goes through the whole pipeline — its Config field becomes a CLI option,
``adaptzip forms`` lists it, compress (plain and quantised) → verify → expand → a real
``PeftModel.from_pretrained`` load — with nothing outside this file knowing its name."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from fixtures import load_base, one_torch_thread
from torch import nn

from adaptzip import linalg
from adaptzip.forms.base import REGISTRY, Form, register

NAME = "test-rank1"
TESTS = Path(__file__).resolve().parent
_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@dataclass
class Rank1Config:
    shrink: float = field(default=1.0, metadata={"help": "multiply each module's kept singular value by this"})

    def __post_init__(self):
        if not 0 < self.shrink <= 1:
            raise ValueError(f"shrink must be in (0, 1], got {self.shrink}")


class Rank1Form(Form):
    """ΔŴ_i = s_i · u_i v_iᵀ: the top singular direction of each module, its value times ``shrink``.
    Stored: ``u.{i}`` (out), ``v.{i}`` (in) and ``s`` (one value per module)."""

    name = NAME
    summary = "test: the top singular direction of each module"
    Config = Rank1Config

    def __init__(self, modules, config, us, vs, s):
        super().__init__(modules, config)
        self.u = nn.ParameterList([nn.Parameter(u.float()) for u in us])
        self.v = nn.ParameterList([nn.Parameter(v.float()) for v in vs])
        self.s = nn.Parameter(s.float())

    @classmethod
    def fit(cls, adapter, config, ctx):
        us, vs, ss = [], [], []
        for _, B, A in adapter.iter_factors():
            svd = linalg.factored_svd(B, A)
            us.append(svd.U[:, 0])
            vs.append(svd.Vh[0])
            ss.append(svd.S[0] * config.shrink)
        return cls(adapter.modules, config, us, vs, torch.stack(ss))

    @classmethod
    def tensor_specs(cls, modules, config, state):
        specs = {"s": ((len(modules),), None)}
        for i, m in enumerate(modules):
            specs[f"u.{i}"] = ((m.out_features,), None)
            specs[f"v.{i}"] = ((m.in_features,), None)
        return specs

    @classmethod
    def from_tensors(cls, modules, config, state, tensors):
        n = len(modules)
        return cls(
            modules, config, [tensors[f"u.{i}"] for i in range(n)], [tensors[f"v.{i}"] for i in range(n)], tensors["s"]
        )

    def factors(self, i):
        return (self.u[i] * self.s[i])[:, None], self.v[i][None, :]

    def tensors(self):
        out = {"s": self.s.detach()}
        for i in range(len(self.u)):
            out[f"u.{i}"] = self.u[i].detach()
            out[f"v.{i}"] = self.v[i].detach()
        return out


@pytest.fixture
def registered():
    register(Rank1Form)
    yield Rank1Form
    REGISTRY.pop(NAME)


def _cli_with_form(*commands: list[str]) -> list[tuple[int, str, str]]:
    """Run CLI commands in a fresh interpreter where the form is registered before the CLI is
    imported (as a form in forms/ is): its options must appear on the command line by themselves."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); from adaptzip.forms.base import register; "
        "from test_form_plugin import Rank1Form; register(Rank1Form); from clihelp import run_cli; "
        "print(json.dumps([run_cli(*c) for c in json.loads(sys.argv[2])]))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(TESTS), json.dumps(commands)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_form_defined_outside_forms_runs_the_whole_pipeline(registered, lora_fp32, llama_base, tmp_path):
    from peft import PeftModel

    from adaptzip import open_container
    from adaptzip.adapter import load_adapter

    plain, q8 = tmp_path / "r1.safetensors", tmp_path / "r1-int8.safetensors"
    res = _cli_with_form(
        ["forms", "--json"],
        ["compress", str(lora_fp32), "-o", str(plain), "--to", NAME, "--shrink", "0.5", "--json"],
        ["compress", str(lora_fp32), "-o", str(q8), "--to", NAME, "--quant", "int8", "--group-size", "16", "--json"],
        ["verify", str(plain), "--json"],
        ["verify", str(q8), "--json"],
        ["expand", str(plain), "--to", "peft", "-o", str(tmp_path / "peft"), "--json"],
        ["expand", str(q8), "--to", "dense", "-o", str(tmp_path / "dense.safetensors"), "--json"],
        ["compress", str(lora_fp32), "-o", str(tmp_path / "bad.safetensors"), "--to", NAME, "--shrink", "2"],
        ["compress", "--help"],
    )
    for code, _, err in res[:7]:
        assert code == 0, err
    listed = {f["name"]: f for f in json.loads(res[0][1])["forms"]}
    assert [o["name"] for o in listed[NAME]["options"]] == ["shrink"]
    assert listed[NAME]["exports"] == ["peft", "dense", "merged"]
    c_plain, c_q8 = json.loads(res[1][1]), json.loads(res[2][1])
    assert c_plain["form"] == NAME and c_plain["config"] == {"shrink": 0.5}
    assert c_q8["quant"]["scheme"] == "int8" and c_q8["quant"]["quantised_tensors"] > 0
    assert c_q8["bytes"] < c_plain["bytes"]  # fp32 floats stored as 8-bit codes (+ fp16 scales, more header)
    assert json.loads(res[3][1])["form"] == NAME
    code, _, err = res[7]
    assert code == 2 and err.strip() == f"adaptzip: error: form {NAME}: shrink must be in (0, 1], got 2.0"
    assert "--shrink" in res[8][1]

    # the stored values are the fit's: half the top singular value of every module
    ad = load_adapter(lora_fp32)
    form = open_container(plain).form()
    top = torch.stack([linalg.factored_svd(B, A).S[0] for _, B, A in ad.iter_factors()]).float()
    torch.testing.assert_close(form.s.detach(), 0.5 * top, rtol=1e-5, atol=0)

    # PEFT loads every module of the expanded adapter with exactly the form's update
    pm = PeftModel.from_pretrained(load_base(llama_base), tmp_path / "peft")
    layers = dict(pm.named_modules())
    for i, m in enumerate(ad.modules):
        lyr = layers[f"base_model.model.{m.name}"]
        got = lyr.scaling["default"] * lyr.lora_B["default"].weight @ lyr.lora_A["default"].weight
        B, A = form.factors(i)
        torch.testing.assert_close(got, (B @ A).detach(), rtol=1e-5, atol=1e-7)


def test_registered_form_through_the_python_api(registered, lora_fp32, tmp_path):
    from adaptzip import api, load_adapter
    from adaptzip.options import QuantOptions, RunOptions

    ad = load_adapter(lora_fp32)
    res = api.compress(lora_fp32, tmp_path / "a.safetensors", to=NAME, shrink=1.0, run=RunOptions(force=True))
    assert res.form == NAME
    assert res.stored_params == sum(m.in_features + m.out_features + 1 for m in ad.modules)
    # the top singular direction of each module: the error is what the spectra say it must be
    spectra = [linalg.factored_svd(B, A).S.double() for _, B, A in ad.iter_factors()]
    want = (sum(float((s[1:] ** 2).sum()) for s in spectra) / sum(float((s**2).sum()) for s in spectra)) ** 0.5
    assert res.rel_error == pytest.approx(want, rel=1e-4)
    assert res.metrics["svd_baseline_rel_error"] is not None  # compared with the baseline at the same bytes
    q = api.compress(lora_fp32, tmp_path / "b.safetensors", to=NAME, quant=QuantOptions("int4", 16))
    assert q.quant["scheme"] == "int4" and q.bytes < res.bytes
    assert NAME in [f["name"] for f in api.list_forms()]
