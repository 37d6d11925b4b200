"""Bad input, kept held: for every command and every kind of bad input (adapter files, options,
containers, calibration inputs, output locations, signals mid-write), adaptzip ends with

* the promised exit code: 2 for usage or bad input, 1 for a batch in which an adapter failed
  (the others are converted), 130 when interrupted;
* exactly one stderr line, ``adaptzip: error: <path>: <cause>`` naming the offending file (no
  path for an option that names no file), or ``adaptzip: interrupted`` for a signal; never a
  traceback;
* no partial output: no new file, folder or temporary file anywhere in the case's folder (a batch
  keeps only its summary, its lock and the containers of its good adapters);
* every input byte-identical (the whole case folder is hashed before and after).

The cases are one declarative table, :data:`CASES`: id, how to make the bad input, argv, expected
exit code, the path the line must name (a regex) and a regex the cause must match. In argv and
paths ``{in}`` is the case's input folder and ``{out}`` its output location, both inside one fresh
folder per case. Most cases run the real CLI entry point in this process (a full disk is a 64 KiB
tmpfs mounted on the output folder); the permission cases, a read-only output folder or an
input the user may not read (as root: CAP_DAC_OVERRIDE dropped with setpriv/capsh), and the
signals run it in separate processes, all at once (see
:data:`SERVER`). A signal lands mid-write: the process blocks in its first fsync/replace after a
file appeared in the output location (the write's temporary file), the test sends the signal,
and the write must be abandoned cleanly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import queue
import re
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from calib_fixtures import base_with_tokenizer, make_text
from clihelp import run_cli
from fixtures import (
    make_base,
    one_torch_thread,
    read_safetensors_raw,
    spec_payload_sha256,
    tiny_llama_adapter,
    tree_state,
    write_safetensors_raw,
)
from safetensors.torch import load, load_file, save, save_file

from adaptzip import api
from adaptzip import container as ct
from adaptzip.options import FitOptions

_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
FIRST = "base_model.model.model.layers.0.self_attn.q_proj"  # the first module's PEFT key prefix


# ============================================================================ shared inputs
@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """Good inputs, built once; every case copies what it needs into its own folder."""
    s = tmp_path_factory.mktemp("bad_inputs_src")
    ad = tiny_llama_adapter(s / "ad")  # 21 modules, r=8, fp32: its lora container is ~90 KB
    tiny_llama_adapter(s / "dora", dora=True, layers=2, targets=("q_proj", "v_proj"))
    tiny_llama_adapter(s / "other", seed=1)  # same shapes, other values: not the source of the containers
    make_base(s / "base")
    make_base(s / "narrow", hidden=32)  # another width: the adapter's shapes do not fit it
    text = make_text(400)
    (s / "calib.txt").write_text(text)
    base_with_tokenizer(s / "base", s / "tbase", text)
    base_with_tokenizer(s / "narrow", s / "tnarrow", text)  # so that only its width is wrong
    quick = FitOptions(baseline=False)
    api.compress(ad, s / "svd.safetensors", to="svd", rank=2, fitting=quick)
    api.compress(ad, s / "lora.safetensors", to="lora", fitting=quick)
    api.compress(s / "dora", s / "dora.safetensors", to="lora", fitting=quick)
    api.compress(ad, s / "masa.safetensors", to="masa", rank=4, fitting=quick)
    vb = {"vector_len": 16, "bank": 32, "topk": 2, "steps": 3, "refit_steps": 3}
    api.compress(ad, s / "vblora.safetensors", to="vblora", fitting=quick, **vb)  # bank F32, topk_indices U8
    return s


class Ctx:
    """One case's folder: ``in/`` (its inputs, copied from :func:`src`) and ``out/`` (the output location)."""

    def __init__(self, root: Path, src: Path):
        self.root, self.src = root, src
        self.inp, self.out = root / "in", root / "out"
        self.inp.mkdir(parents=True)
        self.out.mkdir()

    def copy(self, what: str, to: str | None = None) -> Path:
        s, d = self.src / what, self.inp / (to or what)
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir():
            shutil.copytree(s, d)
        else:
            shutil.copyfile(s, d)
        return d

    def fill(self, s: str, escape: bool = False) -> str:
        f = re.escape if escape else str
        return s.replace("{in}", f(str(self.inp))).replace("{out}", f(str(self.out)))


# ============================================================================ making bad inputs
Make = Callable[[Ctx], None]
Mutation = Callable[[Path], None]


def nothing(x: Ctx) -> None:
    return None


def inputs(*makes: Make) -> Make:
    def make(x: Ctx) -> None:
        for m in makes:
            m(x)

    return make


def copy(what: str, to: str | None = None, *mutations: Mutation) -> Make:
    """Copy a good input into ``{in}`` and apply ``mutations`` to the copy."""

    def make(x: Ctx) -> None:
        p = x.copy(what, to)
        for m in mutations:
            m(p)

    return make


def adapter(*mutations: Mutation) -> Make:
    """``{in}/ad``: the good adapter with ``mutations`` applied to its folder."""
    return copy("ad", "ad", *mutations)


def zoo(*mutations: Mutation) -> Make:
    """``{in}/zoo``: a good adapter ``good`` and the adapter ``bad`` with ``mutations`` applied."""
    return inputs(copy("ad", "zoo/good"), copy("ad", "zoo/bad", *mutations))


def container(*mutations: Mutation, src: str = "svd.safetensors", base: bool = False) -> Make:
    """``{in}/c.safetensors``: a good container (svd, lora or DoRA lora) with ``mutations``
    applied; ``base``: also the base model as ``{in}/base`` (for ``--to merged``)."""
    parts = [copy(src, "c.safetensors", *mutations)]
    if base:
        parts.append(copy("base"))
    return inputs(*parts)


def out_file(rel: str, data: bytes = b"keep") -> Make:
    """A file that already exists in the output location."""

    def make(x: Ctx) -> None:
        p = x.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    return make


def out_dir(rel: str, mode: int | None = None) -> Make:
    def make(x: Ctx) -> None:
        p = x.out / rel
        p.mkdir(parents=True)
        if mode is not None:
            p.chmod(mode)

    return make


def in_file(rel: str, data: bytes | str) -> Make:
    def make(x: Ctx) -> None:
        p = x.inp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return make


def no_access(rel: str = "") -> Mutation:
    """Take every permission off ``rel`` inside the copy (the copy itself when ""): the user of a
    ``permissions`` case may not read it (or list it, for a folder)."""
    return lambda p: (p / rel if rel else p).chmod(0)


def in_symlink_loop(rel: str) -> Make:
    def make(x: Ctx) -> None:
        os.symlink(x.inp / rel, x.inp / rel)

    return make


# ---------------------------------------------------------------------------- adapter mutations
def config(**changes) -> Mutation:
    def mut(d: Path) -> None:
        cfg = json.loads((d / CONFIG).read_text())
        cfg.update(changes)
        (d / CONFIG).write_text(json.dumps(cfg))

    return mut


def write(name: str, data: bytes | str) -> Mutation:
    def mut(d: Path) -> None:
        (d / name).write_bytes(data.encode() if isinstance(data, str) else data)

    return mut


def remove(name: str) -> Mutation:
    def mut(d: Path) -> None:
        (d / name).unlink()

    return mut


def truncate(name: str, keep: int) -> Mutation:
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``)."""

    def mut(d: Path) -> None:
        b = (d / name).read_bytes()
        (d / name).write_bytes(b[:keep])

    return mut


def tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    """Rewrite the adapter's weights file with ``fn`` applied to its tensors (in place)."""

    def mut(d: Path) -> None:
        t = load_file(d / WEIGHTS)
        fn(t)
        save_file({k: v.contiguous() for k, v in t.items()}, d / WEIGHTS)

    return mut


def _first_factor(t: dict, which: str, value: float) -> None:
    t[f"{FIRST}.lora_{which}.weight"][0, 0] = value


def _bf16_with_nan(t: dict) -> None:
    for k in t:
        t[k] = t[k].to(torch.bfloat16)
    _first_factor(t, "A", float("nan"))


def _rank0(t: dict) -> None:
    for k in list(t):
        t[k] = t[k][:0] if ".lora_A." in k else t[k][:, :0]


def _no_lora(t: dict) -> None:
    t.clear()
    t["base_model.model.lm_head.weight"] = torch.ones(4, 4)


def _conv(t: dict) -> None:
    a, b = f"{FIRST}.lora_A.weight", f"{FIRST}.lora_B.weight"
    t[a], t[b] = t[a][:, :, None, None], t[b][:, :, None, None]


def weights_header(fn: Callable[[dict], object]) -> Mutation:
    """Edit the safetensors header of the adapter's weights file (payload kept)."""

    def mut(d: Path) -> None:
        edit_header(d / WEIGHTS, fn)

    return mut


