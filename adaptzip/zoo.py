"""Zoo conversion: every PEFT LoRA adapter below a folder, converted in parallel, resumable, and
optionally compressed together with a zoo-level shared basis.

Layout (see README "Adapter zoos" and formats/shared.md)::

    ZOO_DIR/<rel>/adapter_config.json   →   OUT_DIR/<rel>.safetensors      one container per adapter
                                            OUT_DIR/_shared/<sha256>.safetensors   shared parts (--shared-basis)
                                            OUT_DIR/batch.json, OUT_DIR/batch.md   the summary

Pipeline: :func:`discover` walks the zoo lazily (``os.scandir``, never following symlinked
folders); each adapter becomes a :class:`Job`; :func:`convert` (a plain picklable function, so
any executor can run it: a local process pool, Ray, Dask) skips an up-to-date container or calls
:func:`adaptzip.api.compress`, and returns one summary row. Only the rows are kept.

Resumability: every container written by a batch carries the sha256 of the batch's conversion
options at the end of its manifest ``command`` (``[adaptzip-batch options_sha256=<hex>]``). A
container is up to date when it verifies (payload hash, and the shared file's hash when it uses
one), its manifest's ``source.sha256`` is the source weights file's, and its options hash matches.

Zoo sharing (``shared_basis=True``): adapters with the same base model, dtype and module table
form a group; for each module the group's updates are stacked and the top-k right singular
subspace V (k×in) of the stack is ONE shared ``A`` for all of them, each adapter keeping only
``B = argmin ‖ΔW − B V‖`` (out×k): an ``svd`` container whose ``A.{i}`` tensors live in the
shared file. The ranks k are chosen greedily (energy per stored byte) as the smallest that match
the group error of the separate containers; the group is shared only when that is fewer total
bytes (shared file included) at equal or lower error — never when sharing loses.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import math
import multiprocessing as mp
import os
import re
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from . import api, fit
from . import container as ct
from .adapter import DTYPE_NAMES, Adapter, load_adapter
from .errors import AdaptzipError, OptionError
from .fileio import atomic_file
from .forms import FitContext, get_form, make_config
from .forms.base import config_to_json

SHARED_DIR = "_shared"
SUMMARY_JSON = "batch.json"
SUMMARY_MD = "batch.md"
LOCK_FILE = ".adaptzip-batch.lock"
RESERVED = {SHARED_DIR, SUMMARY_JSON, SUMMARY_MD, LOCK_FILE}
SHARED_META_KEY = "adaptzip_shared"
_STAMP_RE = re.compile(r"\[adaptzip-batch options_sha256=([0-9a-f]{64})\]\s*$")
_ODD = re.compile(r"[\x00-\x1f\x7f]")
OK_STATUSES = ("converted", "skipped", "shared")


# ============================================================== discovery
@dataclass(frozen=True)
class Found:
    """One discovery result: an adapter folder (``problem`` None) or a refused entry."""

    rel: str  # posix path relative to the zoo ('' for the zoo folder itself)
    path: Path
    problem: str | None = None
    status: str = "adapter"  # adapter, or for refused entries: failed | ignored


def _inside(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


def _adapter_file_problem(d: str, zoo_real: str) -> str | None:
    """An adapter whose config or weights file is a symlink leaving the zoo is refused."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = os.path.join(d, name)
        if os.path.islink(p):
            target = os.path.realpath(p)
            if not _inside(target, zoo_real):
                return f"{name} is a symlink to {target}, outside the zoo (not followed)"
    return None


def discover(zoo: str | Path, exclude: str | Path | None = None) -> Iterator[Found]:
    """Yield every PEFT LoRA adapter folder (one with ``adapter_config.json``) below ``zoo``, at any
    depth, lazily and in sorted order. Symlinked folders are never followed: one that points
    outside the zoo at an adapter is yielded as failed, one inside the zoo as ignored (its real
    path is converted). Hidden folders (``.*``) and ``exclude`` (the output folder) are skipped."""
    zoo = Path(zoo)
    zoo_real = os.path.realpath(zoo)
    excl = os.path.realpath(exclude) if exclude is not None else None
    stack: list[tuple[str, str]] = [(str(zoo), "")]
    while stack:
        d, rel = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Found(rel, Path(d), f"cannot list folder: {e.strerror or e}", "failed")
            continue
        names = {e.name for e in entries}
        if "adapter_config.json" in names:
            problem = _adapter_file_problem(d, zoo_real)
            yield Found(rel, Path(d), problem, "adapter" if problem is None else "failed")
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            sub_rel = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not os.path.isdir(target) or not os.path.isfile(os.path.join(target, "adapter_config.json")):
                        continue  # a link to something that is not an adapter: nothing to convert
                    if _inside(target, zoo_real):
                        yield Found(sub_rel, Path(e.path), f"symlink to {os.path.relpath(target, zoo_real)} inside the zoo (converted at its real path)", "ignored")
                    else:
                        yield Found(sub_rel, Path(e.path), f"symlink to {target}, outside the zoo (not followed)", "failed")
                    continue
                if not e.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            if excl is not None and os.path.realpath(e.path) == excl:
                continue
            subdirs.append((e.path, sub_rel))
        stack.extend(reversed(subdirs))  # depth first, in name order


def output_for(out_dir: Path, rel: str, zoo_name: str) -> tuple[Path | None, str | None]:
    """``OUT_DIR/<rel>.safetensors`` for an adapter at ``rel`` (the zoo itself: ``<zoo name>``),
    or (None, why) when the path could leave OUT_DIR or clash with another output."""
    parts = rel.split("/") if rel else [zoo_name or "adapter"]
    for p in parts:
        if p in ("", ".", "..") or "/" in p or "\\" in p:
            return None, f"path component {p!r} is not allowed"
        if _ODD.search(p):
            return None, f"path component {p!r} has control characters"
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            return None, f"path component {p!r} is not valid UTF-8"
    if parts[0] in RESERVED:
        return None, f"{parts[0]!r} is reserved in the output folder"
    for p in parts[:-1]:
        if p.lower().endswith(".safetensors"):  # a folder named like a container would clash with one
            return None, f"folder name {p!r} ends with .safetensors and would clash with a container"
    out = out_dir.joinpath(*parts[:-1], parts[-1] + ".safetensors")
    cur = out_dir
    for p in parts[:-1]:
        cur = cur / p
        if cur.is_symlink():
            return None, f"output folder {cur} is a symlink (refusing to write through it)"
    if out.is_symlink() or out.is_dir():
        return None, f"output {out} exists and is not a regular file"
    if not os.path.realpath(out).startswith(os.path.realpath(out_dir) + os.sep):
        return None, f"output {out} would leave the output folder"
    return out, None


