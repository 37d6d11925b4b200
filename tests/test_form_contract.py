"""The contract every registered form keeps with the container, checked over the whole form
registry (a new form is checked the day it registers): fit → write → verify → reopen gives the
same factors (exactly what was stored: the fitted tensors cast to their stored dtype); the form's
``tensor_specs`` are the written tensors (names, shapes, dtypes); and the predicted container size
(:func:`adaptzip.container.serialized_size`) is the written file's size, also when bf16 floats mix
with int8 codes and fp16 quantisation scales, checked against safetensors' own ``save_file``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import one_torch_thread, read_safetensors_raw, tiny_llama_adapter
from safetensors.torch import load_file, save_file

from adaptzip import api
from adaptzip import container as ct
from adaptzip.adapter import TORCH_DTYPES, load_adapter
from adaptzip.fileio import ST_DTYPE
from adaptzip.forms import REGISTRY, FitContext, make_config
from adaptzip.options import FitOptions, QuantOptions, RunOptions

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

# Small configurations, so that each form fits in a blink; a form not listed runs its defaults.
SMALL: dict[str, dict] = {
    "lora": {},
    "svd": {"rank": 3},
    "bslora-ss": {"ranks": (1, 2, 4), "steps": 3},
    "bslora-gt": {"ranks": (1, 2, 4), "shared_size": 8},
    "bslora-ke": {"ranks": (1, 2, 4), "shared_size": 8, "steps": 3},
    "masa": {"rank": 4, "group": 2},
    "joint": {"core": "diag"},
    "vblora": {"vector_len": 16, "bank": 32, "topk": 2, "steps": 3, "refit_steps": 3},
}
FORMS = sorted(REGISTRY)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """Two layers of three module shapes (64→64, 64→32, 96→64), rank 4, plus a carried tensor
    (a ``modules_to_save`` copy), which every form must store verbatim."""
    d = tiny_llama_adapter(
        tmp_path_factory.mktemp("contract") / "ad", layers=2, targets=("q_proj", "k_proj", "down_proj"), r=4
    )
    t = load_file(d / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(1)
    t["base_model.model.lm_head.modules_to_save.default.weight"] = torch.randn(8, 4, generator=g)
    save_file(t, d / "adapter_model.safetensors")
    return d


def test_every_small_config_names_a_registered_form():
    assert set(SMALL) <= set(REGISTRY), set(SMALL) - set(REGISTRY)


def _bits(t: torch.Tensor) -> tuple:
    t = t.detach().contiguous().cpu()
    return (t.dtype, tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")


def _spec_dtype(dt: torch.dtype | None, container_dtype: torch.dtype) -> torch.dtype:
    return container_dtype if dt is None else dt


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", FORMS)
def test_fit_write_verify_reopen(name, dtype, adapter_dir, tmp_path):
    cls = REGISTRY[name]
    dt = TORCH_DTYPES[dtype]
    ad = load_adapter(adapter_dir)
    form = cls.fit(ad, make_config(cls, SMALL.get(name, {})), FitContext(seed=0))
    tensors, manifest = ct.build(form, ad, dt)
    predicted = ct.serialized_size(tensors, manifest)
    path = tmp_path / f"{name}.safetensors"
    written = ct.write(path, tensors, manifest)
    assert written == predicted == path.stat().st_size

    c = ct.open_container(path)
    assert c.verify()["ok"] is True

    # tensor_specs are the written tensors: names, shapes, dtypes (carried tensors aside)
    header, _ = read_safetensors_raw(path)
    on_disk = {k: v for k, v in header.items() if k != "__metadata__" and not k.startswith("carry.")}
    specs = cls.tensor_specs(form.modules_info, form.config, form.state_info)
    assert set(specs) == set(on_disk)
    for n, (shape, sdt) in specs.items():
        assert on_disk[n]["shape"] == list(shape), n
        assert on_disk[n]["dtype"] == ST_DTYPE[_spec_dtype(sdt, dt)], n
    carried = {k: v for k, v in header.items() if k.startswith("carry.")}
    assert len(carried) == len(ad.carried) == 1

    # the stored tensors are the fitted ones cast to their stored dtype, bit for bit
    cast = {n: t.detach().to(_spec_dtype(specs[n][1], dt)) for n, t in form.tensors().items()}
    back = c.tensors(sorted(specs))
    assert {n: _bits(t) for n, t in back.items()} == {n: _bits(t) for n, t in cast.items()}
    for j, x in enumerate(c.carried):
        assert _bits(c.carried_tensor(j)) == _bits(ad.carried_tensor(x["key"]))

    # reopened, the form gives the factors of what was stored: exactly those of the cast tensors
    reopened = c.form()
    ref = cls.from_tensors(form.modules_info, form.config, form.state_info, cast)
    with torch.no_grad():
        for i, m in enumerate(form.modules_info):
            (B, A), (B0, A0), (Bf, Af) = reopened.factors(i), ref.factors(i), form.factors(i)
            assert torch.equal(B, B0) and torch.equal(A, A0), (name, m.name)
            d, d_fit = B.double() @ A.double(), Bf.double() @ Af.double()
            err = float((d - d_fit).norm() / d_fit.norm().clamp_min(1e-30))
            assert err <= (1e-6 if dtype == "fp32" else 2e-2), (name, m.name, err)

    if cls.lossless and dtype == "fp32":  # the source's own factors, bit for bit
        for (B, A, scale), m in zip(c.lora_factors(), ad.modules):
            assert _bits(B) == _bits(ad.lora_B(m.name)) and _bits(A) == _bits(ad.lora_A(m.name))
            assert scale == m.scale


@pytest.mark.parametrize("name", FORMS)
def test_predicted_size_with_bf16_floats_and_fp16_scales(name, adapter_dir, tmp_path):
    """--quant int8 with --dtype bf16: I8 codes and F16 scales beside BF16 floats. The predicted
    size is the file's, and the file is what safetensors' own save_file writes for its tensors
    and manifest."""
    out = tmp_path / "q.safetensors"
    res = api.compress(
        adapter_dir,
        out,
        to=name,
        fitting=FitOptions(dtype="bf16", baseline=False),
        quant=QuantOptions("int8"),
        run=RunOptions(),
        **SMALL.get(name, {}),
    )
    header, _ = read_safetensors_raw(out)
    manifest = json.loads(header["__metadata__"]["adaptzip"])
    tensors = load_file(out)
    assert res.bytes == out.stat().st_size == ct.serialized_size(tensors, manifest)
    ref = tmp_path / "ref.safetensors"
    meta = {"adaptzip": json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    save_file(tensors, ref, metadata=meta)
    assert ref.read_bytes() == out.read_bytes()
    ct.open_container(out).verify()
    if name == "svd":  # the mix this test is about
        dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        assert {"BF16", "F16", "I8"} <= dtypes, dtypes


@pytest.fixture(scope="module")
def untrained_dir(adapter_dir, tmp_path_factory) -> Path:
    """The adapter as PEFT makes it before any training: every B is zero (ΔW = 0)."""
    d = tmp_path_factory.mktemp("untrained") / "ad"
    d.mkdir()
    (d / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    t = load_file(adapter_dir / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in t.items()}, d / "adapter_model.safetensors")
    return d


@pytest.mark.parametrize("name", FORMS)
def test_an_untrained_adapter_gives_a_zero_update(name, untrained_dir, tmp_path):
    """ΔW = 0 everywhere (no norm to divide by): every form writes a container whose update is
    exactly zero and whose manifest numbers are finite (a NaN would not even serialise)."""
    out = tmp_path / f"{name}.safetensors"
    res = api.compress(untrained_dir, out, to=name, fitting=FitOptions(baseline=False), **SMALL.get(name, {}))
    assert res.rel_error == 0.0
    c = ct.open_container(out)
    assert c.verify()["ok"] is True
    form = c.form()
    with torch.no_grad():
        for i, m in enumerate(c.modules):
            B, A = form.factors(i)
            assert torch.isfinite(B).all() and torch.isfinite(A).all(), m.name
            assert float((B.double() @ A.double()).abs().max()) == 0.0, m.name
