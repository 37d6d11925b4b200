"""Files: atomic outputs, the safetensors layout, hashes, JSON-safe values.

Every output is written to a temporary name in the target's own directory, fsynced, then
renamed into place: a crash or a kill leaves either the old state or the new one, never a
partial file. A failed or interrupted write removes its temporary file and the folders it made,
and turns a write error (disk full, permission denied) into :class:`~adaptzip.errors.OutputError`
naming the output. Outputs get the usual mode (0666/0777 less the umask). Source files are never
opened for writing.

The safetensors layout rule lives here once (:func:`safetensors_plan`, :func:`safetensors_header`):
the streaming writer uses it to write, the container uses it to predict a file's size exactly.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import struct
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import AdaptzipError, OutputError, OutputExists
from .runtime import shielded

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


# ------------------------------------------------------------------ writing outputs
# Errors that only writing produces: an OSError without a file name (a write to an open file)
# with one of these is the output's; any other is left as it is (an input read inside a write).
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_MADE: list[Path] = []  # folders this process's writers created, oldest first (see undo_folders_on_failure)


def _reason(code: int | None, e: BaseException) -> str:
    """``No space left on device`` -> ``no space left on device``; the message when no errno."""
    if code:
        s = os.strerror(code)
        return s[:1].lower() + s[1:]
    return " ".join(str(e).split())


def _errno(e: BaseException) -> int | None:
    if isinstance(e, OSError):
        return e.errno
    m = re.search(r"os error (\d+)", str(e))  # safetensors (Rust): "... No space left on device (os error 28)"
    return int(m.group(1)) if m else None


def _within(p: Path, root: Path) -> bool:
    return p == root or root in p.parents


def output_error(dest: Path, e: BaseException, tmp: Path | None = None) -> OutputError | None:
    """The :class:`OutputError` for ``e``, raised while writing ``dest`` through the temporary file
    or folder ``tmp``, naming ``dest`` (or the file inside a folder output) and the cause
    (``no space left on device``, ``permission denied``); None when ``e`` is not about the output
    (e.g. an input that is read inside the write block fails as itself)."""
    dest = Path(dest)
    if isinstance(e, OSError):
        where = None
        d = Path(os.path.abspath(dest))
        for name in (e.filename2, e.filename):  # a copy names its source first, its destination second
            if name is None or where is not None:
                continue
            p = Path(os.path.abspath(os.fsdecode(name)))
            if tmp is not None and _within(p, Path(os.path.abspath(tmp))):
                rel = p.relative_to(os.path.abspath(tmp))
                where = dest / rel if rel.parts else dest
            elif _within(p, d) or _within(d, p) or (p.parent == d.parent and p.name.startswith(f".{d.name}.")):
                where = dest  # the output, a folder on its way, or its temporary name
        if where is None:
            if e.errno not in _WRITE_ERRNOS:
                return None  # e.g. an input read inside the write block
            where = dest
        return OutputError(where, _reason(e.errno, e))
    if type(e).__name__ == "SafetensorError" and "while serializing" in str(e):
        return OutputError(dest, _reason(_errno(e), e))
    return None


def _not_a_folder(p: Path, dest: Path) -> OutputError:
    """A file stands where the output needs a folder: the error names that file."""
    return OutputError(
        p, "is not a folder" + ("" if Path(p) == Path(dest) else f" (the output {dest} needs one there)")
    )


def make_dirs(d: Path, dest: Path | None = None) -> list[Path]:
    """``mkdir -p d``: creates the missing folders, outermost first, and records each (see
    :func:`undo_folders_on_failure`); returns the ones it created. An error becomes
    :class:`OutputError` naming ``dest`` (default ``d``)."""
    d, dest = Path(d), Path(dest if dest is not None else d)
    missing: list[Path] = []
    p = d
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    if not os.path.isdir(p):
        raise _not_a_folder(p, dest)
    made = []
    for q in reversed(missing):
        try:
            os.mkdir(q)
        except FileExistsError:
            if not q.is_dir():
                raise _not_a_folder(q, dest) from None
            continue
        except OSError as e:
            raise OutputError(dest, f"{_reason(e.errno, e)} (cannot create folder {q})") from e
        _MADE.append(Path(os.path.abspath(q)))
        made.append(q)
    return made


def _remove_made(since: int) -> None:
    """Remove the folders recorded from index ``since`` on, newest first, where they are empty."""
    for q in reversed(_MADE[since:]):
        with contextlib.suppress(OSError):
            os.rmdir(q)
    del _MADE[since:]


@contextlib.contextmanager
def undo_folders_on_failure() -> Iterator[None]:
    """Around a whole command: when it fails or is interrupted, the folders that its writers
    created (and that are still empty) are removed again, so a failed ``-o new/sub/out`` leaves
    no ``new/``."""
    since = len(_MADE)
    try:
        yield
    except BaseException:
        with shielded():
            _remove_made(since)
        raise
    del _MADE[since:]


@contextlib.contextmanager
def removed_on_failure(path: Path | None) -> Iterator[None]:
    """Around work that may write ``path`` beside its output (a file that does not exist yet,
    such as the default Σ statistics file): when the work fails or is interrupted, ``path`` is
    removed again, so a failed command leaves no output. A file that existed before is kept."""
    existed = path is None or os.path.lexists(path)
    try:
        yield
    except BaseException:
        if not existed:
            with shielded(), contextlib.suppress(OSError):
                os.unlink(path)
        raise


def check_writable(path: Path, folder: bool = False) -> None:
    """Refuse (before any work) an output that cannot be created: the nearest existing folder
    above ``path`` (or ``path`` itself when ``folder`` and it exists) must be a folder that this
    process may write into, on a file system that is not read-only."""
    path = Path(path)
    try:
        p = path if folder else path.parent
        while not os.path.lexists(p) and p != p.parent:
            p = p.parent
        if not p.is_dir():
            raise _not_a_folder(p, path)
        ok = (
            os.access(p, os.W_OK | os.X_OK, effective_ids=True)
            if os.access in os.supports_effective_ids
            else os.access(p, os.W_OK | os.X_OK)
        )
        ro = bool(os.statvfs(p).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    except OSError as e:
        raise OutputError(path, _reason(e.errno, e)) from e
    if ro:
        raise OutputError(path, f"read-only file system (folder {p})")
    if not ok:
        raise OutputError(path, f"permission denied (cannot write into folder {p})")


def check_output(path: Path, force: bool, sources: tuple[Path, ...] = (), folder: bool = False) -> None:
    """Refuse an existing output without --force, an output that is one of the inputs, an output
    that cannot be written (:func:`check_writable`), and a file output (``folder`` False) where a
    folder is: --force replaces a file, never a whole folder named by mistake."""
    path = Path(path)
    try:
        rp = path.resolve()
        exists = os.path.lexists(path)
        resolved = [(s, Path(s).resolve()) for s in sources]
        for _, sr in resolved:
            if rp == sr or sr.is_relative_to(rp):  # replacing the output would destroy an input
                raise OutputExists(path, "is an input of this command; choose another output")
        for s, sr in resolved:
            if exists and rp.is_relative_to(sr) and sr.is_dir():  # e.g. the adapter's own config file
                raise OutputExists(path, f"is a file of the input folder {s}; choose another output")
    except OSError as e:
        raise OutputError(path, _reason(e.errno, e)) from e
    except RuntimeError as e:  # Python < 3.13: a symlink loop on the way
        raise OutputError(path, "symbolic link loop") from e
    if exists and not force:
        raise OutputExists(path, "exists (use --force to replace it)")
    if exists and not folder and path.is_dir() and not path.is_symlink():
        raise OutputExists(path, "exists and is a folder, but the output is a file (--force replaces only a file)")
    check_writable(path)


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it races other threads)."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _new_temp(path: Path, folder: bool) -> Path:
    """Create ``.<name>.<random>.tmp`` beside ``path`` (a file, or a folder), with the umask's mode."""
    for _ in range(100):
        t = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            if folder:
                os.mkdir(t, 0o777)
            else:
                os.close(os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666))
        except FileExistsError:
            continue
        return t
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def _finish_modes(tmp: Path) -> None:
    """The usual modes (0666/0777 less the umask, as any tool's new files) on ``tmp`` and, for a
    folder, everything in it (some writers, safetensors' among them, create files 0600), and every
    file fsynced."""
    mask = _umask()
    if tmp.is_dir():
        os.chmod(tmp, 0o777 & ~mask)
        for root, dirs, files in os.walk(tmp):
            for d in dirs:
                if not os.path.islink(os.path.join(root, d)):
                    os.chmod(os.path.join(root, d), 0o777 & ~mask)
            for f in files:
                if not os.path.islink(os.path.join(root, f)):
                    _finish_file(Path(root) / f, mask)
    else:
        _finish_file(tmp, mask)