# ============================================================== options and stamps
def _canon(v: Any) -> Any:
    """A JSON-able canonical form of an option value (tensors by content hash)."""
    if isinstance(v, torch.Tensor):
        t = v.detach().contiguous().cpu()
        return {"tensor_sha256": hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest() if t.numel() else "", "shape": list(t.shape)}
    if isinstance(v, dict):
        return {str(k): _canon(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0])) if x is not None}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def options_sha256(opts: dict) -> str:
    return hashlib.sha256(json.dumps(_canon(opts), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stamp(command: str | None, digest: str) -> str:
    """The manifest ``command`` of a batch container: the command line and the options hash."""
    return f"{command or 'adaptzip batch'} [adaptzip-batch options_sha256={digest}]"


def stamped_options(command: str | None) -> str | None:
    m = _STAMP_RE.search(command or "")
    return m[1] if m else None


def group_key(ad: Adapter, dtype: torch.dtype) -> str:
    """Adapters with equal keys can share a basis: same base model, container dtype and module table."""
    sig = {"base_model": ad.base_model, "dtype": DTYPE_NAMES[dtype],
           "modules": [[m.name, m.in_features, m.out_features, m.kind, m.fan_in_fan_out] for m in ad.modules]}
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]


# ============================================================== the worker
class Interrupted(KeyboardInterrupt):
    """Raised inside a conversion when the batch is asked to stop (SIGINT/SIGTERM)."""


_W = {"busy": False, "raised": False, "stop": False}  # per process: worker role, or the main one inline


def _raise_if_busy() -> None:
    _W["stop"] = True
    if _W["busy"] and not _W["raised"]:
        _W["raised"] = True
        raise Interrupted()


def _worker_signal(signum, frame) -> None:  # noqa: ARG001
    _raise_if_busy()


def _worker_init(threads: int) -> None:
    """Pool worker start: bounded torch threads, and SIGINT/SIGTERM abort the current conversion
    (its atomic write removes its temporary file) instead of killing the process mid-write."""
    torch.set_num_threads(max(1, threads))
    signal.signal(signal.SIGTERM, _worker_signal)
    signal.signal(signal.SIGINT, _worker_signal)


@dataclass
class Job:
    """Everything :func:`convert` needs (picklable; no open files)."""

    rel: str
    src: str
    out: str
    out_rel: str
    to: str
    budget: str | float | None
    dtype: str | None
    seed: int
    options: dict
    compress_kwargs: dict
    force: bool
    digest: str
    command: str | None
    shared_basis: bool


def _base_row(job: Job) -> dict:
    return {"adapter": job.rel or ".", "source": job.src, "output": job.out_rel, "status": "failed", "form": job.to,
            "source_bytes": None, "bytes": None, "ratio": None, "rel_error": None, "svd_baseline_rel_error": None,
            "seconds": 0.0, "error": None}


def _row_from_container(c: ct.Container, row: dict) -> dict:
    m = c.manifest
    met = m.get("metrics") or {}
    zoo = met.get("zoo") or {}
    row.update(form=m["form"], bytes=c.bytes, rel_error=met.get("rel_error"), svd_baseline_rel_error=met.get("svd_baseline_rel_error"))
    if c.shared_names:
        row.update(shared_file=m["shared"]["file"], shared_sha256=m["shared"]["sha256"],
                   shared_share_bytes=zoo.get("shared_share_bytes"),
                   separate_bytes=zoo.get("separate_bytes"), separate_rel_error=zoo.get("separate_rel_error"))
    return row


def up_to_date(job: Job, ad: Adapter) -> ct.Container | None:
    """The existing container when it verifies and matches the source hash and options."""
    out = Path(job.out)
    if not out.is_file():
        return None
    try:
        c = ct.open_container(out)
        c.verify()
    except AdaptzipError:
        return None
    m = c.manifest
    if m["source"]["sha256"] != ad.sha256 or stamped_options(m.get("command")) != job.digest:
        return None
    if c.shared_names and not job.shared_basis:
        return None  # a zoo-shared container, but this run converts adapters one by one
    return c


def convert(job: Job) -> dict:
    """Convert one adapter (or skip it when its container is up to date); never raises for a bad
    adapter: the row's ``status`` is ``converted``, ``skipped`` or ``failed`` with a one-line
    ``error``. Raises :class:`Interrupted` when the batch is stopped."""
    if _W["stop"]:
        raise Interrupted()
    t0, c0 = time.perf_counter(), time.process_time()
    row = _base_row(job)
    _W["busy"] = True
    try:
        ad = load_adapter(job.src)
        dt = api.resolve_dtype(job.dtype, ad)
        row.update(source_bytes=ad.bytes, group=group_key(ad, dt), dtype=DTYPE_NAMES[dt])
        c = None if job.force else up_to_date(job, ad)
        if c is not None:
            _row_from_container(c, row)
            row["status"] = "skipped"
        else:
            res = api.compress(job.src, job.out, to=job.to, budget=job.budget, dtype=job.dtype, seed=job.seed,
                               options=job.options, force=True, progress=False,
                               command=stamp(job.command, job.digest), **job.compress_kwargs)
            _W["busy"] = False  # written: a stop request from here on lets this row finish
            row.update(status="converted", form=res["form"], bytes=res["bytes"], rel_error=res.get("rel_error"),
                       svd_baseline_rel_error=res.get("svd_baseline_rel_error"))
        share = row.get("shared_share_bytes") or 0  # this container's part of a shared file
        row["ratio"] = (row["bytes"] + share) / row["source_bytes"] if row["source_bytes"] else None
    except AdaptzipError as e:
        row.update(status="failed", error=e.cause, error_path=e.path)
    except Exception as e:  # an unexpected failure is still isolated to its adapter
        row.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}")
    finally:
        _W["busy"] = False
        row["seconds"] = time.perf_counter() - t0
        row["cpu_seconds"] = time.process_time() - c0  # this worker process's CPU time for the adapter
    return row


