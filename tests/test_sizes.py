"""Sizes the user did not ask for: without --budget no form writes a container larger than the
lossless repack unasked, form defaults scale with the adapter, and a shared form that ends up
sharing nothing says so in plain words."""

from __future__ import annotations

import pytest
from clihelp import run_cli, run_json
from fixtures import FAST_FIT, one_torch_thread
from safetensors import safe_open

from adaptzip import api, load_adapter
from adaptzip.forms import REGISTRY, lossless_form
from adaptzip.options import RunOptions

_thread = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


@pytest.fixture(scope="module")
def rank2(make_lora):
    """A rank-2 LoRA: the BSLoRA defaults (built for rank-8+ adapters of 7B models) cannot beat it."""
    return make_lora("rank2", r=2, lora_alpha=4)


def _stored(path) -> int:
    """Bytes of a container's tensors (what the size check compares: headers differ by metrics)."""
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())


def _lossless_bytes(lora, tmp_path) -> int:
    return _stored(api.compress(lora, tmp_path / "lossless.safetensors", to=lossless_form().name).output)


def test_defaults_that_would_grow_the_file_are_refused(rank2, tmp_path):
    out = tmp_path / "ss.safetensors"
    code, stdout, err = run_cli("compress", rank2, "--to", "bslora-ss", "-o", out)
    limit = _lossless_bytes(rank2, tmp_path)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and err.startswith(f"adaptzip: error: {rank2}: the bslora-ss container would store ")
    assert (
        f"bytes of tensors, more than the lossless lora repack ({limit} bytes) with the form's default options" in err
    )
    assert "give --budget" in err and not out.exists()


def test_chosen_options_that_grow_the_file_are_said_loudly(rank2, tmp_path):
    r = run_json("compress", rank2, "--to", "bslora-ss", "--ranks", "2,4,32", "-o", tmp_path / "ss.safetensors")
    limit, stored = _lossless_bytes(rank2, tmp_path), _stored(r["output"])
    assert stored > limit
    assert r["warnings"] == [
        f"the bslora-ss container would store {stored} bytes of tensors, more than the lossless lora repack "
        f"({limit} bytes): give --budget to bound the size"
    ]
    code, _, err = run_cli(
        "compress", rank2, "--to", "bslora-ss", "--ranks", "2,4,32", "-o", tmp_path / "h.safetensors"
    )
    assert code == 0 and "more than the lossless lora repack" in err  # the human output says it too


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if not c.lossless))
def test_every_form_default_stays_below_the_lossless_repack(name, lora_fp32, tmp_path):
    """The regression: bslora-gt's absolute d_s = 1024 wrote 3.4× the source on a small adapter.
    Sizes do not depend on how long the fit runs: a few optimiser steps each."""
    opts = {"steps": 5, "refit_steps": 5} if name == "vblora" else {}
    r = api.compress(
        lora_fp32, tmp_path / "c.safetensors", to=name, run=RunOptions(force=True), fitting=FAST_FIT, **opts
    )
    assert _stored(r.output) <= _lossless_bytes(lora_fp32, tmp_path)  # svd at the source rank: equal
    assert r.warnings == []


def test_gate_width_scales_with_the_model(lora_fp32, tmp_path):
    r = api.compress(lora_fp32, tmp_path / "gt.safetensors", to="bslora-gt", fitting=FAST_FIT)
    width = min(m.in_features for m in load_adapter(lora_fp32).modules)
    assert r.state["shared_size"] == width // 4 == 16  # the paper's 1024 at width 4096, scaled
    assert r.to_json()["sharing_used"] is True


def test_sharing_dropped_by_the_budget_is_said_in_plain_words(lora_fp32, tmp_path):
    r = run_json("compress", lora_fp32, "--to", "bslora-gt", "--budget", "0.25", "-o", tmp_path / "gt.safetensors")
    assert r["state"]["r_intra"] == r["state"]["r_inter"] == 0
    assert r["sharing_used"] is False
    assert r["sharing"] == (
        "the budget left no room for the shared parts (intra/inter ranks 8/16 asked, halved to 0): a local-only "
        "container, i.e. the svd solution; raise --budget or lower --ranks"
    )
    code, _, err = run_cli(
        "compress", lora_fp32, "--to", "bslora-gt", "--budget", "0.25", "-o", tmp_path / "h.safetensors"
    )
    assert code == 0 and "not used" in err and "halved to 0" in err
    # forms that share always say how; forms without sharing say nothing
    m = run_json("compress", lora_fp32, "--to", "masa", "--budget", "0.25", "-o", tmp_path / "m.safetensors")
    assert m["sharing_used"] is True and m["sharing"] == "7 of 14 groups share their A across layers"
    s = run_json("compress", lora_fp32, "--budget", "0.25", "-o", tmp_path / "s.safetensors")
    assert "sharing_used" not in s