def _factors_as_i32(h: dict) -> None:
    for k, v in h.items():
        if k != "__metadata__" and ".lora_" in k:
            v["dtype"] = "I32"  # 4 bytes like F32: the payload still fits, the values are integers


class _Pwn:
    """Unpickling this creates a file: proof that a pickle was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def pickle_weights(d: Path) -> None:
    """Replace the weights by an ``adapter_model.bin`` pickle whose loading would create ``PWNED``
    in the case folder (it must be refused, never unpickled)."""
    (d / WEIGHTS).unlink()
    payload = {f"{FIRST}.lora_A.weight": _Pwn(str(d.parent.parent / "PWNED"))}
    (d / "adapter_model.bin").write_bytes(pickle.dumps(payload, protocol=2))


def weights_symlink_loop(d: Path) -> None:
    (d / WEIGHTS).unlink()
    os.symlink(WEIGHTS, d / WEIGHTS)


def weights_as_folder(d: Path) -> None:
    (d / WEIGHTS).unlink()
    (d / WEIGHTS).mkdir()


# ---------------------------------------------------------------------------- container bytes
read_st, write_st = read_safetensors_raw, write_safetensors_raw


def edit_header(p: Path, fn: Callable[[dict], object]) -> None:
    h, payload = read_st(p)
    fn(h)
    write_st(p, h, payload)


def manifest(fn: Callable[[dict], object], rehash: bool = False) -> Mutation:
    """Edit the manifest (a dict); ``rehash``: then recompute ``payload_sha256`` as a careful
    forger would, so that only the deeper checks can catch the edit."""

    def mut(p: Path) -> None:
        h, payload = read_st(p)
        m = json.loads(h["__metadata__"]["adaptzip"])
        fn(m)
        if rehash:
            m["payload_sha256"] = spec_payload_sha256(h, payload)
        h["__metadata__"]["adaptzip"] = json.dumps(m, sort_keys=True, separators=(",", ":"))
        write_st(p, h, payload)

    return mut


def metadata(value: dict) -> Mutation:
    """Replace the whole ``__metadata__`` (string → string)."""
    return lambda p: edit_header(p, lambda h: h.__setitem__("__metadata__", value))


def rehash(p: Path) -> None:
    manifest(lambda m: None, rehash=True)(p)


def container_tensors(fn: Callable[[dict[str, torch.Tensor]], None]) -> Mutation:
    """Rewrite the container's tensors (``fn`` edits them in place), same metadata, hash recomputed."""

    def mut(p: Path) -> None:
        h, _ = read_st(p)
        t = load_file(p)
        fn(t)
        save_file({k: v.contiguous() for k, v in t.items()}, p, metadata=h["__metadata__"])
        rehash(p)

    return mut


