"""Property-based fuzzing of the two file formats adaptzip reads: containers and PEFT adapters.

Each example mutates a good file — flips a byte of the header JSON or of the payload, truncates,
extends, rewrites the 8-byte header length, or sets a manifest / adapter_config.json field (at any
depth) to a random JSON value — and reads it back. Every mutation either reads back exactly what
the file holds, or is refused with the reader's own error (ContainerError / AdapterError): never
another exception, never a hang (a per-example alarm), never NaN or Inf factors.

* Containers: ``open_container(p).tensors()`` returns the original tensors bit for bit (the
  payload hash makes any changed byte detectable, so a changed tensor must be refused; a header
  entry retyped, reshaped or renamed with the hash recomputed breaks the manifest's own
  invariants, which any reader opening the file checks); ``verify()`` and ``form()`` then only
  pass or raise ContainerError.
* Adapters: ``load_adapter(d)`` and every ``factors(m)``; the stored A and B are the original
  ones bit for bit — except after a payload byte flip (a PEFT file has no checksum), where they
  must be exactly what the mutated bytes say, and finite.

Derandomized and bounded (500 examples each, a few seconds; ≤ 20 s on 2 busy cores) so that it is reproducible.
"""

from __future__ import annotations

import copy
import itertools
import json
import signal
import struct

import numpy as np
import pytest
import torch
from fixtures import (
    SPEC_HASH_DTYPE,
    one_torch_thread,
    read_safetensors_raw,
    spec_payload_sha256,
    tiny_llama_adapter,
)
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adaptzip import api
from adaptzip.adapter import load_adapter
from adaptzip.container import open_container
from adaptzip.errors import AdapterError, ContainerError
from adaptzip.options import FitOptions, QuantOptions

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

