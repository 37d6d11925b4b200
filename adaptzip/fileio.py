"""Files: atomic outputs, the safetensors layout, hashes, JSON-safe values.

Every output is written to a temporary name in the target's own directory, fsynced, then
renamed into place: a crash or a kill leaves either the old state or the new one, never a
partial file. Source files are never opened for writing.

The safetensors layout rule lives here once (:func:`safetensors_plan`, :func:`safetensors_header`):
the streaming writer uses it to write, the container uses it to predict a file's size exactly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import AdaptzipError, OutputExists

ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TORCH = {v: k for k, v in ST_DTYPE.items()}  # safetensors dtype name -> torch dtype
# The order of safetensors' own (Rust) ``Dtype`` enum for the dtypes above: ``save_file`` lays
# tensors out by it, highest first, then by name (measured: tests/test_fileio.py). That keeps every
# offset aligned to its element size; note BF16 comes before F16, I8 before U8, F32 before I32.
_ST_RANK = {name: i for i, name in enumerate(("BOOL", "U8", "I8", "I16", "F16", "BF16", "I32", "F32", "F64", "I64"))}

Plan = Sequence[tuple[str, torch.dtype, tuple[int, ...]]]  # (name, dtype, shape) per tensor, in file order


def json_clean(v: Any) -> Any:
    """``v`` made JSON-safe: a non-finite float (NaN, ±inf) becomes None (JSON has neither),
    recursively through dicts, lists and tuples (tuples become lists); other values unchanged."""
    if isinstance(v, float):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_clean(x) for x in v]
    return v


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks (memoised per path, size, mtime and inode
    within a process: a changed file is hashed again)."""
    st = Path(path).stat()
    return _sha256_of(str(Path(path).absolute()), st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=1024)
def _sha256_of(path: str, size: int, mtime_ns: int, ino: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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


def safetensors_plan(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """(name, dtype, shape) of ``tensors`` in the order ``safetensors.torch.save_file`` lays them
    out: by safetensors dtype rank (I64, F64, F32, I32, BF16, F16, I16, I8, U8, BOOL), then name."""
    order = sorted(tensors, key=lambda k: (-_ST_RANK[ST_DTYPE[tensors[k].dtype]], k))
    return [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order]


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()


def safetensors_header(plan: Plan, metadata: Mapping[str, str] | None = None) -> bytes:
    """The JSON header of a safetensors file holding ``plan``'s tensors back to back in plan order,
    as safetensors writes it: compact JSON (non-ASCII kept as UTF-8), ``__metadata__`` first unless
    ``metadata`` is None (an empty dict is written too), then per tensor ``dtype``, ``shape``,
    ``data_offsets``; padded with spaces to a multiple of 8 bytes. The file is the header's length
    (8 bytes, little-endian), the header, then the payload.

    ``safetensors_header(safetensors_plan(t), m)`` is ``save_file(t, m)``'s header byte for byte,
    except that safetensors orders several metadata keys at random (a Rust HashMap; the length is
    the same) and writes ``{},"__metadata__":{}}`` for no tensors with ``{}`` (same length)."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    off = 0
    for name, dtype, shape in plan:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    hb = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return hb + b" " * (-len(hb) % 8)


def safetensors_size(plan: Plan, metadata: Mapping[str, str] | None = None) -> int:
    """Bytes of the safetensors file of ``plan`` (see :func:`safetensors_header`), nothing written."""
    return 8 + len(safetensors_header(plan, metadata)) + sum(_nbytes(dt, shape) for _, dt, shape in plan)


def tensor_index(f) -> dict[str, tuple[tuple[int, ...], str]]:
    """(shape, safetensors dtype name) of every tensor of an open ``safe_open`` handle, in its key
    order; read from the header, no tensor is loaded."""
    out = {}
    for k in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
        sl = f.get_slice(k)
        out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def check_not_truncated(path: Path, error: type[AdaptzipError]) -> None:
    """Raise ``error(path, "truncated safetensors file: ...")`` when the header promises more bytes
    than the file has (a file cut short by a failed download or copy). A header that does not
    parse is left to safetensors itself to report."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size:
                return
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return
    if not isinstance(header, dict):
        return
    end = max(
        (
            v["data_offsets"][1]
            for k, v in header.items()
            if k != "__metadata__"
            and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list)
            and len(v["data_offsets"]) == 2
            and isinstance(v["data_offsets"][1], int)
        ),
        default=0,
    )
    if 8 + n + end > size:
        raise error(path, f"truncated safetensors file: payload needs {8 + n + end} bytes, file has {size}")


class StreamingWriter:
    """Writes a safetensors file tensor by tensor: the header is planned from (name, dtype,
    shape) first (:func:`safetensors_header`), then each tensor is written at its offset, so only
    one tensor is in memory. Tensors must be written in the order they were planned."""

    def __init__(self, path: Path, plan: Plan, metadata: dict[str, str] | None = None):
        self._order = [(name, dtype, tuple(shape), _nbytes(dtype, shape)) for name, dtype, shape in plan]
        hb = safetensors_header(plan, metadata)
        self._f = open(path, "wb")  # noqa: SIM115 (the writer owns the file: close() or __exit__)
        self._f.write(struct.pack("<Q", len(hb)))
        self._f.write(hb)
        self._next = 0

    def write(self, name: str, t: torch.Tensor) -> None:
        exp_name, dtype, shape, n = self._order[self._next]
        if name != exp_name or t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"streaming writer: expected {exp_name} {dtype} {shape}, got {name} {t.dtype} {tuple(t.shape)}"
            )
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
    """``safetensors.torch.save_file`` without its intermediate copy: the same layout
    (:func:`safetensors_plan`), each tensor's buffer written in place, then fsynced."""
    plan = safetensors_plan(tensors)
    with StreamingWriter(path, plan, metadata) as w:
        for k, _, _ in plan:
            w.write(k, tensors[k])
