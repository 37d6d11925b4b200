"""Live shared forms in PEFT (adaptzip.peft, ``expand --to peft-native``): real PEFT, real tiny
Llama and GPT-2 (Conv1D) models built locally.

For every form with a tuner: the PEFT-native model computes the same logits as the plain LoRA of
``expand --to peft`` (fp32), holds exactly the container's float values (once: the shared parts
are not replicated), reloads identically after ``save_pretrained``, merges into the weights the
merged export writes; new adapters train in the form; two adapters on one base switch and mix
per row."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from clihelp import run_cli
from fixtures import load_base, one_torch_thread, random_ids
from peft import PeftModel, get_peft_model

import adaptzip
from adaptzip import FitOptions, QuantOptions, open_container
from adaptzip.peft import BSLoRAConfig, MASAConfig

FORMS = ("bslora-ss", "bslora-gt", "bslora-ke", "masa", "vblora")
OPTIONS = {"bslora-ss": {"steps": 3}, "bslora-ke": {"steps": 3}, "bslora-gt": {}, "masa": {"rank": 6}, "vblora": {}}

_threads = pytest.fixture(autouse=True, scope="module")(one_torch_thread)


def rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a − b| relative to max |a − ref| (the size of the adapter's effect)."""
    return float((a - b).abs().max() / (a - ref).abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def build(tmp_path_factory, lora_fp32, make_lora, llama_base, gpt2_base):
    """build(form, model='llama', source='a', quant=None) -> (container, native dir, fp32 LoRA dir,
    base dir), cached: fp16 containers, expanded both ways."""
    root = tmp_path_factory.mktemp("native")
    cache: dict = {}

    def get(form: str, model: str = "llama", source: str = "a", quant: str | None = None):
        key = (form, model, source, quant)
        if key not in cache:
            if model == "gpt2":
                lora, base = make_lora("gpt2_bsl", base=gpt2_base), gpt2_base
            else:
                lora = lora_fp32 if source == "a" else make_lora("native_b", seed=3)
                base = llama_base
            stem = root / "-".join(x for x in key if x)
            c = stem.with_suffix(".safetensors")
            adaptzip.compress(
                lora,
                c,
                to=form,
                budget=0.5 if form == "vblora" else None,  # its default bank outgrows the tiny GPT-2's LoRA
                options=OPTIONS[form],
                fitting=FitOptions(dtype="fp16", baseline=False),
                quant=QuantOptions(scheme=quant) if quant else None,
            )
            native, plain = Path(f"{stem}-native"), Path(f"{stem}-peft")
            adaptzip.expand(c, native, to="peft-native")
            adaptzip.expand(c, plain, dtype="fp32")
            cache[key] = (c, native, plain, base)
        return cache[key]

    return get


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def load_quiet(base: Path, adapter: Path, **kw):
    """PeftModel.from_pretrained, failing on PEFT's missing/unexpected adapter keys warning."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(load_base(base), adapter, **kw).eval()
    bad = [str(x.message) for x in w if "adapter keys" in str(x.message) or "unexpected" in str(x.message).lower()]
    assert not bad, bad
    return pm


def forms_of(pm) -> torch.nn.ModuleDict:
    return pm.base_model.adaptzip_forms


@pytest.mark.parametrize("model", ["llama", "gpt2"])
@pytest.mark.parametrize("form", FORMS)
def test_native_equals_expanded_lora(build, form, model):
    c, native, plain, base = build(form, model)
    ids = random_ids()
    ref = logits(load_base(base), ids)
    lora = logits(load_quiet(base, plain), ids)
    pm = load_quiet(base, native)
    assert rel(lora, logits(pm, ids), ref) <= 1e-5
    assert float((lora - ref).abs().max()) > 1e-3  # the adapter does something
    # exactly the container's float values, once (no replicated shared parts)
    ct = open_container(c)
    stored = sum(t.numel() for t in ct.tensors().values() if t.is_floating_point())
    held = sum(p.numel() for p in forms_of(pm).parameters())
    assert held == stored
    if form.startswith("bslora"):  # the shared pairs are there, and held once
        assert any(k.startswith("shared_") for k in forms_of(pm)["default"].state_dict())
    # in the stored dtype (autocast_adapter_dtype=False) the resident bytes are the container's tensor bytes
    pm16 = load_quiet(base, native, autocast_adapter_dtype=False)
    live = forms_of(pm16)["default"]
    resident = sum(t.numel() * t.element_size() for t in [*live.parameters(), *live.buffers()])
    assert resident == sum(t.numel() * t.element_size() for t in ct.tensors().values())
    if form == "vblora":
        assert live.topk_indices.dtype == ct.tensor("topk_indices").dtype in (torch.uint8, torch.int16)


@pytest.mark.parametrize("form", ["bslora-gt", "masa", "vblora"])
def test_save_and_reload_identical(build, form, tmp_path):
    _, native, _, base = build(form)
    pm = load_quiet(base, native)
    pm.save_pretrained(tmp_path / "again")
    again = load_quiet(base, tmp_path / "again")
    a, b = forms_of(pm)["default"].state_dict(), forms_of(again)["default"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert (
        saved["peft_type"].startswith("ADAPTZIP_")
        and saved["form_state"] == open_container(build(form)[0]).manifest["state"]
    )
    ids = random_ids()
    assert torch.equal(logits(pm, ids), logits(again, ids))


@pytest.mark.parametrize(("form", "model"), [("bslora-ke", "llama"), ("masa", "llama"), ("bslora-ss", "gpt2")])
def test_merge_and_unload_equals_merged_export(build, form, model, tmp_path):
    from transformers import AutoModelForCausalLM

    c, native, _, base = build(form, model)
    adaptzip.expand(c, tmp_path / "merged", to="merged", base_model=base)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", torch_dtype=torch.float32).eval()
    pm = load_quiet(base, native)
    ids = random_ids()
    live = logits(pm, ids)
    merged = pm.merge_and_unload().eval()
    assert not any("adaptzip" in n for n, _ in merged.named_modules())
    ref = logits(load_base(base), ids)
    assert rel(live, logits(merged, ids), ref) <= 1e-5
    assert rel(logits(exported, ids), logits(merged, ids), ref) <= 1e-5


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (BSLoRAConfig, {"transform": "ss", "ranks": [2, 2, 4]}),
        (BSLoRAConfig, {"transform": "gt", "ranks": [2, 2, 4], "shared_size": 16}),
        (BSLoRAConfig, {"transform": "ke", "ranks": [2, 2, 4], "shared_size": 32}),
        (MASAConfig, {"r": 4, "group": 2}),
    ],
    ids=["ss", "gt", "ke", "masa"],
)
def test_train_a_new_adapter_in_the_form(llama_base, cls, options, tmp_path):
    config = cls(target_modules=["q_proj", "v_proj", "down_proj"], **options)
    torch.manual_seed(0)
    pm = get_peft_model(load_base(llama_base), config)
    ids = random_ids(n=4, length=24, seed=5)
    ids[:, 1::2] = (ids[:, ::2] * 7 + 3) % 128  # a learnable pattern
    assert torch.equal(logits(pm, ids), logits(load_base(llama_base), ids))  # ΔW = 0 at the start
    live = forms_of(pm)["default"]
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in live.parameters()) > 0
    pm.train()
    opt = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(8):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.98 * losses[0] and losses == sorted(losses, reverse=True), losses
    assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in live.parameters())  # every part learns
    pm.eval()
    pm.save_pretrained(tmp_path / "trained")
    saved = json.loads((tmp_path / "trained" / "adapter_config.json").read_text())
    assert len(saved["modules"]) == 9 and saved["form_state"] is not None  # 3 layers × 3 targets, layout saved
    again = load_quiet(llama_base, tmp_path / "trained")
    assert torch.equal(logits(pm, ids), logits(again, ids))


@pytest.mark.parametrize("form", ["bslora-ke", "vblora"])
def test_go_on_training_a_converted_adapter(build, form):
    _, native, _, base = build(form)
    pm = PeftModel.from_pretrained(load_base(base), native, is_trainable=True)
    live = forms_of(pm)["default"]
    trainable = [p for p in pm.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in live.parameters())
    ids = random_ids(n=4, length=24, seed=7)
    ids[:, 1::2] = (ids[:, ::2] * 7 + 3) % 128
    opt = torch.optim.Adam(trainable, lr=3e-3)
    losses = []
    for _ in range(5):
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_two_adapters_switch_and_mix_per_row(build):
    _, a_dir, _, base = build("bslora-ke")
    _, b_dir, _, _ = build("bslora-ke", source="b")
    ids = random_ids(n=3)
    only_a, only_b = logits(load_quiet(base, a_dir), ids), logits(load_quiet(base, b_dir), ids)
    ref = logits(load_base(base), ids)
    pm = PeftModel.from_pretrained(load_base(base), a_dir, adapter_name="one").eval()
    pm.load_adapter(b_dir, adapter_name="two")
    assert sorted(forms_of(pm).keys()) == ["one", "two"]
    assert rel(only_a, logits(pm, ids), ref) <= 1e-6
    pm.set_adapter("two")
    assert rel(only_b, logits(pm, ids), ref) <= 1e-6
    pm.set_adapter("one")
    assert rel(only_a, logits(pm, ids), ref) <= 1e-6
    with pm.disable_adapter():
        assert torch.allclose(logits(pm, ids), ref, atol=1e-6)
    mixed = logits(pm, ids, adapter_names=["two", "__base__", "one"])
    assert rel(only_b[0], mixed[0], ref[0]) <= 1e-5
    assert torch.allclose(mixed[1], ref[1], atol=1e-6)
    assert rel(only_a[2], mixed[2], ref[2]) <= 1e-5
    with pytest.raises(ValueError, match="non-existing adapter"):
        logits(pm, ids, adapter_names=["one", "three", "one"])
    with torch.no_grad():  # generate with one adapter per row
        out = pm.generate(
            input_ids=ids[:, :4], adapter_names=["one", "two", "__base__"], max_new_tokens=3, do_sample=False
        )
    assert out.shape == (3, 7)


def test_quantised_container_loads_dequantised(build):
    c, native, plain, base = build("masa", quant="int8")
    cfg = json.loads((native / "adapter_config.json").read_text())
    assert cfg["storage_dtype"] == "float32"
    ids = random_ids()
    ref = logits(load_base(base), ids)
    assert rel(logits(load_quiet(base, plain), ids), logits(load_quiet(base, native), ids), ref) <= 1e-5


def test_cli_expand_peft_native(build, lora_fp32, tmp_path):
    c = build("bslora-gt")[0]
    code, out, err = run_cli("expand", str(c), "-o", str(tmp_path / "n"), "--to", "peft-native", "--json")
    assert code == 0 and err == ""
    res = json.loads(out)
    assert res["target"] == "peft-native" and res["peft_type"] == "ADAPTZIP_BSLORA" and res["modules"] == 21
    svd = tmp_path / "svd.safetensors"
    adaptzip.compress(lora_fp32, svd, to="svd", budget=0.3)
    code, out, err = run_cli("expand", str(svd), "-o", str(tmp_path / "s"), "--to", "peft-native")
    assert code == 2 and out == "" and not (tmp_path / "s").exists()
    assert err.startswith(f"adaptzip: error: {svd}: --to peft-native: not offered by form svd") and err.count("\n") == 1


def test_import_adaptzip_registers_the_methods():
    """In either import order (each in a fresh interpreter; the two run side by side)."""
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"{order}\nfrom peft import PEFT_TYPE_TO_CONFIG_MAPPING as M\n"
                "print(sorted(str(k.value) for k in M if str(k.value).startswith('ADAPTZIP_')))",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for order in ("import adaptzip, peft", "import peft, adaptzip")
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert out.split("\n")[0] == "['ADAPTZIP_BSLORA', 'ADAPTZIP_JOINT', 'ADAPTZIP_MASA', 'ADAPTZIP_VBLORA']"


def test_a_too_old_peft_is_refused_in_one_line_and_import_peft_still_works(build, tmp_path):
    c = build("masa")[0]
    code = (
        "import warnings, sys\n"
        "import peft\n"
        "peft.__version__ = '0.13.0'  # as an older release reports itself\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import adaptzip\n"
        "print([str(x.message) for x in w if 'adaptzip' in str(x.message)])\n"
        "from adaptzip.cli import main\n"
        f"sys.argv = ['adaptzip', 'expand', {str(c)!r}, '-o', {str(tmp_path / 'n')!r}, '--to', 'peft-native']\n"
        "main()\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "its PEFT methods are not registered: adaptzip's PEFT tuners need peft >= 0.21" in p.stdout
    assert p.returncode == 2 and not (tmp_path / "n").exists()
    assert (
        p.stderr.strip()
        == f"adaptzip: error: {c}: --to peft-native: adaptzip's PEFT tuners need peft >= 0.21 (installed: 0.13.0)"
    )