# ============================================================== executors
class _Inline:
    """``--jobs 1``: run each job in this process when it is submitted."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001  (Interrupted included: the loop decides)
            fut.set_exception(e)
        return fut

    def interrupt(self) -> None:
        return  # the main process's own handler raises inside the running conversion

    def shutdown(self) -> None:
        return  # nothing to release


class _Pool:
    """A local process pool (forkserver, else spawn: no fork of a process holding torch threads)."""

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads
        self._new()

    def _new(self) -> None:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["adaptzip.zoo"])
        self.ex = ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx, initializer=_worker_init, initargs=(self.threads,))

    def submit(self, fn, *args) -> Future:
        return self.ex.submit(fn, *args)

    def renew(self) -> None:
        """After a worker died (killed, out of memory) the pool is broken: start a fresh one."""
        self.ex.shutdown(wait=False, cancel_futures=True)
        self._new()

    def interrupt(self) -> None:
        for pid in list(getattr(self.ex, "_processes", None) or {}):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)

    def shutdown(self) -> None:
        self.ex.shutdown(wait=True, cancel_futures=True)


class _Ray:
    """``--executor ray``: the same :func:`convert` as a Ray task (``RAY_ADDRESS`` picks a cluster;
    the zoo and OUT_DIR must be on a filesystem every node sees)."""

    def __init__(self, jobs: int):
        try:
            import ray  # noqa: PLC0415  (optional dependency)
        except ImportError as e:
            raise OptionError(None, "--executor ray needs the 'ray' package (pip install ray); the default --executor process needs nothing") from e
        self.ray = ray
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        self.remote = ray.remote(num_cpus=1)(convert)
        self.refs: list = []

    def submit(self, fn, *args) -> Future:  # noqa: ARG002
        ref = self.remote.remote(*args)
        self.refs.append(ref)
        return ref.future()

    def interrupt(self) -> None:
        for ref in self.refs:  # KeyboardInterrupt inside the task: its atomic write cleans up
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)

    def shutdown(self) -> None:
        return  # nothing to release


# ============================================================== signals, lock, temp files
_MAIN: dict[str, Any] = {"stop": False, "executor": None}


def _main_signal(signum, frame) -> None:  # noqa: ARG001
    _MAIN["stop"] = True
    ex = _MAIN["executor"]
    if ex is not None:
        ex.interrupt()
    _raise_if_busy()  # a conversion running inline, or the zoo-sharing step


@contextlib.contextmanager
def _signals() -> Iterator[None]:
    _MAIN.update(stop=False, executor=None)
    _W.update(busy=False, raised=False, stop=False)
    old = {}
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handlers
                old[s] = signal.signal(s, _main_signal)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _MAIN["executor"] = None


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One batch at a time per output folder (so temporary files found there are stale)."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # not POSIX: no lock
        yield
        return
    fh = open(out / LOCK_FILE, "a+")
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise OptionError(out, "another adaptzip batch is writing into this folder") from e
        yield
    finally:
        fh.close()


def sweep_temporaries(out: Path) -> int:
    """Remove temporary files (``.<name>.<random>.tmp``) that a hard-killed writer left in OUT_DIR."""
    n = 0
    for root, dirs, files in os.walk(out):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
        for f in files:
            if f.startswith(".") and f.endswith(".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(root, f))
                    n += 1
    return n


# ============================================================== progress
class _Progress:
    """Overall bar plus one line per adapter being converted (stderr; only on a terminal)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            from .progress import console
            self.p = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TimeElapsedColumn(), console=console, transient=True)
            self.p.__enter__()
            self.overall = self.p.add_task("[bold]batch[/] (scanning)", total=None)
            self.current: dict[str, Any] = {}
        return self

    def __exit__(self, *exc):
        if self.p is not None:
            self.p.__exit__(*exc)

    def found(self, n: int, scanning: bool) -> None:
        if self.p is not None:
            self.p.update(self.overall, total=n, description="[bold]batch[/]" + (" (scanning)" if scanning else ""))

    def start(self, rel: str) -> None:
        if self.p is not None:
            from rich.markup import escape
            self.current[rel] = self.p.add_task(f"  {escape(rel)}", total=None)

    def done(self, rel: str) -> None:
        if self.p is not None:
            t = self.current.pop(rel, None)
            if t is not None:
                self.p.remove_task(t)
            self.p.advance(self.overall)

    def log(self, msg: str) -> None:
        from .progress import console
        if self.p is not None:
            self.p.console.print(msg, markup=False, highlight=False)
        else:
            console.print(msg, markup=False, highlight=False)


# ============================================================== the batch
@dataclass
class _Run:
    rows: list[dict] = field(default_factory=list)
    interrupted: bool = False


def _check_compress_kwargs(kwargs: dict) -> None:
    import inspect  # noqa: PLC0415
    params = inspect.signature(api.compress).parameters
    own = {"lora_dir", "output", "to", "budget", "dtype", "seed", "options", "force", "progress", "command"}
    for k in kwargs:
        p = params.get(k)
        if k in own or p is None or p.kind is inspect.Parameter.VAR_KEYWORD:
            raise OptionError(None, f"batch: compress has no option {k!r} to pass through (known: {', '.join(sorted(set(params) - own - {'form_options'}))})")


