"""fileio: the safetensors layout rule (against safetensors itself), file hashes, truncation
checks, JSON-safe values; runtime: the one-thread helper."""

import hashlib
import math
import struct

import pytest
import torch
from safetensors.torch import save, save_file

from adaptzip import container as ct
from adaptzip.errors import AdapterError, ContainerError
from adaptzip.fileio import (
    check_not_truncated,
    file_sha256,
    json_clean,
    safetensors_header,
    safetensors_plan,
    safetensors_size,
    save_tensors,
)
from adaptzip.runtime import single_thread

ALL_DTYPES = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)


def _mixed(seed: int = 0) -> dict[str, torch.Tensor]:
    """A container-like mix: bf16 factors, fp16 mixing weights and quantisation scales, int8 and
    packed-int4 (uint8) codes, an int16 index, a carried fp32 tensor, an empty tensor."""
    g = torch.Generator().manual_seed(seed)
    return {
        "A.0": torch.randn(4, 33, generator=g).bfloat16(),
        "B.0": torch.randn(17, 4, generator=g).bfloat16(),
        "logits": torch.randn(5, 3, generator=g).half(),
        "A.1.scale": torch.rand(4, 2, generator=g).half(),
        "A.1.q": torch.randint(-127, 128, (4, 33), generator=g, dtype=torch.int8),
        "B.1.q": torch.randint(0, 256, (17, 2), generator=g, dtype=torch.uint8),
        "idx": torch.randint(0, 300, (6,), generator=g, dtype=torch.int16),
        "carry.0": torch.randn(9, generator=g),
        "empty": torch.zeros(0, 5, dtype=torch.bfloat16),
    }


def test_plan_is_safetensors_order():
    ts = {name: torch.zeros(2, dtype=dt) for name, dt in zip("abcdefghij", ALL_DTYPES)}
    ts["k"] = torch.zeros(0, 3)  # a second F32, after "a" by name
    # measured with safetensors.torch.save_file: its Dtype enum order, highest first, then name
    assert [(n, str(dt).removeprefix("torch.")) for n, dt, _ in safetensors_plan(ts)] == [
        ("e", "int64"),
        ("d", "float64"),
        ("a", "float32"),
        ("k", "float32"),
        ("f", "int32"),
        ("c", "bfloat16"),
        ("b", "float16"),
        ("g", "int16"),
        ("h", "int8"),
        ("i", "uint8"),
        ("j", "bool"),
    ]


def test_header_and_size_numbers():
    ts = {
        "u": torch.zeros(3, dtype=torch.uint8),
        "a": torch.zeros(2, dtype=torch.float16),
        "b": torch.zeros(2, dtype=torch.bfloat16),
    }
    plan = safetensors_plan(ts)
    hb = safetensors_header(plan, {"k": "v"})
    assert (
        hb
        == (
            b'{"__metadata__":{"k":"v"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},'
            b'"a":{"dtype":"F16","shape":[2],"data_offsets":[4,8]},"u":{"dtype":"U8","shape":[3],"data_offsets":[8,11]}}'
        )
        + b" " * 6
    )
    assert len(hb) == 192 and safetensors_size(plan, {"k": "v"}) == 8 + 192 + 11 == 211
    assert safetensors_header([], None) == b"{}      "
    assert (
        safetensors_header([], {}) == b'{"__metadata__":{}}     '
    )  # safetensors itself writes invalid JSON here; same size
    # BF16 before F16 matters: by element size then name ("a" first) the offsets have 8 fewer digits
    ts = {"z": torch.zeros(5000, dtype=torch.bfloat16), "a": torch.zeros(1, dtype=torch.float16)}
    by_size = sorted(ts, key=lambda k: (-ts[k].element_size(), k))
    assert (
        safetensors_size(safetensors_plan(ts), {"adaptzip": "{}"})
        == len(save(ts, metadata={"adaptzip": "{}"}))
        == 10170
    )
    assert safetensors_size([(k, ts[k].dtype, tuple(ts[k].shape)) for k in by_size], {"adaptzip": "{}"}) == 10162


@pytest.mark.parametrize("metadata", [None, {"adaptzip": '{"a":[1,2],"s":"x\\"y"}'}, {"k": "é ✓ \n\x01"}])
def test_layout_matches_save_file_byte_for_byte(tmp_path, metadata):
    ts = _mixed()
    ref = save(ts, metadata=metadata)
    n = struct.unpack("<Q", ref[:8])[0]
    assert ref[8 : 8 + n] == safetensors_header(safetensors_plan(ts), metadata)
    assert len(ref) == safetensors_size(safetensors_plan(ts), metadata)
    save_tensors(tmp_path / "s.safetensors", ts, metadata)
    assert (tmp_path / "s.safetensors").read_bytes() == ref


def test_serialized_size_equals_written_container(tmp_path):
    for seed in range(3):
        ts = _mixed(seed)
        ts[f"pad{seed}"] = torch.zeros(seed * 1000 + 1, dtype=torch.float16)  # move offsets across digit counts
        manifest = {"format": "adaptzip", "note": "é", "x": [0.1, seed]}
        assert ct.write(tmp_path / f"c{seed}.safetensors", ts, manifest) == ct.serialized_size(ts, manifest)


def test_file_sha256(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    p.write_bytes(b"")  # a changed file is hashed again (size and mtime are the cache key)
    assert file_sha256(p) == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    big = bytes(range(256)) * (5 * 4096 + 3)  # > one 4 MiB chunk
    p.write_bytes(big)
    assert file_sha256(p) == hashlib.sha256(big).hexdigest()


def test_check_not_truncated(tmp_path):
    p = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(10)}, str(p))  # 8 + 56-byte header + 40 bytes
    data = p.read_bytes()
    assert len(data) == 104
    check_not_truncated(p, AdapterError)  # intact: nothing to say
    p.write_bytes(data[:-1])
    with pytest.raises(AdapterError, match="truncated safetensors file") as e:
        check_not_truncated(p, AdapterError)
    assert str(e.value) == f"{p}: truncated safetensors file: payload needs 104 bytes, file has 103"
    with pytest.raises(ContainerError, match="payload needs 104 bytes, file has 70$"):
        p.write_bytes(data[:70])
        check_not_truncated(p, ContainerError)
    for junk in (b"", b"nonsense", b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xx", b"\x02" + b"\x00" * 7 + b"[]"):
        p.write_bytes(junk)
        check_not_truncated(p, AdapterError)  # not a header: safetensors reports it


def test_json_clean():
    v = {"a": math.nan, "b": [1.5, math.inf, (2, -math.inf)], "c": {"d": None, "e": "x", "f": 3, "g": True}, "_h": 0.25}
    assert json_clean(v) == {
        "a": None,
        "b": [1.5, None, [2, None]],
        "c": {"d": None, "e": "x", "f": 3, "g": True},
        "_h": 0.25,
    }
    assert json_clean(math.nan) is None and json_clean(None) is None and json_clean(-0.5) == -0.5
    assert json_clean(v)["b"][2] == [2, None] and v["b"][2] == (2, -math.inf)  # a copy: the input is unchanged


def test_single_thread():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with single_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2

        @single_thread()
        def depth(k: int) -> int:  # recursive use restores the outer count only once, at the end
            assert torch.get_num_threads() == 1
            return 0 if k == 0 else 1 + depth(k - 1)

        assert depth(3) == 3 and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="raised inside"), single_thread():
            raise ValueError("raised inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
