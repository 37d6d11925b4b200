"""The container: manifest schema, tensor names, hashes, verify, atomic writes."""

import json
import struct

import jsonschema
import pytest
import torch
from fixtures import rewrite_container
from safetensors import safe_open

import adaptzip
from adaptzip import container as ct
from adaptzip.errors import ContainerError
from adaptzip.fileio import StreamingWriter
from adaptzip.options import RunOptions


@pytest.fixture(scope="module")
def svd_container(lora_fp32, tmp_path_factory):
    p = tmp_path_factory.mktemp("c") / "svd.safetensors"
    adaptzip.compress(
        lora_fp32, p, to="svd", budget=0.3, run=RunOptions(command="adaptzip compress x --to svd --budget 0.3")
    )
    return p


def test_manifest_content_and_schema(svd_container, lora_fp32):
    c = adaptzip.open_container(svd_container)
    m = c.manifest
    schema = json.loads((ct.SCHEMA_FILE).read_text())
    jsonschema.validators.validator_for(schema).check_schema(schema)  # the shipped schema is itself valid
    jsonschema.validate(m, schema)
    ad = adaptzip.load_adapter(lora_fp32)
    assert m["format"] == "adaptzip" and m["format_version"] == 1 and m["form"] == "svd"
    assert m["source"]["sha256"] == ad.sha256 and m["source"]["bytes"] == ad.bytes
    assert m["source"]["peft_config"]["r"] == 8
    assert [x["name"] for x in m["modules"]] == [x.name for x in ad.modules]
    assert m["command"].startswith("adaptzip compress")
    assert m["payload_sha256"] == ct.payload_sha256(c.tensors())
    assert set(c.tensor_names) == {f"{ab}.{i}" for i in range(21) for ab in "AB"}
    # the schema file in formats/ is the package's
    from pathlib import Path

    assert (Path(__file__).parent.parent / "formats" / "manifest.schema.json").read_text() == ct.SCHEMA_FILE.read_text()


def test_verify_ok_and_tampering(svd_container, tmp_path):
    assert adaptzip.verify(svd_container)["ok"] is True

    def flip(t):
        t["A.0"] = t["A.0"].clone()
        t["A.0"][0, 0] += 1.0

    with pytest.raises(ContainerError, match="payload sha256"):
        adaptzip.verify(rewrite_container(svd_container, tmp_path / "t1.safetensors", edit_tensors=flip))

    def reshape(t):
        t["A.3"] = torch.zeros(t["A.3"].shape[0] + 1, t["A.3"].shape[1])

    with pytest.raises(ContainerError, match="tensor A.3 has shape"):
        adaptzip.verify(rewrite_container(svd_container, tmp_path / "t2.safetensors", edit_tensors=reshape))

    def drop(t):
        del t["B.5"]

    with pytest.raises(ContainerError, match="tensor B.5 .* missing"):
        adaptzip.verify(rewrite_container(svd_container, tmp_path / "t3.safetensors", edit_tensors=drop))

    def extra(t):
        t["Z"] = torch.zeros(2)

    with pytest.raises(ContainerError, match="tensor Z is not described"):
        adaptzip.verify(rewrite_container(svd_container, tmp_path / "t4.safetensors", edit_tensors=extra))

    with pytest.raises(ContainerError, match="schema at modules/0/in"):
        adaptzip.verify(
            rewrite_container(
                svd_container, tmp_path / "t5.safetensors", edit_manifest=lambda m: m["modules"][0].update({"in": "64"})
            )
        )

    with pytest.raises(ContainerError, match="schema at modules/5"):  # opening checks every entry, cheaply
        adaptzip.open_container(
            rewrite_container(
                svd_container,
                tmp_path / "t5b.safetensors",
                edit_manifest=lambda m: m["modules"][5].update({"rank": "8"}),
            )
        )

    def newer(m):
        m["format_version"] = 99

    with pytest.raises(ContainerError, match="format_version 99 is newer"):
        adaptzip.verify(rewrite_container(svd_container, tmp_path / "t6.safetensors", edit_manifest=newer))


def test_not_a_container(tmp_path, lora_fp32):
    with pytest.raises(ContainerError, match="no such file"):
        adaptzip.open_container(tmp_path / "missing.safetensors")
    with pytest.raises(ContainerError, match="no adaptzip manifest"):
        adaptzip.open_container(lora_fp32 / "adapter_model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(ContainerError, match="not a readable safetensors"):
        adaptzip.open_container(tmp_path / "junk.safetensors")


def test_truncated_container(svd_container, tmp_path):
    data = svd_container.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(
        ContainerError,
        match=f"cut.safetensors: truncated safetensors file: payload needs {len(data)} bytes, file has {len(data) - 100}$",
    ):
        adaptzip.verify(tmp_path / "cut.safetensors")


def test_streaming_writer_matches_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {
        "b": torch.randn(3, 5, generator=g),
        "a": torch.randn(7, generator=g).half(),
        "z": torch.arange(6, dtype=torch.uint8).reshape(2, 3),
        "e": torch.zeros(0, 4),
    }
    plan = [(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    with StreamingWriter(tmp_path / "s.safetensors", plan, {"k": "v"}) as w:
        for k, v in ts.items():
            w.write(k, v)
    with safe_open(tmp_path / "s.safetensors", "pt") as f:
        assert f.metadata() == {"k": "v"}
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v)
    n = struct.unpack("<Q", (tmp_path / "s.safetensors").read_bytes()[:8])[0]
    assert n % 8 == 0
    with pytest.raises(ValueError, match="expected b"), StreamingWriter(tmp_path / "x.safetensors", plan) as w:
        w.write("a", ts["a"])


def test_atomic_no_partial_output(lora_fp32, tmp_path):
    """A failing compress leaves nothing behind in the target directory, and the input is untouched."""
    before = {p.name: p.read_bytes() for p in lora_fp32.iterdir()}
    out = tmp_path / "o" / "x.safetensors"
    with pytest.raises(adaptzip.AdaptzipError, match="below the container's fixed overhead"):
        adaptzip.compress(lora_fp32, out, to="svd", budget=0.001)
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])
    adaptzip.compress(lora_fp32, out, to="svd", rank=2)
    with pytest.raises(adaptzip.AdaptzipError, match="exists"):
        adaptzip.compress(lora_fp32, out, to="svd", rank=1)
    adaptzip.compress(lora_fp32, out, to="svd", rank=1, run=RunOptions(force=True))
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.safetensors"]
    assert adaptzip.open_container(out).manifest["state"]["ranks"] == [1] * 21
    assert {p.name: p.read_bytes() for p in lora_fp32.iterdir()} == before
    with pytest.raises(adaptzip.AdaptzipError, match="is an input"):
        adaptzip.expand(out, out, to="dense", force=True)
    with pytest.raises(adaptzip.AdaptzipError, match="is an input"):
        adaptzip.compress(lora_fp32, lora_fp32 / "adapter_model.safetensors", to="svd", run=RunOptions(force=True))
    assert {p.name: p.read_bytes() for p in lora_fp32.iterdir()} == before