def batch(zoo: str | Path, output: str | Path, *, to: str = "svd", budget: str | float | None = None,
          dtype: str | None = None, seed: int = 0, options: dict[str, Any] | None = None, jobs: int | None = None,
          force: bool = False, shared_basis: bool = False, executor: str = "process", progress: bool = False,
          command: str | None = None, **compress_kwargs: Any) -> dict:
    """Convert every PEFT LoRA adapter below ``zoo`` into ``output/<rel>.safetensors``.

    ``to``/``budget``/``dtype``/``seed``/``options``: as :func:`adaptzip.api.compress` (the
    budget applies to each adapter); ``compress_kwargs`` pass through to it unchanged (e.g. the
    calibration options). ``jobs``: worker processes (default: CPU cores). ``force``: redo
    containers that are up to date. ``shared_basis``: also fit zoo-level shared bases where
    sharing pays (see the module docstring). ``executor``: ``process`` or ``ray``.

    Returns the summary also written to ``output/batch.json``: ``adapters`` (one row each:
    adapter, output, status converted/skipped/shared/failed/ignored/interrupted, source_bytes,
    bytes, ratio, rel_error, svd_baseline_rel_error, seconds, error), ``counts``, ``totals``,
    ``sharing`` (per group: overlap, bytes and error with and without sharing, decision) and
    ``interrupted``."""
    t0 = time.perf_counter()
    zoo, out = Path(zoo), Path(output)
    if not zoo.is_dir():
        raise OptionError(zoo, "no such folder (expected a folder of PEFT LoRA adapters)")
    zoo_real, out_real = os.path.realpath(zoo), os.path.realpath(out)
    if _inside(zoo_real, out_real):
        raise OptionError(out, "the output folder must not contain the zoo")
    if out.exists() and not out.is_dir():
        raise OptionError(out, "exists and is not a folder")
    form_cls = get_form(to)
    config = make_config(form_cls, options or {})
    if budget is not None:
        api.parse_budget(budget, 1 << 20)
    if dtype is not None and dtype not in ("fp16", "bf16", "fp32"):
        raise OptionError(None, f"--dtype {dtype!r}: expected one of fp16, bf16, fp32")
    jobs = (os.cpu_count() or 1) if jobs is None else jobs
    if jobs < 1:
        raise OptionError(None, f"--jobs {jobs}: expected ≥ 1")
    if executor not in ("process", "ray"):
        raise OptionError(None, f"--executor {executor!r}: expected process or ray")
    _check_compress_kwargs(compress_kwargs)
    if shared_basis and compress_kwargs:
        raise OptionError(None, f"--shared-basis fits in weight space; it cannot be combined with {sorted(compress_kwargs)[0]!r}")
    opts = {"to": to, "budget": None if budget is None else str(budget), "dtype": dtype, "seed": seed,
            "options": config_to_json(config), "compress": compress_kwargs}
    digest = options_sha256(opts)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    run = _Run()
    sharing: dict | None = None
    with _lock(out):
        swept = sweep_temporaries(out)
        with _signals(), _Progress(progress) as prog:
            ex: Any = _Ray(jobs) if executor == "ray" else (_Inline() if jobs == 1 else _Pool(jobs, threads))
            _MAIN["executor"] = ex
            try:
                found = discover(zoo, exclude=out)
                job_of = lambda f, o: Job(rel=f.rel, src=str(f.path), out=str(o), out_rel=o.relative_to(out).as_posix(),  # noqa: E731
                                          to=to, budget=budget, dtype=dtype, seed=seed, options=dict(options or {}),
                                          compress_kwargs=compress_kwargs, force=force, digest=digest, command=command,
                                          shared_basis=shared_basis)
                _loop(ex, found, job_of, out, zoo.name, jobs if executor == "ray" else 2 * jobs, run, prog)
            finally:
                ex.shutdown()
                _MAIN["executor"] = None
            if shared_basis and not run.interrupted:
                try:
                    _W["busy"], _W["raised"] = True, False
                    if _MAIN["stop"]:
                        raise Interrupted()
                    sharing = share_zoo(run.rows, out, command=stamp(command, digest), log=prog.log, job_of=job_of)
                except Interrupted:
                    run.interrupted = True
                finally:
                    _W["busy"] = False
        swept += sweep_temporaries(out)  # a kill can land between a temp file's creation and its guard
        summary = _summary(run, zoo, out, opts, digest, jobs, executor, sharing, time.perf_counter() - t0, swept)
        write_summary(out, summary)
    return summary