def flip_payload(p: Path) -> None:
    b = bytearray(p.read_bytes())
    n = struct.unpack("<Q", b[:8])[0]
    b[8 + n + (len(b) - 8 - n) // 2] ^= 0x01  # a mantissa bit: the value stays finite
    p.write_bytes(bytes(b))


def nan_in(name: str) -> Mutation:
    def mut(p: Path) -> None:
        h, payload = read_st(p)
        assert h[name]["dtype"] == "F32"
        b = h[name]["data_offsets"][0]
        payload = payload[:b] + struct.pack("<f", float("nan")) + payload[b + 4 :]
        write_st(p, h, payload)
        rehash(p)

    return mut


def first_byte(name: str, value: int) -> Mutation:
    """Set the first byte of tensor ``name`` (e.g. an index past the bank), hash recomputed."""

    def mut(p: Path) -> None:
        h, payload = read_st(p)
        b = h[name]["data_offsets"][0]
        write_st(p, h, payload[:b] + bytes([value]) + payload[b + 1 :])
        rehash(p)

    return mut


def append(data: bytes) -> Mutation:
    return lambda p: p.write_bytes(p.read_bytes() + data)


def cut(keep: int) -> Mutation:
    return lambda p: p.write_bytes(p.read_bytes()[:keep])


def header_length(n: int) -> Mutation:
    return lambda p: p.write_bytes(struct.pack("<Q", n) + p.read_bytes()[8:])


def shared_reference(altered: bool, table: str = "manifest") -> Mutation:
    """Move ``A.0`` to a zoo-level shared file referenced by hash (formats/shared.md): missing
    (``altered=False``), or present beside the container with bytes that do not match its hash.
    ``table``: where the module table lives — ``manifest``; ``shared`` (moved to the shared file,
    intact and present: only ``edit`` breaks it); ``none`` (the manifest says ``"shared"``, the
    shared file holds none); ``no-reference`` (the manifest says ``"shared"`` and references no
    shared file); ``edited`` (the shared file's table gives module 0 another rank)."""

    def mut(p: Path) -> None:
        h, _ = read_st(p)
        t = load_file(p)
        m = json.loads(h["__metadata__"]["adaptzip"])
        meta: dict = {}
        if table in ("shared", "edited"):
            meta["modules"] = json.loads(json.dumps(m["modules"]))
            if table == "edited":
                meta["modules"][0]["rank"] += 1
        good = save({"A.0": t.pop("A.0")}, metadata={"adaptzip_shared": json.dumps(meta)})
        digest = hashlib.sha256(good).hexdigest()
        if table != "no-reference":
            m["shared"] = {"file": f"_shared/{digest}.safetensors", "sha256": digest, "tensors": ["A.0"]}
        else:
            t["A.0"] = load(good)["A.0"]
        if table != "manifest":
            m["modules"] = "shared"
        save_file(t, p, metadata={"adaptzip": json.dumps(m, sort_keys=True, separators=(",", ":"))})
        rehash(p)
        if altered or table != "manifest":
            (p.parent / "_shared").mkdir()
            data = good[:-1] + bytes([good[-1] ^ 1]) if altered else good
            (p.parent / "_shared" / f"{digest}.safetensors").write_bytes(data)

    return mut


def svd_rank_padded(p: Path) -> None:
    """Module 0 of the svd container stored at its source rank + 1 (a zero row and column
    appended, the manifest and payload hash made to agree): what a truncation cannot be."""
    t = load_file(p)
    h, _ = read_st(p)
    m = json.loads(h["__metadata__"]["adaptzip"])
    r = m["modules"][0]["rank"]
    A, B = t["A.0"], t["B.0"]
    t["A.0"] = torch.cat([A, torch.zeros(r + 1 - A.shape[0], A.shape[1], dtype=A.dtype)])
    t["B.0"] = torch.cat([B, torch.zeros(B.shape[0], r + 1 - B.shape[1], dtype=B.dtype)], 1)
    m["state"]["ranks"][0] = r + 1
    save_file(t, p, metadata={"adaptzip": json.dumps(m, sort_keys=True, separators=(",", ":"))})
    rehash(p)


def _bump_first_rank(m: dict) -> None:
    m["state"]["ranks"][0] += 1


def _module_in_two_groups(m: dict) -> None:
    m["state"]["groups"][0] = [0, 0]


def _halve_module_rank(m: dict) -> None:
    m["modules"][0]["rank"] //= 2


def _calibration_with(text: bytes | str | None = None, base: str = "tbase") -> Make:
    parts = [adapter(), copy(base, base)]
    parts.append(copy("calib.txt") if text is None else in_file("calib.txt", text))
    return inputs(*parts)


# ============================================================================ the cases
@dataclass(frozen=True)
class Case:
    id: str
    make: Make
    argv: tuple[str, ...]
    code: int = 2
    path: str | None = None  # regex of the path the line names; None: an option error (any or no path)
    cause: str = ""  # regex searched in the cause
    keep: tuple[str, ...] = ()  # new entries allowed (relative to the case folder): a batch's summary, good containers
    run: str = "cli"  # cli | permissions (permission bits hold, also as root) | diskfull | SIGINT | SIGTERM
    json: bool = True  # append --json (human output, tables and progress, stays off stdout and stderr)
    after: str = ""  # a signal case: the signal lands while writing another file, once this one is written


def bad(id: str, make: Make, argv: tuple[str, ...], path: str | None, cause: str, **kw) -> Case:
    return Case(id, make, tuple(argv), path=path, cause=cause, **kw)


AD = r"{in}/ad"
W = r"{in}/ad/adapter_model\.safetensors"
CFG = r"{in}/ad/adapter_config\.json"
W_OR_CFG = rf"{W}|{CFG}"
BIN = r"{in}/ad/adapter_model\.bin"
BAD = r"{in}/zoo/bad/adapter_model\.safetensors"
C = r"{in}/c\.safetensors"
TEXT = r"{in}/calib\.txt"

INSPECT = ("inspect", "{in}/ad")
COMPRESS = ("compress", "{in}/ad", "-o", "{out}/c.safetensors")
BATCH = ("batch", "{in}/zoo", "-o", "{out}/b", "--to", "svd", "--rank", "2", "--jobs", "1")
BATCH_KEEP = ("out/b", "out/b/batch.json", "out/b/batch.md", "out/b/.adaptzip-batch.lock")
BATCH_PARTIAL = BATCH_KEEP + ("out/b/good.safetensors",)
VERIFY = ("verify", "{in}/c.safetensors")
EXPAND = ("expand", "{in}/c.safetensors", "-o", "{out}/peft")
DENSE = ("expand", "{in}/c.safetensors", "-o", "{out}/delta.safetensors", "--to", "dense")
MERGED = ("expand", "{in}/c.safetensors", "-o", "{out}/merged", "--to", "merged", "--base-model", "{in}/base")
REPORT = ("report", "{in}/c.safetensors", "--out", "{out}/report")
CALIB = (
    *COMPRESS,
    *("--to", "svd", "--rank", "2", "--calib-tokens", "2000", "--calib-steps", "0"),
    *("--base-model", "{in}/tbase", "--calib", "{in}/calib.txt"),
)

NOT_SAFETENSORS = r"(?i)safetensors|corrupt|truncated|header"
NON_FINITE = r"(?i)nan|inf|non-finite|not finite"
LOOP = r"(?i)symbolic link|symlink|loop"
PICKLE = r"(?i)refused|pickle|weights_only|unsafe|not loadable"
SHA = r"(?i)sha256|corrupt"
SHAPE = r"(?i)shape"
EXISTS = r"(?i)exists"
INPUT = r"(?i)input"
NOT_A_DIR = r"(?i)not a (directory|folder)"
DENIED = r"(?i)permission denied|read-only|not writable"
NO_SPACE = r"(?i)no space|disk (is )?full|space left"
# what each command of the signal cases runs on: (inputs, argv, new entries a batch keeps)
SIGNAL_INPUTS = {
    "compress": (adapter(), ("compress", "{in}/ad", "-o", "{out}/c.safetensors", "--to", "lora"), (), ""),
    "expand": (container(src="lora.safetensors"), ("expand", "{in}/c.safetensors", "-o", "{out}/peft"), (), ""),
    "batch": (
        inputs(copy("ad", "zoo/a"), copy("ad", "zoo/b")),
        ("batch", "{in}/zoo", "-o", "{out}/b", "--to", "lora", "--jobs", "1"),
        BATCH_KEEP,
        "",
    ),
    # the Σ statistics are written beside the container first: the signal lands while the
    # container is written, and the finished statistics file must go too
    "compress-calibrated": (_calibration_with(), CALIB, (), "c.stats.safetensors"),
}

# fmt: off
CASES: list[Case] = [
    # ------------------------------------------------------------------ adapter folders and files
    bad("inspect-missing-dir", nothing, ("inspect", "{in}/nope"), r"{in}/nope", r"(?i)no such"),
    bad("compress-missing-dir", nothing, ("compress", "{in}/nope", "-o", "{out}/c.safetensors"), r"{in}/nope", "(?i)no such"),
    bad("inspect-adapter-is-a-file", in_file("ad", "x"), INSPECT, AD, NOT_A_DIR),
    bad("inspect-dir-symlink-loop", in_symlink_loop("ad"), INSPECT, AD, LOOP),
    bad("inspect-no-config", adapter(remove(CONFIG)), INSPECT, AD, r"adapter_config\.json"),
    bad("compress-no-config", adapter(remove(CONFIG)), COMPRESS, AD, r"adapter_config\.json"),
    bad("compress-config-bad-json", adapter(write(CONFIG, "{not json")), COMPRESS, CFG, r"JSON"),
    bad("inspect-config-not-object", adapter(write(CONFIG, "[1, 2]")), INSPECT, CFG, r"object"),
    bad("compress-config-not-utf8", adapter(write(CONFIG, b'{"r": "\xff"}')), COMPRESS, CFG, r"UTF-8|JSON"),
    bad("compress-config-r-not-a-number", adapter(config(r="eight")), COMPRESS, CFG, r"\br\b"),
    bad("compress-config-alpha-null", adapter(config(lora_alpha=None)), COMPRESS, CFG, r"lora_alpha"),
    bad("compress-config-alpha-nan", adapter(config(lora_alpha=float("nan"))), COMPRESS, CFG, r"lora_alpha.*finite"),
    bad("inspect-config-rank-infinite", adapter(config(r=float("inf"))), INSPECT, CFG, r"\br\b.*finite"),
    bad("compress-config-alpha-pattern-nan", adapter(config(alpha_pattern={"q_proj": float("nan")})), COMPRESS, CFG, r"alpha_pattern.*finite"),
    bad("compress-config-alpha-pattern-not-object", adapter(config(alpha_pattern=5)), COMPRESS, CFG, r"alpha_pattern"),
    bad("compress-config-rank-pattern-bad-value", adapter(config(rank_pattern={"q_proj": "x"})), COMPRESS, CFG, r"rank_pattern"),
    bad("compress-peft-type-ia3", adapter(config(peft_type="IA3")), COMPRESS, CFG, r"IA3"),
    bad("compress-config-without-peft-type", adapter(config(peft_type=None)), COMPRESS, CFG, r"peft_type"),
    bad("inspect-missing-weights", adapter(remove(WEIGHTS)), INSPECT, AD, r"adapter_model"),
    bad("compress-weights-is-a-folder", adapter(weights_as_folder), COMPRESS, rf"{W}|{AD}", r"(?i)not a (regular )?file|directory|adapter_model"),
    bad("compress-truncated-weights", adapter(truncate(WEIGHTS, -100)), COMPRESS, W, r"(?i)truncated"),
    bad("inspect-truncated-header", adapter(truncate(WEIGHTS, 20)), INSPECT, W, NOT_SAFETENSORS),
    bad("compress-empty-weights", adapter(write(WEIGHTS, b"")), COMPRESS, W, NOT_SAFETENSORS),
    bad("compress-garbage-weights", adapter(write(WEIGHTS, bytes(range(256)) * 16)), COMPRESS, W, NOT_SAFETENSORS),
    bad("inspect-weights-header-not-object", adapter(write(WEIGHTS, struct.pack("<Q", 8) + b"[1]     ")), INSPECT, W, NOT_SAFETENSORS),
    bad("compress-integer-factors-i32", adapter(weights_header(_factors_as_i32)), COMPRESS, W, r"(?i)I32|int|dtype"),
    bad("inspect-integer-factors-i32", adapter(weights_header(_factors_as_i32)), INSPECT, W, r"(?i)I32|int|dtype"),
    bad("compress-nan-factor", adapter(tensors(lambda t: _first_factor(t, "A", float("nan")))), COMPRESS, W, NON_FINITE),
    bad("inspect-nan-factor", adapter(tensors(lambda t: _first_factor(t, "A", float("nan")))), INSPECT, W, NON_FINITE),
    bad("compress-nan-factor-bf16", adapter(tensors(_bf16_with_nan)), COMPRESS, W, NON_FINITE),
    bad("compress-inf-factor", adapter(tensors(lambda t: _first_factor(t, "B", float("inf")))), COMPRESS, W, NON_FINITE),
    bad("inspect-inf-factor", adapter(tensors(lambda t: _first_factor(t, "B", float("-inf")))), INSPECT, W, NON_FINITE),
    bad("compress-rank0-factors-r0-config", adapter(tensors(_rank0), config(r=0)), COMPRESS, W_OR_CFG, r"(?i)rank|\br\b"),
    bad("inspect-rank0-factors", adapter(tensors(_rank0)), INSPECT, W_OR_CFG, r"(?i)rank"),
    bad("compress-rank-disagrees-with-config", adapter(config(r=4)), COMPRESS, W_OR_CFG, r"(?i)rank|r=4"),
    bad("compress-rank-pattern-disagrees", adapter(config(rank_pattern={"q_proj": 4})), COMPRESS, W_OR_CFG, r"(?i)rank|r=4"),
    bad("compress-a-b-ranks-differ", adapter(tensors(lambda t: t.__setitem__(f"{FIRST}.lora_B.weight", torch.ones(64, 4)))), COMPRESS, W, r"(?i)rank"),
    bad("compress-no-lora-tensors", adapter(tensors(_no_lora)), COMPRESS, W, r"(?i)no lora|lora_A"),
    bad("compress-missing-lora-b", adapter(tensors(lambda t: t.pop(f"{FIRST}.lora_B.weight"))), COMPRESS, W, r"lora_B"),
    bad("compress-conv-factors", adapter(tensors(_conv)), COMPRESS, W, r"(?i)convolution|4-D|not supported"),
    bad("compress-dora-without-magnitudes", adapter(config(use_dora=True)), COMPRESS, W_OR_CFG, r"(?i)dora|magnitude"),
    bad("compress-bin-pickle-never-unpickled", adapter(pickle_weights), COMPRESS, BIN, PICKLE),
    bad("inspect-bin-pickle-never-unpickled", adapter(pickle_weights), INSPECT, BIN, PICKLE),
    bad("compress-weights-symlink-loop", adapter(weights_symlink_loop), COMPRESS, W, LOOP),
    bad("batch-truncated-weights", zoo(truncate(WEIGHTS, -100)), BATCH, BAD, r"(?i)truncated", code=1, keep=BATCH_PARTIAL),
    bad("batch-nan-factor", zoo(tensors(lambda t: _first_factor(t, "A", float("nan")))), BATCH, BAD, NON_FINITE, code=1, keep=BATCH_PARTIAL),
    bad("batch-bin-pickle-never-unpickled", zoo(pickle_weights), BATCH, r"{in}/zoo/bad/adapter_model\.bin", PICKLE, code=1, keep=BATCH_PARTIAL),
    bad("batch-weights-symlink-loop", zoo(weights_symlink_loop), BATCH, BAD, LOOP, code=1, keep=BATCH_PARTIAL),
    bad("batch-config-bad-json", zoo(write(CONFIG, "{not json")), BATCH, r"{in}/zoo/bad/adapter_config\.json", r"JSON", code=1, keep=BATCH_PARTIAL),
    # ------------------------------------------------------------------ options
    bad("compress-unknown-form", adapter(), (*COMPRESS, "--to", "bogus"), None, r"--to"),
    bad("compress-option-of-another-form", adapter(), (*COMPRESS, "--to", "svd", "--experts", "3"), None, r"experts"),
    bad("compress-unknown-opt-key", adapter(), (*COMPRESS, "--opt", "bogus=1"), None, r"bogus"),
    bad("compress-opt-without-value", adapter(), (*COMPRESS, "--opt", "bogus"), None, r"KEY=VALUE|bogus"),
    bad("compress-missing-output-option", adapter(), ("compress", "{in}/ad"), None, r"-o|--output"),
    bad("compress-budget-words", adapter(), (*COMPRESS, "--budget", "lots"), None, r"budget"),
    bad("compress-budget-negative", adapter(), (*COMPRESS, "--budget", "-0.5"), None, r"budget"),
    bad("compress-budget-zero", adapter(), (*COMPRESS, "--budget", "0"), None, r"budget"),
    bad("compress-budget-unknown-unit", adapter(), (*COMPRESS, "--budget", "5XB"), None, r"budget"),
    bad("compress-budget-nan", adapter(), (*COMPRESS, "--budget", "nan"), None, r"budget"),
    bad("compress-budget-inf", adapter(), (*COMPRESS, "--budget", "inf"), None, r"budget"),
    bad("compress-budget-below-overhead", adapter(), (*COMPRESS, "--budget", "100"), None, r"(?=.*budget)(?=.*\b100\b)(?=.*\d{4})"),
    bad("compress-rank-zero", adapter(), (*COMPRESS, "--to", "svd", "--rank", "0"), None, r"rank"),
    bad("compress-rank-negative", adapter(), (*COMPRESS, "--rank", "-1"), None, r"rank"),
    bad("compress-opt-of-wrong-type", adapter(), (*COMPRESS, "--opt", "rank=abc"), None, r"rank"),
    bad("compress-bslora-ranks-wrong-arity", adapter(), (*COMPRESS, "--to", "bslora-ke", "--ranks", "1,2"), None, r"ranks"),
    bad("compress-vblora-vector-len-not-dividing", adapter(), (*COMPRESS, "--to", "vblora", "--vector-len", "7"), None, r"vector.len"),
    bad("compress-masa-group-zero", adapter(), (*COMPRESS, "--to", "masa", "--group", "0"), None, r"group"),
    bad("compress-seed-not-a-number", adapter(), (*COMPRESS, "--seed", "abc"), None, r"seed"),
    bad("compress-masa-rank-zero", adapter(), (*COMPRESS, "--to", "masa", "--rank", "0"), None, r"rank"),
    bad("compress-quant-auto-without-budget", adapter(), (*COMPRESS, "--quant", "auto"), None, r"budget"),
    bad("compress-to-auto-without-base-model", adapter(), (*COMPRESS, "--to", "auto", "--budget", "0.5"), None, r"base-model"),
    bad("compress-calib-without-base-model", inputs(adapter(), copy("calib.txt")), (*COMPRESS, "--calib", "{in}/calib.txt"), None, r"base-model"),
    bad("compress-calib-time-without-base-model", adapter(), (*COMPRESS, "--calib-time", "10m"), None, r"base-model"),
    bad("calib-time-words", _calibration_with(), (*CALIB, "--calib-time", "soon"), None, r"calib-time"),
    bad("calib-time-zero", _calibration_with(), (*CALIB, "--calib-time", "0s"), None, r"calib-time"),
    bad("calib-precision-unknown", _calibration_with(), (*CALIB, "--precision", "fp8"), None, r"precision"),
    bad("compress-threads-zero", adapter(), (*COMPRESS, "--threads", "0"), None, r"threads"),
    bad("compress-bad-dtype", adapter(), (*COMPRESS, "--dtype", "fp8"), None, r"dtype"),
    bad("compress-calib-tokens-zero", _calibration_with(), (*CALIB, "--calib-tokens", "0"), None, r"tokens"),
    bad("compress-calib-steps-negative", _calibration_with(), (*CALIB, "--calib-steps", "-1"), None, r"steps"),
    bad("compress-calib-max-steps-below-the-cap", _calibration_with(), (*CALIB, "--calib-steps", "40", "--calib-max-steps", "20"), None, r"--calib-max-steps 20 must be ≥ --calib-steps 40"),
    bad("compress-unknown-device", _calibration_with(), (*CALIB, "--device", "tpu"), None, r"device"),
    bad("compress-group-size-zero", adapter(), (*COMPRESS, "--quant", "int8", "--group-size", "0"), None, r"group.size"),
    bad("compress-group-size-negative", adapter(), (*COMPRESS, "--quant", "int8", "--group-size", "-8"), None, r"group.size"),
    bad("compress-group-size-not-a-number", adapter(), (*COMPRESS, "--group-size", "abc"), None, r"group-size"),
    bad("expand-bad-dtype", container(), (*EXPAND, "--dtype", "fp8"), None, r"dtype"),
    bad("expand-unknown-to", container(), (*EXPAND, "--to", "bogus"), None, r"--to"),
    bad("expand-unknown-target", container(), (*EXPAND, "--target", "triton"), None, r"--target"),
    bad("expand-dense-with-vllm-target", container(), (*DENSE, "--target", "vllm"), None, r"--target"),
    bad("expand-vllm-max-lora-rank-0", container(), (*EXPAND, "--target", "vllm", "--max-lora-rank", "0"), None, r"max.lora.rank"),
    bad("expand-vllm-max-lora-rank-3", container(), (*EXPAND, "--target", "vllm", "--max-lora-rank", "3"), None, r"max.lora.rank"),
    bad("expand-merged-without-base-model", container(), ("expand", "{in}/c.safetensors", "-o", "{out}/m", "--to", "merged"), None, r"base-model"),
    bad("expand-peft-vblora-of-svd", container(), (*EXPAND, "--to", "peft-vblora"), C, r"vblora"),
    bad("expand-peft-native-of-svd", container(), (*EXPAND, "--to", "peft-native"), C, r"peft-native.*svd"),
    bad("expand-peft-native-flipped-payload-byte", container(flip_payload, src="vblora.safetensors"), (*EXPAND, "--to", "peft-native"), C, SHA),
    bad("expand-peft-native-index-past-the-bank", container(first_byte("topk_indices", 200), src="vblora.safetensors"), (*EXPAND, "--to", "peft-native"), C, r"(?i)index|indices|bank|range"),
    bad("batch-missing-zoo", nothing, ("batch", "{in}/nope", "-o", "{out}/b"), r"{in}/nope", r"(?i)no such"),
    bad("batch-output-contains-zoo", zoo(), ("batch", "{in}/zoo", "-o", "{in}"), r"{in}", r"contain"),
    bad("batch-jobs-zero", zoo(), (*BATCH[:-2], "--jobs", "0"), None, r"jobs"),
    bad("batch-jobs-negative", zoo(), (*BATCH[:-2], "--jobs", "-1"), None, r"jobs"),
    bad("batch-unknown-executor", zoo(), (*BATCH, "--executor", "dask"), None, r"executor"),
    bad("batch-unknown-opt-key", zoo(), (*BATCH, "--opt", "bogus=1"), None, r"bogus"),
    bad("batch-bad-budget", zoo(), (*BATCH, "--budget", "lots"), None, r"budget"),
    bad("batch-unknown-form", zoo(), (*BATCH, "--to", "bogus"), None, r"--to"),
    bad("batch-group-size-zero", zoo(), (*BATCH, "--quant", "int8", "--group-size", "0"), None, r"group.size"),
    bad("batch-shared-basis-with-quant", zoo(), (*BATCH, "--shared-basis", "--quant", "int8"), None, r"shared-basis"),
    bad("forms-unknown-flag", nothing, ("forms", "--bogus"), None, r"bogus"),
    bad("unknown-command", nothing, ("frobnicate",), None, r"frobnicate", json=False),
    bad("report-against-another-adapter", inputs(container(), copy("other")), (*REPORT, "--against", "{in}/other"), rf"{C}|{{in}}/other", r"source"),
    bad("report-against-missing-dir", container(), (*REPORT, "--against", "{in}/nope"), r"{in}/nope", r"(?i)no such"),
    # ------------------------------------------------------------------ containers
    bad("verify-missing", nothing, VERIFY, C, r"(?i)no such"),
    bad("expand-missing", nothing, EXPAND, C, r"(?i)no such"),
    bad("report-missing", nothing, REPORT, C, r"(?i)no such"),
    bad("verify-not-safetensors", in_file("c.safetensors", "just some text\n" * 8), VERIFY, C, NOT_SAFETENSORS),
    bad("expand-dense-not-safetensors", in_file("c.safetensors", "just some text\n" * 8), DENSE, C, NOT_SAFETENSORS),
    bad("verify-a-folder", lambda x: (x.inp / "c.safetensors").mkdir(), VERIFY, C, r"(?i)not a file"),
    bad("verify-empty-file", in_file("c.safetensors", b""), VERIFY, C, NOT_SAFETENSORS),
    bad("verify-truncated", container(cut(-50)), VERIFY, C, r"(?i)truncated"),
    bad("expand-truncated", container(cut(-50)), EXPAND, C, r"(?i)truncated"),
    bad("expand-merged-truncated", container(cut(-50), base=True), MERGED, C, r"(?i)truncated"),
    bad("verify-trailing-bytes", container(append(b"\0" * 16)), VERIFY, C, r"(?i)not fully covered|trailing|not a readable"),
    bad("verify-huge-header-length", container(header_length(1 << 40)), VERIFY, C, NOT_SAFETENSORS),
    bad("verify-flipped-payload-byte", container(flip_payload), VERIFY, C, SHA),
    bad("expand-flipped-payload-byte", container(flip_payload), EXPAND, C, SHA),
    bad("expand-dense-flipped-payload-byte", container(flip_payload), DENSE, C, SHA),
    bad("expand-merged-flipped-payload-byte", container(flip_payload, base=True), MERGED, C, SHA),
    bad("report-flipped-payload-byte", container(flip_payload), REPORT, C, SHA),
    bad("verify-edited-manifest-hash", container(manifest(lambda m: m.update(payload_sha256="0" * 64))), VERIFY, C, SHA),
    bad("expand-edited-manifest-hash", container(manifest(lambda m: m.update(payload_sha256="0" * 64))), EXPAND, C, SHA),
    bad("verify-edited-rank", container(manifest(_bump_first_rank)), VERIFY, C, SHAPE),
    bad("expand-edited-rank", container(manifest(_bump_first_rank)), EXPAND, C, SHAPE),
    bad("expand-dense-edited-rank", container(manifest(_bump_first_rank)), DENSE, C, SHAPE),
    bad("verify-edited-module-rank-lora", container(manifest(_halve_module_rank), src="lora.safetensors"), VERIFY, C, r"(?i)shape|rank"),
    bad("expand-edited-module-rank-lora", container(manifest(_halve_module_rank), src="lora.safetensors"), EXPAND, C, r"(?i)shape|rank"),
    bad("verify-newer-format-version", container(manifest(lambda m: m.update(format_version=2))), VERIFY, C, r"format_version 2 is newer"),
    bad("expand-newer-format-version", container(manifest(lambda m: m.update(format_version=2))), EXPAND, C, r"format_version 2 is newer"),
    bad("verify-unknown-form", container(manifest(lambda m: m.update(form="svd9"))), VERIFY, C, r"unknown form 'svd9'"),
    bad("expand-unknown-form", container(manifest(lambda m: m.update(form="svd9"))), EXPAND, C, r"unknown form 'svd9'"),
    bad("verify-nan-with-recomputed-hash", container(nan_in("A.0")), VERIFY, C, NON_FINITE),
    bad("expand-nan-with-recomputed-hash", container(nan_in("A.0")), EXPAND, C, NON_FINITE),
    bad("expand-dense-nan-with-recomputed-hash", container(nan_in("B.3")), DENSE, C, NON_FINITE),
    bad("report-nan-with-recomputed-hash", container(nan_in("A.0")), REPORT, C, NON_FINITE),
    bad("verify-missing-shared-file", container(shared_reference(altered=False)), VERIFY, C, r"shared file .*missing"),
    bad("expand-missing-shared-file", container(shared_reference(altered=False)), EXPAND, C, r"shared file .*missing"),
    bad("verify-altered-shared-file", container(shared_reference(altered=True)), VERIFY, r"{in}/_shared/[0-9a-f]{64}\.safetensors", r"does not match"),
    bad("verify-table-in-shared-file-altered", container(shared_reference(altered=True, table="shared")), VERIFY, r"{in}/_shared/[0-9a-f]{64}\.safetensors", r"does not match"),
    bad("verify-table-in-shared-file-absent", container(shared_reference(altered=False, table="none")), VERIFY, r"{in}/_shared/[0-9a-f]{64}\.safetensors", r"holds no module table"),
    bad("expand-table-shared-without-reference", container(shared_reference(altered=False, table="no-reference")), EXPAND, C, r"references no shared file"),
    bad("expand-table-in-shared-file-edited-rank", container(shared_reference(altered=False, table="edited")), EXPAND, C, r"rank"),
    bad("verify-masa-module-in-two-groups", container(manifest(_module_in_two_groups), src="masa.safetensors"), VERIFY, C, r"(?i)group|state"),
    bad("expand-masa-module-in-two-groups", container(manifest(_module_in_two_groups), src="masa.safetensors"), EXPAND, C, r"(?i)group|state"),
    bad("verify-svd-rank-above-the-source", container(svd_rank_padded), VERIFY, C, r"state does not fit form svd: state\.ranks\[0\]"),
    bad("verify-lora-state-unknown-entry", container(manifest(lambda m: m["state"].update(ranks=[4] * 8)), src="lora.safetensors"), VERIFY, C, r"state does not fit form lora: ranks"),
    bad("expand-vblora-state-rank-halved", container(manifest(lambda m: m["state"].update(rank=m["state"]["rank"] // 2)), src="vblora.safetensors"), EXPAND, C, r"state does not fit form vblora"),
    bad("expand-peft-vblora-flipped-payload-byte", container(flip_payload, src="vblora.safetensors"), (*EXPAND, "--to", "peft-vblora"), C, SHA),
    bad("expand-peft-vblora-nan-with-recomputed-hash", container(nan_in("bank"), src="vblora.safetensors"), (*EXPAND, "--to", "peft-vblora"), C, NON_FINITE),
    bad("verify-vblora-index-past-the-bank", container(first_byte("topk_indices", 200), src="vblora.safetensors"), VERIFY, C, r"(?i)index|indices|bank|range"),
    bad("expand-peft-vblora-index-past-the-bank", container(first_byte("topk_indices", 200), src="vblora.safetensors"), (*EXPAND, "--to", "peft-vblora"), C, r"(?i)index|indices|bank|range"),
    bad("expand-vblora-index-past-the-bank", container(first_byte("topk_indices", 200), src="vblora.safetensors"), EXPAND, C, r"(?i)index|indices|bank|range"),
    bad("verify-no-manifest", container(metadata({"format": "pt"})), VERIFY, C, r"no adaptzip manifest"),
    bad("verify-manifest-not-json", container(metadata({"adaptzip": "{not json"})), VERIFY, C, r"not valid JSON"),
    bad("verify-manifest-not-an-object", container(metadata({"adaptzip": "[1, 2]"})), VERIFY, C, r"format"),
    bad("verify-manifest-schema-violation", container(manifest(lambda m: m.update(dtype="fp8"))), VERIFY, C, r"schema"),
    bad("verify-undescribed-tensor", container(container_tensors(lambda t: t.__setitem__("X.0", torch.zeros(2)))), VERIFY, C, r"not described"),
    bad("expand-missing-tensor", container(container_tensors(lambda t: t.pop("B.0"))), EXPAND, C, r"missing"),
    bad("verify-wrong-tensor-dtype", container(container_tensors(lambda t: t.__setitem__("A.0", t["A.0"].half()))), VERIFY, C, r"dtype"),
    bad("expand-merged-base-of-another-width", inputs(container(), copy("narrow", "base")), MERGED, r"{in}/base(/.*)?", r"(?i)shape|\[\d+, \d+\]"),
    bad("expand-merged-base-missing", container(), MERGED, r"{in}/base", r"(?i)no such|not a directory"),
    bad("expand-merged-base-without-weights", inputs(container(), copy("base", "base", remove("model.safetensors"))), MERGED, r"{in}/base", r"model\.safetensors"),
    bad("expand-vllm-dora", container(src="dora.safetensors"), (*EXPAND, "--target", "vllm"), C, r"DoRA"),
    bad("expand-dense-dora", container(src="dora.safetensors"), DENSE, C, r"DoRA"),
    # ------------------------------------------------------------------ calibration inputs
    bad("calib-empty-text", _calibration_with("\n \n\t\n"), CALIB, TEXT, r"(?i)no text|empty"),
    bad("calib-binary-text", _calibration_with(bytes(range(256)) * 4), CALIB, TEXT, r"UTF-8"),
    bad("calib-too-few-tokens", _calibration_with("the red cat sees the dog near the house.\n"), CALIB, TEXT, r"tokens"),
    bad("calib-jsonl-without-text-field", inputs(adapter(), copy("tbase"), in_file("calib.jsonl", '{"body": "x"}\n')), tuple(a.replace("calib.txt", "calib.jsonl") for a in CALIB), r"{in}/calib\.jsonl", r"text"),
    bad("calib-eval-missing", _calibration_with(), (*CALIB, "--eval", "{in}/nope.txt"), r"{in}/nope\.txt", r"(?i)no such"),
    bad("calib-stats-garbage", inputs(_calibration_with(), in_file("stats.safetensors", "garbage")), (*CALIB, "--stats", "{in}/stats.safetensors"), r"{in}/stats\.safetensors", r"(?i)statistics|safetensors"),
    bad("compress-stats-garbage-without-base-model", inputs(adapter(), in_file("stats.safetensors", "garbage")), (*COMPRESS, "--stats", "{in}/stats.safetensors"), r"{in}/stats\.safetensors", r"(?i)statistics|safetensors"),
    bad("calib-dora-adapter", inputs(copy("dora", "ad"), copy("tbase"), copy("calib.txt")), CALIB, rf"{AD}|{W}|{CFG}", r"DoRA"),
    bad("calib-missing-text", inputs(adapter(), copy("tbase")), CALIB, TEXT, r"(?i)no such"),
    bad("calib-base-of-another-width", _calibration_with(base="tnarrow"), tuple(a.replace("tbase", "tnarrow") for a in CALIB), r"{in}/tnarrow", SHAPE),
    bad("calib-base-without-tokenizer", _calibration_with(base="base"), tuple(a.replace("tbase", "base") for a in CALIB), r"{in}/base", r"tokenizer"),
    bad("compress-device-without-base-model", adapter(), (*COMPRESS, "--device", "tpu9"), None, r"--device.*--base-model"),
    bad("compress-calib-steps-without-base-model", adapter(), (*COMPRESS, "--calib-steps", "5"), None, r"--calib-steps.*--base-model"),
    bad("compress-precision-with-stats-alone", inputs(adapter(), copy("calib.txt")), (*COMPRESS, "--stats", "{in}/s.safetensors", "--precision", "bf16"), None, r"--precision.*--base-model"),
    bad("calib-lr-negative", _calibration_with(), (*CALIB, "--calib-lr", "-1"), None, r"calib-lr"),
    bad("calib-lr-nan", _calibration_with(), (*CALIB, "--calib-lr", "nan"), None, r"calib-lr"),
    bad("calib-device-bogus", _calibration_with(), (*CALIB, "--device", "tpu9"), None, r"--device"),
    bad("calib-then-budget-too-small", _calibration_with(), (*COMPRESS, "--to", "bslora-ke", "--budget", "0.001", *CALIB[-8:]), AD, r"(?i)budget"),
    bad("calib-base-missing", inputs(adapter(), copy("calib.txt")), tuple(a.replace("tbase", "nobase") for a in CALIB), r"{in}/nobase", r"(?i)no such"),
    # ------------------------------------------------------------------ output locations
    bad("compress-output-exists", inputs(adapter(), out_file("c.safetensors")), COMPRESS, r"{out}/c\.safetensors", EXISTS),
    bad("compress-output-is-a-folder", inputs(adapter(), out_dir("c.safetensors")), COMPRESS, r"{out}/c\.safetensors", EXISTS),
    bad("compress-force-output-is-a-folder", inputs(adapter(), out_file("c.safetensors/keep")), (*COMPRESS, "--force"), r"{out}/c\.safetensors", r"(?i)is a folder"),
    bad("expand-dense-force-output-is-a-folder", inputs(container(), out_file("delta.safetensors/keep")), (*DENSE, "--force"), r"{out}/delta\.safetensors", r"(?i)is a folder"),
    bad("expand-output-exists", inputs(container(), out_file("peft/x")), EXPAND, r"{out}/peft", EXISTS),
    bad("expand-dense-output-exists", inputs(container(), out_file("delta.safetensors")), DENSE, r"{out}/delta\.safetensors", EXISTS),
    bad("report-output-exists", inputs(container(), out_file("report/x")), REPORT, r"{out}/report", EXISTS),
    bad("compress-output-is-the-weights-file", adapter(), ("compress", "{in}/ad", "-o", f"{{in}}/ad/{WEIGHTS}", "--force"), W, INPUT),
    bad("compress-output-is-the-adapter-config", adapter(), ("compress", "{in}/ad", "-o", f"{{in}}/ad/{CONFIG}", "--force"), CFG, INPUT),
    bad("expand-merged-output-is-a-file-of-the-base", container(base=True), (*MERGED[:3], "{in}/base/config.json", *MERGED[4:], "--force"), r"{in}/base/config\.json", INPUT),
    bad("compress-output-is-the-adapter-folder", adapter(), ("compress", "{in}/ad", "-o", "{in}/ad", "--force"), AD, INPUT),
    bad("expand-dense-output-is-the-container", container(), ("expand", "{in}/c.safetensors", "-o", "{in}/c.safetensors", "--to", "dense", "--force"), C, INPUT),
    bad("expand-merged-output-is-the-base", container(base=True), (*MERGED[:3], "{in}/base", *MERGED[4:], "--force"), r"{in}/base", INPUT),
    bad("compress-output-is-the-calib-text", _calibration_with(), (*CALIB, "-o", "{in}/calib.txt", "--force"), TEXT, INPUT),
    bad("compress-output-is-the-base-model", _calibration_with(), (*CALIB, "-o", "{in}/tbase", "--force"), r"{in}/tbase", INPUT),
    bad("expand-output-is-the-container", container(), ("expand", "{in}/c.safetensors", "-o", "{in}/c.safetensors", "--force"), C, INPUT),
    bad("report-out-is-the-container", container(), ("report", "{in}/c.safetensors", "--out", "{in}/c.safetensors", "--force"), C, r"(?i)input|not a (folder|directory)"),
    bad("compress-output-inside-a-file", inputs(adapter(), out_file("blocker")), ("compress", "{in}/ad", "-o", "{out}/blocker/c.safetensors"), r"{out}/blocker(/c\.safetensors)?", NOT_A_DIR),
    bad("expand-output-inside-a-file", inputs(container(), out_file("blocker")), ("expand", "{in}/c.safetensors", "-o", "{out}/blocker/peft"), r"{out}/blocker(/peft)?", NOT_A_DIR),
    bad("batch-output-is-a-file", inputs(zoo(), out_file("blocker")), ("batch", "{in}/zoo", "-o", "{out}/blocker"), r"{out}/blocker", NOT_A_DIR),
    bad("compress-read-only-folder", inputs(adapter(), out_dir("ro", 0o555)), ("compress", "{in}/ad", "-o", "{out}/ro/c.safetensors"), r"{out}/ro(/c\.safetensors)?", DENIED, run="permissions"),
    bad("expand-read-only-folder", inputs(container(), out_dir("ro", 0o555)), ("expand", "{in}/c.safetensors", "-o", "{out}/ro/peft"), r"{out}/ro(/peft)?", DENIED, run="permissions"),
    bad("batch-read-only-folder", inputs(zoo(), out_dir("ro", 0o555)), ("batch", "{in}/zoo", "-o", "{out}/ro", "--jobs", "1"), r"{out}/ro(/.*)?", DENIED, run="permissions"),
    # ------------------------------------------------------------------ inputs the user may not read
    bad("inspect-unreadable-adapter-folder", adapter(no_access()), INSPECT, rf"{AD}|{CFG}", DENIED, run="permissions"),
    bad("compress-unreadable-config", adapter(no_access(CONFIG)), COMPRESS, CFG, DENIED, run="permissions"),
    bad("compress-unreadable-weights", adapter(no_access(WEIGHTS)), COMPRESS, W, DENIED, run="permissions"),
    bad("expand-unreadable-container", container(no_access()), EXPAND, C, DENIED, run="permissions"),
    bad("verify-unreadable-container", container(no_access()), VERIFY, C, DENIED, run="permissions"),
    bad("report-unreadable-container", container(no_access()), REPORT, C, DENIED, run="permissions"),
    bad("report-against-unreadable-adapter", inputs(container(), adapter(no_access())), (*REPORT, "--against", "{in}/ad"), rf"{AD}|{CFG}", DENIED, run="permissions"),
    bad("calib-unreadable-base-folder", inputs(adapter(), copy("tbase", "tbase", no_access()), copy("calib.txt")), CALIB, r"{in}/tbase(/config\.json)?", DENIED, run="permissions"),
    bad("calib-unreadable-text", inputs(adapter(), copy("tbase"), copy("calib.txt", None, no_access())), CALIB, TEXT, DENIED, run="permissions"),
    bad("batch-empty-zoo", in_file("zoo/notes.txt", "no adapter here"), BATCH, r"{in}/zoo", r"(?i)no PEFT adapter"),
    bad("batch-unreadable-zoo", inputs(zoo(), lambda x: (x.inp / "zoo").chmod(0)), BATCH, r"{in}/zoo", DENIED, run="permissions"),
    bad("batch-unreadable-adapter-in-zoo", zoo(no_access(CONFIG)), BATCH, r"{in}/zoo/bad/adapter_config\.json", DENIED, code=1, keep=BATCH_PARTIAL, run="permissions"),
    bad("compress-disk-full", inputs(adapter(), out_dir("full")), ("compress", "{in}/ad", "-o", "{out}/full/c.safetensors", "--to", "lora"), r"{out}/full/c\.safetensors", NO_SPACE, run="diskfull"),
    bad("expand-peft-disk-full", inputs(container(src="lora.safetensors"), out_dir("full")), ("expand", "{in}/c.safetensors", "-o", "{out}/full/peft"), r"{out}/full/peft(/.*)?", NO_SPACE, run="diskfull"),
    bad("expand-dense-disk-full", inputs(container(), out_dir("full")), ("expand", "{in}/c.safetensors", "-o", "{out}/full/d.safetensors", "--to", "dense"), r"{out}/full/d\.safetensors", NO_SPACE, run="diskfull"),
    # ------------------------------------------------------------------ the same without --json (human output on)
    bad("compress-truncated-weights-human", adapter(truncate(WEIGHTS, -100)), COMPRESS, W, r"(?i)truncated", json=False),
    bad("inspect-nan-factor-human", adapter(tensors(lambda t: _first_factor(t, "A", float("nan")))), INSPECT, W, NON_FINITE, json=False),
    bad("verify-flipped-payload-byte-human", container(flip_payload), VERIFY, C, SHA, json=False),
    bad("expand-edited-rank-human", container(manifest(_bump_first_rank)), EXPAND, C, SHAPE, json=False),
    bad("compress-disk-full-human", inputs(adapter(), out_dir("full")), ("compress", "{in}/ad", "-o", "{out}/full/c.safetensors", "--to", "svd"), r"{out}/full/c\.safetensors", NO_SPACE, run="diskfull", json=False),
    # ------------------------------------------------------------------ signals mid-write
    *(
        Case(f"{cmd}-{sig}-mid-write", make, argv, code=130, keep=keep, run=sig, after=after)
        for cmd, (make, argv, keep, after) in SIGNAL_INPUTS.items()
        for sig in ("SIGTERM", "SIGINT")
    ),
]
# fmt: on

SUBPROCESS_RUNS = ("permissions", "SIGINT", "SIGTERM")


def test_the_table_is_a_spec():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    assert len(CASES) >= 60
    commands = {c.argv[0] for c in CASES}
    assert {"inspect", "forms", "compress", "expand", "verify", "batch", "report"} <= commands
    tos = {c.argv[c.argv.index("--to") + 1] for c in CASES if c.argv[0] == "expand" and "--to" in c.argv}
    assert {"dense", "merged", "peft-vblora", "peft-native"} <= tos


# ============================================================================ running a case
@dataclass
class Result:
    code: int | None
    out: str
    err: str
    before: dict[str, str]
    after: dict[str, str]
    note: str = ""


class CaseTimeout(BaseException):
    """Not an Exception, so that the CLI's own catch-all cannot turn a hang into an error line."""


def _alarm(signum, frame):
    raise CaseTimeout("the command did not finish within 60 s")


def _argv(case: Case, x: Ctx) -> list[str]:
    return [x.fill(a) for a in case.argv] + (["--json"] if case.json else [])


@contextlib.contextmanager
def _tmpfs(path: Path, size: str = "64k"):
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("disk full needs root to mount a small tmpfs")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def run_in_process(case: Case, x: Ctx) -> Result:
    argv = _argv(case, x)
    with contextlib.ExitStack() as stack:
        if case.run == "diskfull":
            stack.enter_context(_tmpfs(x.out / "full"))
        before = tree_state(x.root)
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(60)
        try:
            code, out, err = run_cli(*argv)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        after = tree_state(x.root)
    return Result(code, out, err, before, after)


# The subprocess cases run in children forked from one server interpreter that has imported the
# CLI once (nine fresh interpreters, each importing torch, would cost far more on two cores). Each
# child is a whole CLI run: stdout and stderr go to files, it calls the real entry point and exits
# with its code, or dies by an unhandled signal like any process. For a signal case the child
# first hooks fsync/fdatasync/replace/rename: the first call made while the output location holds
# a file (other than a batch's lock: the write's temporary file, or a file in its temporary
# folder) writes a marker and blocks, so that the signal the test then sends lands mid-write,
# before the rename. The server reports each child's pid, then each exit code (-N: signal N).
SERVER = r"""
import json, os, sys, time, traceback
from adaptzip.cli import main

def hook(marker, watch, after):
    fired = []
    orig_rename = os.rename
    def busy():
        if after and not os.path.exists(os.path.join(watch, after)):
            return None
        for dp, dn, fn in os.walk(watch):
            for n in fn:
                if n not in (".adaptzip-batch.lock", after):
                    return os.path.join(dp, n)
    def wrap(name):
        orig = getattr(os, name)
        def hooked(*a, **k):
            if not fired:
                hit = busy()
                if hit:
                    fired.append(hit)
                    with open(marker + ".part", "w") as f:
                        f.write(f"{name} {hit} threads={len(os.listdir('/proc/self/task'))}")
                    orig_rename(marker + ".part", marker)
                    # short sleeps: a signal that the kernel hands to another thread than the
                    # main one does not interrupt a sleep, its handler runs at the next bytecode
                    end = time.monotonic() + 120
                    while time.monotonic() < end:
                        time.sleep(0.05)
            return orig(*a, **k)
        setattr(os, name, hooked)
    for n in ("fsync", "fdatasync", "replace", "rename"):
        wrap(n)

def child(req):
    code = 1
    try:
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        if req["marker"]:
            hook(req["marker"], req["watch"], req["after"])
        sys.argv = ["adaptzip", *req["argv"]]
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

pids = {}
for line in sys.stdin:
    req = json.loads(line)
    if req is None:
        break
    pid = os.fork()
    if pid == 0:
        child(req)
    pids[pid] = req["id"]
    print(json.dumps({"id": req["id"], "pid": pid}), flush=True)
while pids:
    pid, status = os.wait()
    print(json.dumps({"id": pids.pop(pid), "code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


def _drop_dac() -> list[str] | None:
    """A command prefix that runs a program without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH (root
    then honours permission bits); [] when not root; None when root and no tool can drop them."""
    if os.geteuid() != 0:
        return []
    caps = "dac_override,dac_read_search"
    if shutil.which("setpriv"):
        drop = ",".join("-" + c for c in caps.split(","))
        return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--"]
    if shutil.which("capsh"):
        return ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", 'exec "$0" "$@"']
    return None


@dataclass
class _Child:
    case: Case
    x: Ctx
    marker: str
    logs: Path
    before: dict[str, str]
    pid: int | None = None
    code: int | None = None
    signalled: float | None = None


@pytest.fixture(scope="module")
def subprocess_results(src, tmp_path_factory) -> dict[str, tuple[Ctx, Result] | str]:
    """Every permission and signal case, run at once as children of one server (see
    :data:`SERVER`; as root the server runs without CAP_DAC_OVERRIDE, so that permission bits
    hold); per id its folder and Result, or a skip reason. A child gets 30 s to exit after its
    signal, and everything 180 s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    marks = tmp_path_factory.mktemp("markers")
    results: dict[str, tuple[Ctx, Result] | str] = {}
    drop = _drop_dac()
    children: dict[str, _Child] = {}
    for case in (c for c in CASES if c.run in SUBPROCESS_RUNS):
        if case.run == "permissions" and drop is None:
            results[case.id] = "running as root, and neither setpriv nor capsh can drop CAP_DAC_OVERRIDE"
            continue
        x = Ctx(tmp_path_factory.mktemp(case.id), src)
        case.make(x)
        marker = "" if case.run == "permissions" else str(marks / case.id)
        children[case.id] = _Child(case, x, marker, marks / case.id, tree_state(x.root))
    if not children:
        return results
    server = subprocess.Popen(
        [*(drop or []), sys.executable, "-c", SERVER],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=open(marks / "server.err", "w"),  # noqa: SIM115 (the server owns it until it exits)
        text=True,
    )
    replies: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [replies.put(json.loads(ln)) for ln in server.stdout], daemon=True).start()
    for c in children.values():
        req = {
            "id": c.case.id,
            "argv": _argv(c.case, c.x),
            "marker": c.marker,
            "watch": str(c.x.out),
            "after": c.case.after,
            "stdout": f"{c.logs}.out",
            "stderr": f"{c.logs}.err",
        }
        server.stdin.write(json.dumps(req) + "\n")
    server.stdin.write("null\n")
    server.stdin.flush()
    notes: dict[str, str] = {}
    deadline = time.monotonic() + 180
    while any(c.code is None for c in children.values()) and time.monotonic() < deadline:
        with contextlib.suppress(queue.Empty):
            while True:
                msg = replies.get_nowait()
                setattr(children[msg["id"]], "pid" if "pid" in msg else "code", msg.get("pid", msg.get("code")))
        now = time.monotonic()
        for c in children.values():
            if c.code is not None or c.pid is None or not c.marker:
                continue
            if c.signalled is None and os.path.exists(c.marker):
                os.kill(c.pid, getattr(signal, c.case.run))
                c.signalled = now
            elif c.signalled is not None and now - c.signalled > 30 and c.case.id not in notes:
                os.kill(c.pid, signal.SIGKILL)
                notes[c.case.id] = (
                    f"still running 30 s after {c.case.run} (killed; blocked in {Path(c.marker).read_text()})"
                )
        time.sleep(0.02)
    for c in children.values():
        if c.code is None and c.pid is not None:
            with contextlib.suppress(OSError):
                os.kill(c.pid, signal.SIGKILL)
            notes.setdefault(c.case.id, "no exit within 180 s (killed)")
    with contextlib.suppress(subprocess.TimeoutExpired):
        server.wait(timeout=30)
    server.kill()
    for c in children.values():
        note = notes.get(c.case.id, "")
        if c.marker and c.signalled is None:
            note += " the write never blocked, so no signal was sent"
        out = Path(f"{c.logs}.out").read_text() if Path(f"{c.logs}.out").exists() else ""
        err = Path(f"{c.logs}.err").read_text() if Path(f"{c.logs}.err").exists() else ""
        if c.pid is None:
            err += (marks / "server.err").read_text()
        after = tree_state(c.x.root)
        if c.case.run == "permissions":
            _grant(c.x.root)  # what the case made unreadable or read-only, so that it can be removed
        results[c.case.id] = (c.x, Result(c.code, out, err, c.before, after, note.strip()))
    return results


def _grant(root: Path) -> None:
    """Give the owner read/write/search on every entry below ``root`` (top-down: a folder is made
    searchable before it is listed)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=True):
        for n in dirnames:
            os.chmod(os.path.join(dirpath, n), 0o755)
        for n in filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o644)


# ============================================================================ checking a case
def problems(case: Case, x: Ctx, r: Result) -> list[str]:
    """Everything this result breaks of the promise, as short phrases (empty: kept)."""
    bad: list[str] = []
    if r.note:
        bad.append(r.note)
    if r.code != case.code:
        bad.append(f"exit {r.code}, want {case.code}")
    if "Traceback" in r.err:
        bad.append("traceback on stderr")
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    if case.run in ("SIGINT", "SIGTERM"):
        want = r"adaptzip: interrupted\b.*"
        if len(lines) != 1 or not re.fullmatch(want, lines[0]):
            bad.append(f"stderr must be one line 'adaptzip: interrupted', got {len(lines)}")
    elif len(lines) != 1:
        bad.append(f"{len(lines)} stderr lines, want 1")
    else:
        m = re.fullmatch(r"adaptzip: error: (.*)", lines[0])
        if m is None:
            bad.append("stderr line is not 'adaptzip: error: ...'")
        else:
            rest = m[1]
            if case.path is not None:
                pm = re.match(rf"(?:{x.fill(case.path, escape=True)}): ", rest)
                if pm is None:
                    bad.append(f"line does not name {x.fill(case.path)!s}")
                rest = rest[pm.end() :] if pm else rest
            if not re.search(case.cause, rest):
                bad.append(f"cause does not match /{case.cause}/")
    if case.code == 2 and r.out:
        bad.append("stdout not empty")
    keep = set(case.keep)
    new = sorted(k for k in r.after.keys() - r.before.keys() if k not in keep)
    gone = sorted(r.before.keys() - r.after.keys())
    changed = sorted(k for k in r.before.keys() & r.after.keys() if r.before[k] != r.after[k])
    if new:
        bad.append(f"left behind {new[:4]}")
    if gone or changed:
        bad.append(f"inputs changed: removed {gone[:4]}, modified {changed[:4]}")
    return bad


def _summary(r: Result) -> str:
    err = [ln.strip() for ln in r.err.splitlines() if ln.strip()]
    return f"stderr ({len(err)} lines): {' ⏎ '.join(err)[:300]!r}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, src, tmp_path, request):
    if case.run in SUBPROCESS_RUNS:
        got = request.getfixturevalue("subprocess_results")[case.id]
        if isinstance(got, str):
            pytest.skip(got)
        x, r = got
    else:
        x = Ctx(tmp_path, src)
        case.make(x)
        r = run_in_process(case, x)
    bad = problems(case, x, r)
    assert not bad, f"{case.id}: {'; '.join(bad)} | {_summary(r)}"


def test_the_checker_is_not_vacuous(tmp_path, src):
    """What each check must catch, on made-up results of a plain bad-input case."""
    case = next(c for c in CASES if c.id == "compress-truncated-weights")
    x = Ctx(tmp_path, src)
    case.make(x)
    state = tree_state(x.root)
    line = f"adaptzip: error: {x.inp}/ad/{WEIGHTS}: truncated safetensors file: payload needs 9 bytes, file has 8\n"
    assert problems(case, x, Result(2, "", line, state, state)) == []
    tmp = {**state, "out/.c.safetensors.1234.tmp": "file 0"}
    touched = {**state, f"in/ad/{WEIGHTS}": "file 0"}
    for r in (
        Result(1, "", line, state, state),  # exit code
        Result(2, "", line + line, state, state),  # two lines
        Result(2, "", "Traceback (most recent call last):\n" + line, state, state),
        Result(2, "", line.replace(f"{x.inp}/ad/{WEIGHTS}", f"{x.inp}/ad"), state, state),  # names the folder
        Result(2, "", line.replace("truncated", "bad"), state, state),  # cause
        Result(2, "{}", line, state, state),  # stdout
        Result(2, "", line, state, tmp),  # a temporary file left
        Result(2, "", line, state, touched),  # an input modified
    ):
        assert problems(case, x, r), r


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], r".*\.gate_proj"], ids=["list", "regex"])
def test_config_that_misdescribes_the_tensors_is_said_and_every_update_kept(targets, src, tmp_path):
    """Not an error: the tensors are the update. compress converts every module and says, in one
    warning line naming the config, that the source config disagrees (the expanded config then
    names exactly the modules it carries: tests/test_export.py loads it in PEFT)."""
    x = Ctx(tmp_path, src)
    adapter(config(target_modules=targets))(x)
    before = tree_state(x.inp)
    code, out, err = run_cli(*_argv(bad("mismatch", nothing, COMPRESS, None, ""), x))
    assert code == 0, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"adaptzip: warning: {x.inp}/ad/{CONFIG}: ")
    assert "target_modules" in lines[0]
    res = json.loads(out)
    assert res["warnings"][0] == lines[0].removeprefix("adaptzip: warning: ")
    assert len(ct.open_container(x.out / "c.safetensors").modules) == 21  # every module converted
    assert tree_state(x.inp) == before