def _finish_file(f: Path, mask: int) -> None:
    os.chmod(f, 0o666 & ~mask)
    with open(f, "rb+") as fh:
        os.fsync(fh.fileno())


def _commit(tmp: Path, path: Path) -> None:
    """Put ``tmp`` in ``path``'s place (a replaced output is moved aside first and removed after;
    it comes back if the rename fails). Called shielded: a signal cannot split it."""
    old = None
    if os.path.lexists(path) and (path.is_dir() or tmp.is_dir()):
        old = path.parent / f".{path.name}.old-{os.getpid()}.tmp"
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()


def _remove(p: Path) -> None:
    with contextlib.suppress(OSError):  # cleanup never hides the error that caused it
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


@contextlib.contextmanager
def _atomic(path: Path, folder: bool) -> Iterator[Path]:
    path = Path(path)
    since = len(_MADE)
    tmp: Path | None = None
    try:
        with shielded():  # a signal cannot land between creating a temporary and guarding it
            make_dirs(path.parent, path)
            tmp = _new_temp(path, folder)
        yield tmp
        _finish_modes(tmp)
        with shielded():
            _commit(tmp, path)
            tmp = None
    except BaseException as e:
        with shielded():
            if tmp is not None:
                _remove(tmp)
            _remove_made(since)
        oe = None if isinstance(e, AdaptzipError) else output_error(path, e, tmp)
        if oe is not None:
            raise oe from e
        raise
    del _MADE[since:]


