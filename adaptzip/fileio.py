"""Atomic outputs and a streaming safetensors writer.

Every output is written to a temporary name in the target's own directory, fsynced, then
renamed into place: a crash or a kill leaves either the old state or the new one, never a
partial file. Source files are never opened for writing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator

import torch

from .errors import OutputExists

ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
            torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
            torch.bool: "BOOL"}


def check_output(path: Path, force: bool, sources: tuple[Path, ...] = ()) -> None:
    """Refuse an existing output without --force, and an output that is one of the inputs."""
    rp = path.resolve()
    for s in sources:
        sr = Path(s).resolve()
        if rp == sr or sr.is_relative_to(rp):  # replacing the output would destroy an input
            raise OutputExists(path, "is an input of this command; choose another output")
    if path.exists() and not force:
        raise OutputExists(path, "exists (use --force to replace it)")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_p = Path(tmp)
    os.chmod(tmp_p, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp_p
        with open(tmp_p, "rb+") as f:
            os.fsync(f.fileno())
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp_p, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_p.exists():
            tmp_p.unlink()


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yields a temporary directory beside ``path``; on success it replaces ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


class StreamingWriter:
    """Writes a safetensors file tensor by tensor: the header is planned from (name, dtype,
    shape) first, then each tensor is written at its offset, so only one tensor is in memory.
    Tensors must be written in the order they were planned."""

    def __init__(self, path: Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None):
        header: dict = {}
        if metadata:
            header["__metadata__"] = metadata
        off = 0
        self._order = []
        for name, dtype, shape in plan:
            n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            self._order.append((name, dtype, tuple(shape), n))
            off += n
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        exp_name, dtype, shape, n = self._order[self._next]
        if name != exp_name or t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(f"streaming writer: expected {exp_name} {dtype} {shape}, got {name} {t.dtype} {tuple(t.shape)}")
        if n:  # the tensor's own buffer, no bytes copy (peak memory: one tensor)
            self._f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"streaming writer: {len(self._order) - self._next} tensors not written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self._f.close()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` without its intermediate copy: the header is planned and
    each tensor's buffer written in place (widest dtypes first, then by name, so every offset
    stays aligned to its element size), then fsynced."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    plan = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order]
    with StreamingWriter(path, plan, metadata) as w:
        for k in order:
            w.write(k, tensors[k])
