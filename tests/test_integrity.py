"""Integrity on every read: a container that breaks an invariant of formats/container.md is refused
by ``verify``, ``expand``, ``report`` and ``open_container().form()`` alike, with the same one-line
cause naming the file, and nothing is written. Tensors are read once, hashed while read."""

import json
import math
import re
import struct

import pytest
import torch
from clihelp import run_cli
from fixtures import FAST_FIT, rewrite_container
from safetensors import safe_open

import adaptzip
from adaptzip import container as ct
from adaptzip.errors import ContainerError
from adaptzip.options import QuantOptions
from adaptzip.report import report as report_containers

HASH_MISMATCH = r"payload sha256 [0-9a-f]{12}… does not match the manifest's [0-9a-f]{12}… \(corrupted or edited\)"


@pytest.fixture(scope="module")
def good(lora_fp32, tmp_path_factory):
    p = tmp_path_factory.mktemp("integrity") / "svd.safetensors"
    adaptzip.compress(lora_fp32, p, to="svd", budget=0.3)
    return p


def _flip_payload_byte(src, dst, tensor="A.0"):
    """One bit of one tensor's bytes flipped in place; header and manifest untouched."""
    data = bytearray(src.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    begin, _ = json.loads(data[8 : 8 + n])[tensor]["data_offsets"]
    data[8 + n + begin + 1] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def _set(name, value):
    def edit(t):
        t[name] = t[name].clone()
        t[name].view(-1)[0] = value

    return edit


# name -> (how to make the broken copy, its exact cause)
CASES = {
    "flipped_byte": (lambda g, d: _flip_payload_byte(g, d), HASH_MISMATCH),
    "edited_hash": (
        lambda g, d: rewrite_container(g, d, edit_manifest=lambda m: m.update(payload_sha256="0" * 64)),
        r"payload sha256 [0-9a-f]{12}… does not match the manifest's 000000000000… \(corrupted or edited\)",
    ),
    "edited_rank": (
        lambda g, d: rewrite_container(g, d, edit_manifest=lambda m: m["modules"][0].update(rank=4)),
        r"modules/0 \(model\.layers\.0\.mlp\.down_proj\) has rank 4 but the source's adapter_config\.json gives it r=8",
    ),
    "edited_scale": (
        lambda g, d: rewrite_container(g, d, edit_manifest=lambda m: m["modules"][5].update(scale=4.0)),
        r"modules/5 \(model\.layers\.0\.self_attn\.q_proj\) has scale 4\.0 but alpha/rank is 2\.0",
    ),
    "newer_version": (
        lambda g, d: rewrite_container(g, d, edit_manifest=lambda m: m.update(format_version=2, future_field={"x": 1})),
        r"format_version 2 is newer than this adaptzip reads \(1\); upgrade adaptzip",
    ),
    "nan_rehashed": (
        lambda g, d: rewrite_container(g, d, edit_tensors=_set("A.0", float("nan")), rehash=True),
        r"tensor A\.0 holds non-finite values \(NaN or Inf\)",
    ),
    "inf_rehashed": (
        lambda g, d: rewrite_container(g, d, edit_tensors=_set("B.7", float("-inf")), rehash=True),
        r"tensor B\.7 holds non-finite values \(NaN or Inf\)",
    ),
    "unknown_form": (
        lambda g, d: rewrite_container(g, d, edit_manifest=lambda m: m.update(form="svd9")),
        r"unknown form 'svd9' \(this adaptzip reads [a-z0-9, -]+; a newer adaptzip may read it\)",
    ),
    "schema": (
        lambda g, d: rewrite_container(g, d, edit_manifest=lambda m: m["modules"][3].update(out=0)),
        r"manifest does not match the schema at modules/3/out: 0 is less than the minimum of 1",
    ),
    "wrong_dtype": (
        lambda g, d: rewrite_container(g, d, edit_tensors=lambda t: t.update({"B.2": t["B.2"].double()}), rehash=True),
        r"tensor B\.2 has dtype F64 but the container dtype is F32",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_reader_refuses(good, tmp_path, case):
    make, cause = CASES[case]
    bad = make(good, tmp_path / f"{case}.safetensors")
    line = rf"^{re.escape(str(bad))}: {cause}$"
    before = bad.read_bytes()

    with pytest.raises(ContainerError, match=line):
        adaptzip.verify(bad)
    with pytest.raises(ContainerError, match=line):
        adaptzip.open_container(bad).form()
    for to in ("peft", "dense"):
        with pytest.raises(ContainerError, match=line):
            adaptzip.expand(bad, tmp_path / f"out_{to}", to=to)
        assert not (tmp_path / f"out_{to}").exists()
    with pytest.raises(ContainerError, match=line):
        adaptzip.expand(bad, tmp_path / "out_vllm", target="vllm")
    with pytest.raises(ContainerError, match=line):
        report_containers([bad], out=tmp_path / "rep")
    assert not (tmp_path / "rep").exists()
    if case not in ("newer_version", "unknown_form", "schema", "edited_rank", "edited_scale"):
        c = adaptzip.open_container(bad)  # the manifest is fine: the tensors are refused on first use
        for read in (c.tensors, c.lora_factors, lambda: c.tensor("A.0"), c.load):
            with pytest.raises(ContainerError, match=line):
                read()

    # the CLI: exit 2, one line on stderr, nothing on stdout, no output, the input unchanged
    for args in (
        ("verify", bad),
        ("expand", bad, "-o", tmp_path / "cli_out"),
        ("expand", bad, "--to", "dense", "-o", tmp_path / "cli_dense.safetensors"),
        ("report", bad, "--out", tmp_path / "cli_rep"),
    ):
        code, out, err = run_cli(*args)
        assert (code, out) == (2, ""), (args, code, out, err)
        assert re.fullmatch(rf"adaptzip: error: {re.escape(str(bad))}: {cause}\n", err), err
    assert not any((tmp_path / n).exists() for n in ("cli_out", "cli_dense.safetensors", "cli_rep"))
    assert bad.read_bytes() == before


def test_good_container_reads_and_caches(good, tmp_path, monkeypatch):
    """The one reader hashes while it reads: no second pass over the file (neither the in-memory
    payload_sha256 of a writer nor a whole-file hash), and the checked tensors are cached."""

    def second_pass(*a, **k):
        raise AssertionError("a second pass over the container")

    monkeypatch.setattr(ct, "payload_sha256", second_pass)
    monkeypatch.setattr(ct, "file_sha256", second_pass)
    c = adaptzip.open_container(good)
    loaded = c.load()
    assert c.load() is loaded and c.tensors()["A.0"] is loaded["A.0"]
    assert sorted(loaded) == c.tensor_names and len(loaded) == 42
    storages = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert len(storages) == 42  # each its own memory: writers that refuse shared storage accept them
    with safe_open(good, "pt") as f:
        for k in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(k), loaded[k]), k
    form = c.form()
    assert form.B[0].data_ptr() != loaded["B.0"].data_ptr()  # the form's parameters are its own copies
    assert adaptzip.verify(good)["ok"] is True
    res = adaptzip.expand(good, tmp_path / "peft")
    assert res["bytes"] > 0 and (tmp_path / "peft" / "adapter_config.json").is_file()
    c.release()
    assert c.load() is not loaded


def test_all_finite_matches_isfinite():
    from adaptzip.adapter import all_finite

    big = torch.full((1000,), 3.0e38)  # every value finite, their fp32 sum is not: confirmed element-wise
    assert all_finite(big) and all_finite(big.bfloat16()) and all_finite(torch.arange(5))
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for bad in (math.nan, math.inf, -math.inf):
            t = torch.randn(257).to(dt)
            t[100] = bad
            assert not all_finite(t), (dt, bad)
        assert all_finite(torch.randn(257).to(dt)) and all_finite(torch.zeros(0, 3, dtype=dt))


def test_quantised_scales_are_checked(lora_fp32, tmp_path):
    """A quantised container's fp16 scales are floats like any other: a NaN scale with a recomputed
    hash is refused; so is a scale made negative (the scheme's own invariant)."""
    p = tmp_path / "q.safetensors"
    adaptzip.compress(lora_fp32, p, to="svd", budget=0.3, quant=QuantOptions(scheme="int8"))
    c = adaptzip.open_container(p)
    assert c.storage is not None and adaptzip.verify(p)["ok"]
    scale = sorted(n for n in c.tensor_names if n.endswith(".scale"))[0]
    bad = rewrite_container(p, tmp_path / "nan.safetensors", edit_tensors=_set(scale, float("nan")), rehash=True)
    with pytest.raises(
        ContainerError, match=rf"^{re.escape(str(bad))}: tensor {scale} holds non-finite values \(NaN or Inf\)$"
    ):
        adaptzip.expand(bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unknown_form_names_the_file(good, tmp_path):
    bad = rewrite_container(good, tmp_path / "u.safetensors", edit_manifest=lambda m: m.update(form="notaform"))
    with pytest.raises(ContainerError) as e:
        adaptzip.open_container(bad)
    assert e.value.path == str(bad) and e.value.cause.startswith("unknown form 'notaform'")


def test_module_table_and_carried_invariants(good, tmp_path):
    cases = {
        "order": (
            lambda m: m["modules"].insert(0, m["modules"].pop(3)),
            r"modules/1 model\.layers\.0\.mlp\.down_proj comes after model\.layers\.0\.self_attn\.k_proj: "
            r"module names must be unique and in natural order",
        ),
        "alpha": (
            lambda m: m["modules"][2].update(alpha=32.0, scale=4.0),
            r"modules/2 \(model\.layers\.0\.mlp\.up_proj\) has alpha 32\.0 but the source's adapter_config\.json "
            r"gives it lora_alpha=16\.0",
        ),
        "orientation": (
            lambda m: m["modules"][0].update(fan_in_fan_out=True),
            r"modules/0 \(model\.layers\.0\.mlp\.down_proj\) has fan_in_fan_out true but the source's "
            r"adapter_config\.json gives its linear layer false",
        ),
        "carried": (
            lambda m: m["carried"].append({"tensor": "carry.5", "key": "x", "role": "modules_to_save", "module": None}),
            r"carried/0 names tensor carry\.5, expected carry\.0",
        ),
    }
    for name, (edit, cause) in cases.items():
        bad = rewrite_container(good, tmp_path / f"{name}.safetensors", edit_manifest=edit)
        with pytest.raises(ContainerError, match=rf"^{re.escape(str(bad))}: {cause}$"):
            adaptzip.expand(bad, tmp_path / f"o_{name}")
        assert not (tmp_path / f"o_{name}").exists()


def test_form_value_rules_on_every_read(lora_fp32, tmp_path):
    """A VB-LoRA index past the bank (hash recomputed) is refused by every reader, the native
    PEFT VB-LoRA export too (it copies the indices without rebuilding the form)."""
    p = tmp_path / "vb.safetensors"
    adaptzip.compress(lora_fp32, p, to="vblora", budget=0.3, fitting=FAST_FIT)
    c = adaptzip.open_container(p)
    h = int(c.manifest["config"]["bank"])
    idx = c.tensor("topk_indices")
    assert h <= torch.iinfo(idx.dtype).max
    bad = rewrite_container(p, tmp_path / "bad.safetensors", edit_tensors=_set("topk_indices", h), rehash=True)
    line = rf"^{re.escape(str(bad))}: vblora: top-k index out of range \[0, {h}\) \(max {h}\)$"
    with pytest.raises(ContainerError, match=line):
        adaptzip.verify(bad)
    with pytest.raises(ContainerError, match=line):
        adaptzip.open_container(bad).form()
    for to in ("peft", "peft-vblora", "dense"):
        with pytest.raises(ContainerError, match=line):
            adaptzip.expand(bad, tmp_path / f"o_{to}", to=to)
        assert not (tmp_path / f"o_{to}").exists()