def atomic_file(path: Path) -> contextlib.AbstractContextManager[Path]:
    """Yields a temporary path beside ``path`` (an empty file, mode from the umask). When the block
    ends, the file gets the umask's mode, is fsynced and renamed to ``path``. When it fails or is
    interrupted, the temporary file and the folders made for it are removed, and an OSError or
    safetensors write error about the output becomes :class:`OutputError` (``no space left on
    device``, ``permission denied``) naming ``path``."""
    return _atomic(path, folder=False)


def atomic_dir(path: Path) -> contextlib.AbstractContextManager[Path]:
    """:func:`atomic_file` for a folder output: yields a temporary folder beside ``path``, which
    replaces ``path`` when the block ends (every file in it fsynced, modes from the umask)."""
    return _atomic(path, folder=True)


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
    parse is left to safetensors itself to report. A file that cannot be opened raises
    ``error(path, "cannot read: <reason>")`` (safetensors would report any such file as missing)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > size:
                return
            header = json.loads(f.read(n))
    except OSError as e:
        raise error(path, f"cannot read: {_reason(e.errno, e)}") from e
    except (json.JSONDecodeError, UnicodeDecodeError):
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
    one tensor is in memory. Tensors must be written in the order they were planned.

    An OSError (disk full) carries the file's path as ``filename``, so that :func:`atomic_file`
    and :func:`atomic_dir` name the output file in their :class:`OutputError`."""

    def __init__(self, path: Path, plan: Plan, metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._order = [(name, dtype, tuple(shape), _nbytes(dtype, shape)) for name, dtype, shape in plan]
        hb = safetensors_header(plan, metadata)
        self._f = open(path, "wb")  # noqa: SIM115 (the writer owns the file: close() or __exit__)
        self._next = 0
        try:
            with self._naming():
                self._f.write(struct.pack("<Q", len(hb)))
                self._f.write(hb)
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise

    @contextlib.contextmanager
    def _naming(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            if e.filename is None:
                e.filename = str(self.path)
            raise

    def write(self, name: str, t: torch.Tensor) -> None:
        exp_name, dtype, shape, n = self._order[self._next]
        if name != exp_name or t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"streaming writer: expected {exp_name} {dtype} {shape}, got {name} {t.dtype} {tuple(t.shape)}"
            )
        if n:  # the tensor's own buffer, no bytes copy (peak memory: one tensor)
            with self._naming():
                self._f.write(memoryview(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self._order):
            raise ValueError(f"streaming writer: {len(self._order) - self._next} tensors not written")
        with self._naming():
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
            finally:
                self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            with contextlib.suppress(OSError):  # the error in flight says what went wrong
                self._f.close()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` without its intermediate copy: the same layout
    (:func:`safetensors_plan`), each tensor's buffer written in place, then fsynced."""
    plan = safetensors_plan(tensors)
    with StreamingWriter(path, plan, metadata) as w:
        for k, _, _ in plan:
            w.write(k, tensors[k])