FUZZ = settings(
    max_examples=500,
    derandomize=True,
    database=None,
    deadline=3000,  # ms per example; a true hang is caught by the alarm below
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no reader's catch-all can swallow it."""


def _alarm(signum, frame):
    raise Hang("reading took more than 10 s")


def _bounded(fn, *a):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        return fn(*a)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _bits(t: torch.Tensor) -> tuple:
    t = t.detach().contiguous().cpu()
    return (str(t.dtype), tuple(t.shape), bytes(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")


_names = itertools.count()


# ------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    """A small adapter (2 modules, r=2), its svd container and an int8-quantised one (with a
    ``storage`` section), and what each reads back when intact."""
    root = tmp_path_factory.mktemp("fuzz")
    ad = tiny_llama_adapter(root / "ad", layers=1, targets=("q_proj", "v_proj"), r=2)
    quick = FitOptions(baseline=False)
    plain, quant = root / "svd.safetensors", root / "int8.safetensors"
    api.compress(ad, plain, to="svd", fitting=quick)
    api.compress(ad, quant, to="svd", fitting=FitOptions(baseline=False, dtype="fp16"), quant=QuantOptions("int8", 16))
    containers = {}
    for p in (plain, quant):
        containers[p.name] = {
            "bytes": p.read_bytes(),
            "tensors": {n: _bits(t) for n, t in open_container(p).tensors().items()},
        }
    a = load_adapter(ad)
    return {
        "root": root,
        "adapter": ad,
        "weights": (ad / WEIGHTS).read_bytes(),
        "config": json.loads((ad / CONFIG).read_text()),
        "factors": {m.name: (_bits(a.lora_A(m.name)), _bits(a.lora_B(m.name))) for m in a.modules},
        "containers": containers,
    }


# ------------------------------------------------------------------------------ mutations
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 2, 8, 64, 2**31, 2**63, -(2**63), 1e308, -1e-308, 0.5])
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        ["", "svd", "lora", "masa", "vblora", "bslora-ke", "fp16", "bf16", "fp32", "int8", "LORA", "x" * 300]
    )
    | st.text(max_size=12)
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=10,
)


def _paths(v, prefix=()) -> list[tuple]:
    """Every path into a JSON value (dict keys, list indices), the root excluded."""
    out = []
    if isinstance(v, dict):
        for k, x in v.items():
            out.append((*prefix, k))
            out += _paths(x, (*prefix, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            out.append((*prefix, i))
            out += _paths(x, (*prefix, i))
    return out


def _set(obj, path: tuple, value):
    for k in path[:-1]:
        obj = obj[k]
    obj[path[-1]] = value


def _header_len(b: bytes) -> int:
    return struct.unpack("<Q", b[:8])[0]


@st.composite
def byte_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """A byte-level mutation of safetensors bytes: (kind, mutated bytes)."""
    n = _header_len(data)
    kind = draw(st.sampled_from(["header", "payload", "truncate", "extend", "length"]))
    b = bytearray(data)
    if kind == "header":
        i = draw(st.integers(8, 8 + n - 1))
        b[i] ^= draw(st.integers(1, 255))
    elif kind == "payload":
        i = draw(st.integers(8 + n, len(data) - 1))
        b[i] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        b = b[: draw(st.integers(0, len(data) - 1))]
    elif kind == "extend":
        b += draw(st.binary(min_size=1, max_size=64))
    else:
        b[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1) | st.integers(0, len(data) + 16)))
    return kind, bytes(b)


@st.composite
def manifest_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Set one manifest field (any depth, or a new top-level key) to a random JSON value; the
    payload hash recomputed or not."""
    header, payload = _split(data)
    m = json.loads(header["__metadata__"]["adaptzip"])
    path = draw(st.sampled_from(_paths(m) + [("storage",), ("shared",), ("unknown_key",)]))
    value = draw(JSON_VALUES)
    _set(m, path, value)
    if draw(st.booleans()):
        m["payload_sha256"] = spec_payload_sha256(header, payload)
    header = copy.deepcopy(header)
    header["__metadata__"]["adaptzip"] = json.dumps(m, sort_keys=True, separators=(",", ":"))
    return "manifest", _join(header, payload)


def _split(data: bytes) -> tuple[dict, bytes]:
    n = _header_len(data)
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, payload: bytes) -> bytes:
    """Safetensors bytes of a header object and a payload (compact JSON, space-padded to 8)."""
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + payload


@st.composite
def entry_mutation(draw, data: bytes) -> tuple[str, bytes]:
    """Retype (same element size or not), reshape or rename one tensor entry of the header, then
    recompute the payload hash as a careful forger would: only the structural checks can refuse."""
    header, payload = _split(data)
    h = copy.deepcopy(header)
    name = draw(st.sampled_from(sorted(k for k in h if k != "__metadata__")))
    what = draw(st.sampled_from(["dtype", "shape", "rename"]))
    if what == "dtype":
        h[name]["dtype"] = draw(st.sampled_from(sorted(SPEC_HASH_DTYPE)))
    elif what == "shape":
        h[name]["shape"] = draw(st.permutations(h[name]["shape"]) | st.lists(st.integers(0, 130), max_size=3))
    else:
        h[draw(st.sampled_from(["A.9", "B.00", "carry.0", "X", name.upper()]))] = h.pop(name)
    m = json.loads(h["__metadata__"]["adaptzip"])
    m["payload_sha256"] = spec_payload_sha256(h, payload)
    h["__metadata__"]["adaptzip"] = json.dumps(m, sort_keys=True, separators=(",", ":"))
    return f"{what}+rehash", _join(h, payload)


# ------------------------------------------------------------------------------ containers
@st.composite
def container_case(draw, work) -> tuple[str, str, bytes]:
    name = draw(st.sampled_from(sorted(work["containers"])))
    data = work["containers"][name]["bytes"]
    kind, mutated = draw(st.one_of(byte_mutation(data), manifest_mutation(data), entry_mutation(data)))
    return name, kind, mutated


@FUZZ
@given(draw=st.data())
def test_container_mutations_read_identical_or_are_refused(work, draw):
    name, kind, data = draw.draw(container_case(work), label="mutation")
    p = work["root"] / f"c{next(_names)}.safetensors"
    p.write_bytes(data)
    try:
        c = _bounded(open_container, p)
        got = _bounded(c.tensors)
    except ContainerError:
        event(f"{kind}: refused")
        return
    event(f"{kind}: read")
    assert {n: _bits(t) for n, t in got.items()} == work["containers"][name]["tensors"], (
        f"{kind} mutation of {name} read back different tensors"
    )
    for step in (c.verify, c.form):  # may refuse, nothing else
        try:
            _bounded(step)
        except ContainerError:
            pass


# ------------------------------------------------------------------------------ adapters
@st.composite
def adapter_case(draw, work) -> tuple[str, bytes, bytes]:
    """(kind, weights bytes, config bytes)."""
    weights, cfg = work["weights"], work["config"]
    target = draw(st.sampled_from(["weights", "config-field", "config-bytes", "config-whole"]))
    if target == "weights":
        kind, mutated = draw(byte_mutation(weights))
        return kind, mutated, json.dumps(cfg).encode()
    if target == "config-field":
        c = copy.deepcopy(cfg)
        keys = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out"]
        path = draw(st.sampled_from(_paths(c) + [(k,) for k in keys]))
        _set(c, path, draw(JSON_VALUES))
        return "config", weights, json.dumps(c).encode()
    if target == "config-whole":
        return "config", weights, json.dumps(draw(JSON_VALUES)).encode()
    text = bytearray(json.dumps(cfg).encode())
    text[draw(st.integers(0, len(text) - 1))] ^= draw(st.integers(1, 255))
    return "config", weights, bytes(text)


def _decode(data: bytes, key: str) -> tuple:
    """What the bytes of a (mutated) safetensors file hold for ``key``: an F32 tensor read by hand."""
    header, payload = _split(data)
    info = header[key]
    b, e = info["data_offsets"]
    arr = np.frombuffer(payload[b:e], dtype="<f4").reshape(info["shape"])
    return _bits(torch.from_numpy(arr.copy()))


@FUZZ
@given(draw=st.data())
def test_adapter_mutations_read_identical_or_are_refused(work, draw):
    kind, weights, cfg = draw.draw(adapter_case(work), label="mutation")
    d = work["root"] / f"a{next(_names)}"
    d.mkdir()
    (d / WEIGHTS).write_bytes(weights)
    (d / CONFIG).write_bytes(cfg)
    try:
        ad = _bounded(load_adapter, d)
        raw = {}
        for m in ad.modules:
            B, A = _bounded(ad.factors, m)
            assert isinstance(B, torch.Tensor) and isinstance(A, torch.Tensor)
            raw[m.name] = (_bits(ad.lora_A(m.name)), _bits(ad.lora_B(m.name)))
            for t in (ad.lora_A(m.name), ad.lora_B(m.name)):
                assert bool(torch.isfinite(t.float()).all()), f"{kind}: non-finite factor of {m.name} read"
    except AdapterError:
        event(f"{kind}: refused")
        return
    event(f"{kind}: read")
    if kind != "payload":
        assert raw == work["factors"], f"{kind} mutation read back other factors"
        return
    # a PEFT file has no checksum: a flipped payload byte reads back as exactly what the bytes say
    assert raw.keys() == work["factors"].keys()
    for name in raw:
        key = f"base_model.model.{name}.lora_"
        assert raw[name] == (_decode(weights, key + "A.weight"), _decode(weights, key + "B.weight"))


def test_the_fuzzed_files_are_valid_when_unmutated(work):
    """The property's baseline: the unmutated files read back (so a refusal is the mutation's doing)."""
    for name, c in work["containers"].items():
        p = work["root"] / f"intact-{name}"
        p.write_bytes(c["bytes"])
        assert open_container(p).verify()["ok"]
        header, payload = read_safetensors_raw(p)
        assert json.loads(header["__metadata__"]["adaptzip"])["payload_sha256"] == spec_payload_sha256(header, payload)
    manifests = [json.loads(_split(c["bytes"])[0]["__metadata__"]["adaptzip"]) for c in work["containers"].values()]
    assert any("storage" in m for m in manifests)  # the quantised one fuzzes the storage section too
    d = work["root"] / "intact-adapter"
    d.mkdir()
    (d / WEIGHTS).write_bytes(work["weights"])
    (d / CONFIG).write_text(json.dumps(work["config"]))
    ad = load_adapter(d)
    assert {m.name: (_bits(ad.lora_A(m.name)), _bits(ad.lora_B(m.name))) for m in ad.modules} == work["factors"]