def _loop(ex, found: Iterator[Found], job_of, out: Path, zoo_name: str, max_inflight: int, run: _Run, prog: _Progress) -> None:
    pending: dict[Future, tuple[Job, int]] = {}
    seen: set[str] = set()
    n_found = 0
    exhausted = False

    def record(row: dict) -> None:
        run.rows.append(row)
        prog.done(row["adapter"])
        if row["status"] == "failed":
            prog.log(f"failed: {row['adapter']}: {row['error']}")

    while True:
        while not exhausted and not _MAIN["stop"] and len(pending) < max_inflight:
            f = next(found, None)
            if f is None:
                exhausted = True
                prog.found(n_found, False)
                break
            n_found += 1
            prog.found(n_found, True)
            base = {"adapter": f.rel or ".", "source": str(f.path), "output": None, "status": f.status, "error": f.problem,
                    "source_bytes": None, "bytes": None, "ratio": None, "rel_error": None, "svd_baseline_rel_error": None, "seconds": 0.0}
            if f.problem is not None:
                record(base)
                continue
            o, why = output_for(out, f.rel, zoo_name)
            if o is not None and str(o) in seen:
                o, why = None, f"output {o.relative_to(out).as_posix()} is already used by another adapter"
            if o is None:
                record({**base, "status": "failed", "error": why})
                continue
            seen.add(str(o))
            job = job_of(f, o)
            prog.start(job.rel or ".")
            pending[ex.submit(convert, job)] = (job, 0)
        if not pending:
            break
        done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
        redo: list[tuple[Job, int]] = []

        def resolve(fut: Future) -> None:
            job, tries = pending.pop(fut)
            try:
                row = fut.result()
            except KeyboardInterrupt:  # Interrupted, in a worker or inline
                row = {**_base_row(job), "status": "interrupted"}
                run.interrupted = True
            except BrokenProcessPool:
                if tries < 2 and not _MAIN["stop"]:
                    redo.append((job, tries + 1))  # on a fresh pool: the culprit may be another adapter
                    return
                row = {**_base_row(job), "error": "the worker process died (killed, or out of memory)"}
            except Exception as e:  # noqa: BLE001  (e.g. a Ray task error): isolated to this adapter
                if _MAIN["stop"]:  # e.g. a cancelled Ray task: redone by the next run
                    row = {**_base_row(job), "status": "interrupted"}
                    run.interrupted = True
                else:
                    row = {**_base_row(job), "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
            record(row)

        for fut in done:
            resolve(fut)
        if redo and isinstance(ex, _Pool):
            wait(list(pending))  # a broken pool fails every pending call at once
            for fut in list(pending):
                resolve(fut)
            ex.renew()
        for job, tries in redo:
            pending[ex.submit(convert, job)] = (job, tries)
        if _MAIN["stop"]:
            run.interrupted = True
            for fut in list(pending):
                if fut is not None and fut.cancel():
                    job, _ = pending.pop(fut)
                    record({**_base_row(job), "status": "interrupted"})


# ============================================================== zoo-level shared basis
def _orth_rows(A: torch.Tensor, tol: float = 1e-7) -> torch.Tensor:
    """Orthonormal basis (k×in) of A's row space (numerically zero directions dropped)."""
    if A.shape[0] == 0:
        return A
    U, S, _ = torch.linalg.svd(A.T, full_matrices=False)
    keep = S > tol * float(S.max().clamp_min(1e-300))
    return U[:, keep].T


def _sum_pair_min(ranks: list[int]) -> int:
    """Σ_{a≠b} min(r_a, r_b) (the largest Σ tr(P_a P_b) can be)."""
    rs = sorted(ranks)
    n = len(rs)
    return 2 * sum(r * (n - 1 - i) for i, r in enumerate(rs))


@dataclass
class ModuleBasis:
    """The stacked spectrum of one module across a group: eigenvalues λ (descending, = σ² of the
    stacked updates), the top ``cap`` right singular vectors V (cap×in, orthonormal rows), the
    mean pairwise cos² between the adapters' A row spaces, and each adapter's ‖ΔW‖²."""

    lam: torch.Tensor
    V: torch.Tensor
    overlap: float
    norms: list[float]


def module_basis(factors: Iterable[tuple[torch.Tensor, torch.Tensor]], n_in: int, cap: int | None = None,
                 total_rank: int | None = None) -> ModuleBasis:
    """From the factors (B_a out×r_a, A_a r_a×in) of one module of n adapters, without any
    dense ΔW: when Σ r_a ≤ in, QR of the stacked Aᵀ and an eigendecomposition of the small
    (Σr)×(Σr) Gram of the stacked cores; otherwise the in×in Gram Σ_a A_aᵀ(B_aᵀB_a)A_a, streamed
    (one adapter's factors in memory at a time; give ``total_rank`` = Σ r_a to choose this path
    before reading). Memory is O((in + out)·in) either way."""
    if total_rank is not None and total_rank > n_in:
        G = torch.zeros(n_in, n_in, dtype=torch.float64)
        S = torch.zeros(n_in, n_in, dtype=torch.float64)
        norms, rk = [], []
        for B, A in factors:
            B, A = B.double(), A.double()
            BtB = B.T @ B
            G += A.T @ BtB @ A
            q = _orth_rows(A)
            S += q.T @ q
            norms.append(float((BtB * (A @ A.T)).sum()))
            rk.append(q.shape[0])
        return _basis_from_gram(G, float(S.pow(2).sum()), rk, norms, cap)
    fs = [(B.double(), A.double()) for B, A in factors]
    R = sum(A.shape[0] for _, A in fs)
    norms = [float(((B.T @ B) * (A @ A.T)).sum()) for B, A in fs]
    qs = [_orth_rows(A) for _, A in fs]
    rk = [q.shape[0] for q in qs]
    if R > n_in:
        G = sum(A.T @ (B.T @ B) @ A for B, A in fs)
        S = sum(q.T @ q for q in qs)
        return _basis_from_gram(G, float(S.pow(2).sum()), rk, norms, cap)
    # Σr ≤ in: stacked A = Rᵀ Qᵀ (QR of the stacked Aᵀ); B_a A_a = C_a Qᵀ; eigen of Σ_a C_aᵀ C_a (R×R)
    Aall = torch.cat([A for _, A in fs], 0)  # R×in
    Q, Rr = torch.linalg.qr(Aall.T)  # in×R, R×R
    M = torch.zeros(R, R, dtype=torch.float64)
    off = 0
    for B, A in fs:
        r = A.shape[0]
        C = B @ Rr[:, off:off + r].T  # out×R: B_a A_a = C Qᵀ
        M += C.T @ C
        off += r
    lam, W = torch.linalg.eigh(M)
    lam, W = lam.flip(0), W.flip(1)
    V = (Q @ W).T  # R×in
    Qall = torch.cat(qs, 0)
    f2 = float((Qall @ Qall.T).pow(2).sum())
    return _finish_basis(lam, V, f2, rk, norms, cap)


def _basis_from_gram(G: torch.Tensor, f2: float, rk: list[int], norms: list[float], cap: int | None) -> ModuleBasis:
    lam, W = torch.linalg.eigh(G)
    return _finish_basis(lam.flip(0), W.flip(1).T, f2, rk, norms, cap)


def _finish_basis(lam: torch.Tensor, V: torch.Tensor, f2: float, rk: list[int], norms: list[float], cap: int | None) -> ModuleBasis:
    """f2 = ‖Σ_a P_a‖²_F = Σ_{a,b} tr(P_a P_b) (P_a: projector on A_a's row space)."""
    pairs = _sum_pair_min(rk)
    overlap = (f2 - sum(rk)) / pairs if pairs > 0 else float("nan")
    k = V.shape[0] if cap is None else min(cap, V.shape[0])
    return ModuleBasis(lam.clamp_min(0), V[:k].contiguous(), overlap, norms)


def choose_ranks(lams: list[torch.Tensor], costs: list[float], total: float, target_residual: float) -> list[int] | None:
    """Greedy by captured energy per stored byte: the smallest ranks k_i whose group residual
    ``total − Σ_i Σ_{j<k_i} λ_{i,j}`` is ≤ ``target_residual``; None when the directions given
    (``lams[i]``, descending) cannot reach it."""
    residual = total
    ks = [0] * len(lams)
    heap = [(-float(lam[0]) / c, i) for i, (lam, c) in enumerate(zip(lams, costs)) if len(lam)]
    heapq.heapify(heap)
    while residual > target_residual:
        if not heap:
            return None
        _, i = heapq.heappop(heap)
        residual -= float(lams[i][ks[i]])
        ks[i] += 1
        if ks[i] < len(lams[i]):
            heapq.heappush(heap, (-float(lams[i][ks[i]]) / costs[i], i))
    return ks


def _shared_blob(bases: list[ModuleBasis], ks: list[int], modules, dt: torch.dtype, n: int, gkey: str) -> tuple[dict, bytes, str]:
    """The shared file's tensors (``A.{i}``: the top-k_i rows of V_i in the container dtype), its
    exact bytes and their sha256 (its name)."""
    from safetensors.torch import save  # noqa: PLC0415
    tensors = {f"A.{i}": b.V[:k].to(dt).contiguous() for i, (b, k) in enumerate(zip(bases, ks))}
    meta = {"format": "adaptzip-shared", "format_version": 1, "kind": "row-basis", "dtype": DTYPE_NAMES[dt],
            "group": gkey, "adapters": n,
            "tensors": {f"A.{i}": {"module": m.name, "in": m.in_features, "rank": k} for i, (m, k) in enumerate(zip(modules, ks))}}
    blob = save(tensors, metadata={SHARED_META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    return tensors, blob, hashlib.sha256(blob).hexdigest()


def _ref(sha: str, n_modules: int) -> dict:
    return {"file": f"{SHARED_DIR}/{sha}.safetensors", "sha256": sha, "tensors": [f"A.{i}" for i in range(n_modules)]}


def _shared_container(ad: Adapter, shared_tensors: dict, ks: list[int], dt: torch.dtype, sha: str,
                      metrics: dict, command: str) -> tuple[dict, dict, fit.FitReport]:
    """One adapter's ``svd`` container whose ``A.{i}`` live in the shared file:
    B_i = argmin ‖ΔW_i − B V_i‖ (least squares against V_i as stored), rounded as stored."""
    from . import linalg  # noqa: PLC0415
    svd_cls = get_form("svd")
    facs = []
    for i, (m, B, A) in enumerate(ad.iter_factors()):
        V = shared_tensors[f"A.{i}"].float()  # k×in
        Bn = B.new_zeros(m.out_features, 0) if V.shape[0] == 0 else linalg.lstsq_B(B.double(), A.double(), V.double()).float()
        facs.append((Bn.to(dt).float(), V))  # out×k
    form = svd_cls(ad.modules, svd_cls.Config(ranks=tuple(ks)), facs)
    rep = fit.evaluate(form, ad, FitContext())
    met = {**rep.to_json(), "module_rel_errors": rep.module_rel_errors, "weighted": False, **metrics}
    tensors, manifest = ct.build(form, ad, dt, metrics=met, command=command, shared=_ref(sha, len(ks)))
    return tensors, manifest, rep


def share_zoo(rows: list[dict], out: Path, *, command: str, log=print, job_of=None) -> dict:
    """Phase 2 of ``--shared-basis``. Adapters with the same base model, dtype and module table
    form a shape group; :func:`cluster_by_overlap` splits it into clusters whose A row spaces
    overlap (e.g. one training seed each), and the adapters left alone form one more candidate.
    For each candidate of ≥ 2 adapters: measure the overlap, fit the shared basis that matches the
    separate containers' error with the fewest bytes, and replace its containers when that saves
    bytes. Updates ``rows`` in place; returns the sharing report."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] in OK_STATUSES and r.get("group"):
            groups.setdefault(r["group"], []).append(r)
    report = []
    for gkey, grp in sorted(groups.items()):
        if len(grp) < 2:
            continue
        grp.sort(key=lambda r: r["adapter"])
        clusters = cluster_by_overlap([load_adapter(r["source"]) for r in grp])
        alone = [i for c in clusters if len(c) == 1 for i in c]
        cands = [(f"{gkey}-{j}", [grp[i] for i in c], "overlapping A") for j, c in enumerate(x for x in clusters if len(x) > 1)]
        if len(alone) >= 2:
            cands.append((f"{gkey}-x", [grp[i] for i in alone], "no overlapping partner"))
        for key, members, kind in cands:
            g = _share_group(key, members, out, command, log, job_of)
            g["cluster"] = kind
            report.append(g)
    sep = sum(g["separate"]["bytes"] for g in report)
    zoo_b = sum(g["shared"]["bytes"] if g["decision"] == "shared" else g["separate"]["bytes"] for g in report)
    return {"groups": report, "separate_bytes": sep, "zoo_bytes": zoo_b, "bytes_saved": sep - zoo_b,
            "shared_groups": sum(1 for g in report if g["decision"] == "shared")}


def _subspace_overlap(qa: torch.Tensor, qb: torch.Tensor) -> float:
    """Mean cos² of the principal angles between two row spaces (orthonormal rows)."""
    k = min(qa.shape[0], qb.shape[0])
    return float((qa @ qb.T).pow(2).sum()) / k if k else 0.0


def cluster_by_overlap(ads: list[Adapter], probes: int = 3, threshold: float | None = None) -> list[list[int]]:
    """Split adapters (same module table) into clusters whose A row spaces overlap: an adapter joins
    the first cluster whose first member's A overlaps its own by a mean cos² ≥ ``threshold`` on
    ``probes`` modules spread over the table (default threshold: max(0.3, 3·r/in), three times
    what unrelated random subspaces give). One pass, O(adapters × clusters)."""
    mods = ads[0].modules
    idx = sorted({round(j * (len(mods) - 1) / max(1, probes - 1)) for j in range(min(probes, len(mods)))})
    if threshold is None:
        threshold = min(0.9, max(0.3, 3 * sum(mods[i].rank / mods[i].in_features for i in idx) / len(idx)))
    reps: list[list[torch.Tensor]] = []
    clusters: list[list[int]] = []
    for a, ad in enumerate(ads):
        qs = [_orth_rows(ad.factors(ad.modules[i])[1].double()) for i in idx]
        for c, rq in enumerate(reps):
            if sum(_subspace_overlap(q, r) for q, r in zip(qs, rq)) / len(qs) >= threshold:
                clusters[c].append(a)
                break
        else:
            reps.append(qs)
            clusters.append([a])
    return clusters


def _group_err(errs: list[float], norms: list[float]) -> float:
    """Energy-weighted group error sqrt(Σ_a e_a² ‖ΔW_a‖² / Σ_a ‖ΔW_a‖²)."""
    tot = sum(norms)
    return math.sqrt(sum(e * e * n for e, n in zip(errs, norms)) / tot) if tot > 0 else 0.0


def _share_group(gkey: str, grp: list[dict], out: Path, command: str, log, job_of) -> dict:
    n = len(grp)
    ads = [load_adapter(r["source"]) for r in grp]
    dt = api.resolve_dtype(grp[0].get("dtype"), ads[0])
    fb = torch.empty(0, dtype=dt).element_size()
    modules = ads[0].modules
    # the alternative: each adapter's separate container (the better of its form and the same-bytes svd)
    sep_bytes, sep_err = [], []
    for r in grp:
        if r.get("shared_file"):  # shared by an earlier run: its container remembers the alternative
            sep_bytes.append(r["separate_bytes"])
            sep_err.append(r["separate_rel_error"])
        else:
            sep_bytes.append(r["bytes"])
            sep_err.append(min(x for x in (r.get("rel_error"), r.get("svd_baseline_rel_error")) if x is not None))
    T = sum(sep_bytes)
    costs = [(m.in_features + n * m.out_features) * fb for m in modules]  # one shared direction: A row once, B column n times
    bases = [module_basis((ad.factors(ad.modules[i]) for ad in ads), m.in_features, cap=max(0, int(T // costs[i])),
                          total_rank=sum(ad.modules[i].rank for ad in ads))
             for i, m in enumerate(modules)]
    norms = [sum(b.norms[a] for b in bases) for a in range(n)]
    total = sum(norms)
    e_sep = _group_err(sep_err, norms)
    target = e_sep ** 2 * total
    by_type: dict[str, list[float]] = {}
    for m, b in zip(modules, bases):
        if not math.isnan(b.overlap):
            by_type.setdefault(m.type_key, []).append(b.overlap)
    ov = [x for v in by_type.values() for x in v]

    def metrics(a: int, blob_bytes: int) -> dict:
        return {"svd_baseline_rel_error": grp[a].get("svd_baseline_rel_error"), "svd_baseline_bytes": sep_bytes[a],
                "zoo": {"group": gkey, "adapters": n, "shared_file_bytes": blob_bytes, "shared_share_bytes": blob_bytes / n,
                        "separate_bytes": sep_bytes[a], "separate_rel_error": sep_err[a]}}

    # fixed bytes of sharing (headers, carried tensors): the containers and shared file at rank 0
    zero = [0] * len(modules)
    _, blob0, sha0 = _shared_blob(bases, zero, modules, dt, n, gkey)
    fixed = len(blob0) + sum(ct.serialized_size(*_shared_container(ad, {f"A.{i}": b.V[:0] for i, b in enumerate(bases)}, zero, dt, sha0, metrics(a, len(blob0)), command)[:2])
                             for a, ad in enumerate(ads))
    ks_eq = linalg_allocate([b.lam[:b.V.shape[0]] for b in bases], costs, T - fixed)
    eq_err = math.sqrt(max(0.0, total - sum(float(b.lam[:k].sum()) for b, k in zip(bases, ks_eq))) / total) if total > 0 else 0.0
    ks_need = choose_ranks([b.lam for b in bases], costs, total, target)
    res: dict[str, Any] = {
        "group": gkey, "adapters": n, "modules": len(modules), "dtype": DTYPE_NAMES[dt],
        "overlap": sum(ov) / len(ov) if ov else None,
        "overlap_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "overlap_random": sum(m.rank / m.in_features for m in modules) / len(modules),
        "separate": {"bytes": T, "rel_error": e_sep},
        "estimate": {"shared_rel_error_at_equal_bytes": eq_err,
                     "shared_bytes_at_equal_error": None if ks_need is None else fixed + sum(k * c for k, c in zip(ks_need, costs))},
        "shared": None, "decision": "separate", "reason": "",
    }
    best, ks = None, None
    for attempt in range(6):  # rounding to the container dtype costs a little: tighten the target and retry
        ks = choose_ranks([b.lam[:b.V.shape[0]] for b in bases], costs, total, target * 0.97 ** attempt)
        if ks is None or fixed + sum(k * c for k, c in zip(ks, costs)) >= T:
            break
        tensors, blob, sha = _shared_blob(bases, ks, modules, dt, n, gkey)
        sizes, errs = [], []
        for a, ad in enumerate(ads):
            t, man, rep = _shared_container(ad, tensors, ks, dt, sha, metrics(a, len(blob)), command)
            sizes.append(ct.serialized_size(t, man))
            errs.append(rep.rel_error)
        best = {"bytes": len(blob) + sum(sizes), "shared_file_bytes": len(blob), "containers_bytes": sum(sizes),
                "rel_error": _group_err(errs, norms), "ranks": {"total": sum(ks), "min": min(ks), "max": max(ks)}, "sha256": sha}
        if best["rel_error"] <= e_sep * (1 + 1e-9):
            break
    res["shared"] = best
    if best is None:
        res["reason"] = "a shared basis cannot match the separate containers' error in fewer bytes"
    elif best["rel_error"] > e_sep * (1 + 1e-9):
        res["reason"] = f"shared error {best['rel_error']:.4g} > separate {e_sep:.4g} within the separate bytes"
    elif best["bytes"] >= T:
        res["reason"] = f"shared needs {best['bytes']} bytes ≥ {T} separate"
    else:
        res.update(decision="shared", bytes_saved=T - best["bytes"], error_change=best["rel_error"] - e_sep,
                   reason=f"{T - best['bytes']} bytes saved ({1 - best['bytes'] / T:.1%}) at group error {best['rel_error']:.4g} ≤ {e_sep:.4g}")
    log(f"zoo sharing, group {gkey} ({n} adapters, A-overlap {res['overlap'] or 0:.3f}, random {res['overlap_random']:.3f}): "
        f"{res['decision']}: {res['reason']}")
    if res["decision"] == "shared":
        tensors, blob, sha = _shared_blob(bases, ks, modules, dt, n, gkey)
        path = out / SHARED_DIR / f"{sha}.safetensors"
        if not (path.is_file() and ct.file_sha256(path) == sha):  # content-addressed: an intact one is never rewritten
            with atomic_file(path) as tmp:
                tmp.write_bytes(blob)
        for a, (ad, r) in enumerate(zip(ads, grp)):
            if r.get("shared_sha256") == sha and r["status"] == "skipped":
                continue  # verified up to date by this run
            t, man, rep = _shared_container(ad, tensors, ks, dt, sha, metrics(a, len(blob)), command)
            written = ct.write(out / r["output"], t, man)
            r.update(status="shared", form="svd", bytes=written, ratio=(written + len(blob) / n) / r["source_bytes"],
                     rel_error=rep.rel_error, shared_file=f"{SHARED_DIR}/{sha}.safetensors", shared_sha256=sha,
                     shared_share_bytes=len(blob) / n, separate_bytes=sep_bytes[a], separate_rel_error=sep_err[a])
    elif job_of is not None:
        for r in grp:  # containers an earlier run shared, where sharing no longer pays: convert them one by one
            if r.get("shared_file"):
                job = job_of(Found("" if r["adapter"] == "." else r["adapter"], Path(r["source"])), out / r["output"])
                job.force = True
                r.clear()
                r.update(convert(job))
                _W["busy"] = True  # convert() cleared it; this step may still be interrupted
    return res


def linalg_allocate(gains: list[torch.Tensor], costs: list[float], budget: float) -> list[int]:
    """:func:`adaptzip.linalg.allocate` (greedy σ² per byte within a budget); zeros for no budget."""
    from . import linalg  # noqa: PLC0415
    if budget <= 0:
        return [0] * len(gains)
    return linalg.allocate([g.double() for g in gains], costs, budget)



# ============================================================== summary
def _summary(run: _Run, zoo: Path, out: Path, opts: dict, digest: str, jobs: int, executor: str,
             sharing: dict | None, seconds: float, swept: int) -> dict:
    rows = sorted(run.rows, key=lambda r: r["adapter"])
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    ok = [r for r in rows if r["status"] in OK_STATUSES]
    shared_files = {r["shared_file"] for r in ok if r.get("shared_file")}
    shared_bytes = sum((out / f).stat().st_size for f in shared_files if (out / f).is_file())
    src = sum(r["source_bytes"] or 0 for r in ok)
    cb = sum(r["bytes"] or 0 for r in ok)
    return {
        "zoo": str(zoo), "output": str(out), "options": _canon(opts), "options_sha256": digest, "jobs": jobs,
        "executor": executor, "seconds": seconds, "interrupted": run.interrupted, "stale_temporaries_removed": swept,
        "counts": counts, "failed": counts.get("failed", 0),
        "totals": {"adapters": len(ok), "source_bytes": src, "container_bytes": cb, "shared_bytes": shared_bytes,
                   "zoo_bytes": cb + shared_bytes, "ratio": (cb + shared_bytes) / src if src else None},
        "sharing": sharing,
        "adapters": rows,
    }


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def _f(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_summary(out: Path, s: dict) -> None:
    """``batch.json`` and ``batch.md`` in OUT_DIR (atomically)."""
    with atomic_file(out / SUMMARY_JSON) as tmp:
        tmp.write_text(json.dumps(_clean(s), indent=1, sort_keys=False, allow_nan=False) + "\n")
    t = s["totals"]
    lines = [f"# adaptzip batch: {_md_cell(s['zoo'])}", "",
             f"- form `{s['options']['to']}`, budget `{s['options']['budget']}`, options sha256 `{s['options_sha256'][:12]}`",
             f"- {', '.join(f'{k}: {v}' for k, v in sorted(s['counts'].items()))}" + ("  **(interrupted: rerun to finish)**" if s["interrupted"] else ""),
             f"- source bytes {t['source_bytes']}, zoo bytes {t['zoo_bytes']} (containers {t['container_bytes']} + shared {t['shared_bytes']}), ratio {_f(t['ratio'])}",
             f"- {s['jobs']} job(s), executor {s['executor']}, {s['seconds']:.1f} s", ""]
    if s.get("sharing"):
        lines += ["## Zoo sharing (--shared-basis)", "",
                  "| group | adapters | A-overlap | random | separate bytes | separate error | shared bytes | shared error | decision |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for g in s["sharing"]["groups"]:
            sh = g["shared"] or {}
            lines.append(f"| {g['group']} | {g['adapters']} | {_f(g['overlap'], '.3f')} | {_f(g['overlap_random'], '.3f')} | {g['separate']['bytes']} | "
                         f"{_f(g['separate']['rel_error'])} | {_f(sh.get('bytes'), 'd') if sh else '–'} | {_f(sh.get('rel_error'))} | {g['decision']}: {_md_cell(g['reason'])} |")
        lines.append("")
    lines += ["## Adapters", "", "| adapter | source bytes | container bytes | ratio | error | svd-baseline error | time (s) | status |",
              "|---|---|---|---|---|---|---|---|"]
    for r in s["adapters"]:
        status = r["status"] + (f": {_md_cell(r['error'])}" if r.get("error") else "")
        lines.append(f"| {_md_cell(r['adapter'])} | {_f(r.get('source_bytes'), 'd') if r.get('source_bytes') is not None else '–'} | "
                     f"{_f(r.get('bytes'), 'd') if r.get('bytes') is not None else '–'} | {_f(r.get('ratio'))} | {_f(r.get('rel_error'))} | "
                     f"{_f(r.get('svd_baseline_rel_error'))} | {r.get('seconds', 0):.2f} | {status} |")
    with atomic_file(out / SUMMARY_MD) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


__all__ = ["batch", "discover", "convert", "Job", "Found", "output_for", "share_zoo", "module_basis", "choose_ranks",
           "options_sha256", "stamp", "stamped_options", "sweep_temporaries", "write_summary", "Interrupted"]
