"""Running conversions: the :class:`Job`, the worker :func:`convert` (a plain picklable function,
so any executor runs it), the executors (inline for one job, a local process pool, Ray tasks),
SIGINT/SIGTERM handling (stop starting work, abort the running conversions inside Python so
their atomic writes clean up), the per-OUT_DIR lock and the sweep of stale temporary files."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import container as ct
from .. import pipeline
from ..adapter import DTYPE_NAMES, Adapter, load_adapter
from ..budget import resolve_dtype
from ..errors import AdaptzipError, OptionError, OutputError
from ..fileio import output_error
from ..options import CalibrationOptions, FitOptions, QuantOptions, RunOptions
from ..runtime import Interrupted, interrupt, on_signals, set_signal_handler, set_threads
from .discovery import LOCK_FILE, group_key, stamp, stamped_options

OK_STATUSES = ("converted", "skipped", "shared")  # the row statuses of an adapter with an up-to-date container


_W = {"busy": False, "raised": False, "stop": False}  # per process: worker role, or the main one inline


def _raise_if_busy() -> None:
    _W["stop"] = True
    if _W["busy"] and not _W["raised"]:
        _W["raised"] = True
        interrupt()  # Interrupted, now or at the end of a commit/cleanup (runtime.shielded)


def _worker_signal(signum, frame) -> None:
    _raise_if_busy()


def _worker_init(threads: int) -> None:
    """Pool worker start: bounded torch threads, and SIGINT/SIGTERM abort the current conversion
    (its atomic write removes its temporary file) instead of killing the process mid-write."""
    set_threads(threads)
    set_signal_handler(_worker_signal)


@dataclass
class Job:
    """Everything :func:`convert` needs (picklable; no open files)."""

    rel: str
    src: str
    out: str
    out_rel: str
    to: str
    budget: str | float | None
    options: dict
    fitting: FitOptions
    calibration: CalibrationOptions | None
    quant: QuantOptions
    force: bool
    digest: str
    command: str | None
    shared_basis: bool


def empty_row(rel: str, src: str, output: str | None, status: str, error: str | None, **more: Any) -> dict:
    """A summary row with every measured field still empty (the one row layout of batch.json)."""
    measured = dict.fromkeys(("source_bytes", "bytes", "ratio", "rel_error", "svd_baseline_rel_error"))
    return {
        "adapter": rel or ".",
        "source": src,
        "output": output,
        "status": status,
        "error": error,
        **more,
        **measured,
        "seconds": 0.0,
    }


def base_row(job: Job) -> dict:
    """A job's summary row before any result (status ``failed`` until one comes)."""
    return empty_row(job.rel, job.src, job.out_rel, "failed", None, form=job.to)


def _row_from_container(c: ct.Container, row: dict) -> dict:
    m = c.manifest
    met = m.get("metrics") or {}
    zoo = met.get("zoo") or {}
    row.update(
        form=m["form"],
        bytes=c.bytes,
        rel_error=met.get("rel_error"),
        svd_baseline_rel_error=met.get("svd_baseline_rel_error"),
    )
    if c.shared_names:
        row.update(
            shared_file=m["shared"]["file"],
            shared_sha256=m["shared"]["sha256"],
            shared_share_bytes=zoo.get("shared_share_bytes"),
            separate_bytes=zoo.get("separate_bytes"),
            separate_rel_error=zoo.get("separate_rel_error"),
        )
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


def _finish_row(row: dict) -> dict:
    share = row.get("shared_share_bytes") or 0  # this container's part of a shared file
    row["ratio"] = (row["bytes"] + share) / row["source_bytes"] if row["source_bytes"] else None
    return row


def settle(job: Job, since_ns: int) -> dict:
    """The row of a job that gave none (interrupted, cancelled before it started, its worker
    gone, or never started), from what is on disk: ``converted`` when its container is up to
    date and was written by this run (modified at or after ``since_ns``, on the file system's
    clock), ``skipped`` when it is up to date from before (and the run has no ``force``),
    otherwise ``interrupted`` (a rerun converts it)."""
    row = {**base_row(job), "status": "interrupted"}
    out = Path(job.out)
    try:
        if not out.is_file():
            return row
        c = ct.open_container(out)
        if stamped_options(c.manifest.get("command")) != job.digest:
            return row  # cheap: another run's options, no hashing
        ad = load_adapter(job.src)
        c = up_to_date(job, ad)
        if c is None:
            return row
        mtime = out.stat().st_mtime_ns
    except (AdaptzipError, OSError):
        return row
    if mtime < since_ns and job.force:
        return row  # an old container that --force was to redo
    dt = resolve_dtype(job.fitting.dtype, ad)
    row.update(
        status="converted" if mtime >= since_ns else "skipped",
        source_bytes=ad.bytes,
        group=group_key(ad, dt),
        dtype=DTYPE_NAMES[dt],
    )
    return _finish_row(_row_from_container(c, row))


def convert(job: Job) -> dict:
    """Convert one adapter (or skip it when its container is up to date); never raises for a bad
    adapter: the row's ``status`` is ``converted``, ``skipped`` or ``failed`` with a one-line
    ``error``. Raises :class:`~adaptzip.runtime.Interrupted` when the batch is stopped (the
    caller settles the row from the disk: :func:`settle`)."""
    if _W["stop"]:
        raise Interrupted()
    t0, c0 = time.perf_counter(), time.process_time()
    row = base_row(job)
    outer = _W["busy"]  # True when called from the main process's own interruptible step (zoo sharing)
    _W["busy"] = True
    try:
        ad = load_adapter(job.src)
        dt = resolve_dtype(job.fitting.dtype, ad)
        row.update(source_bytes=ad.bytes, group=group_key(ad, dt), dtype=DTYPE_NAMES[dt])
        c = None if job.force else up_to_date(job, ad)
        if c is not None:
            _row_from_container(c, row)
            row["status"] = "skipped"
        else:
            res = pipeline.compress(
                job.src,
                job.out,
                to=job.to,
                budget=job.budget,
                form_options=job.options,
                fitting=job.fitting,
                calibration=job.calibration,
                quant=job.quant,
                run=RunOptions(force=True, progress=False, command=stamp(job.command, job.digest)),
            )
            _W["busy"] = False  # written: a stop request from here on lets this row finish
            row.update(
                status="converted",
                form=res.form,
                bytes=res.bytes,
                rel_error=res.metrics.get("rel_error"),
                svd_baseline_rel_error=res.metrics.get("svd_baseline_rel_error"),
            )
        _finish_row(row)
    except Exception as e:  # noqa: BLE001  (an unexpected failure is still isolated to its adapter)
        if _W["stop"]:  # a stop request turned into another error (torch: "could not determine the shape")
            raise Interrupted() from e
        if isinstance(e, AdaptzipError):
            row.update(status="failed", error=e.cause, error_path=e.path)
        else:
            row.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}")
    finally:
        _W["busy"] = outer
        row["seconds"] = time.perf_counter() - t0
        row["cpu_seconds"] = time.process_time() - c0  # this worker process's CPU time for the adapter
    return row


# ------------------------------------------------------------------ executors
class Inline:
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


class Pool:
    """A local process pool (forkserver, else spawn: no fork of a process holding torch threads)."""

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads
        self._new()

    def _new(self) -> None:
        methods = mp.get_all_start_methods()
        ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(["adaptzip.zoo"])
        self.ex = ProcessPoolExecutor(
            max_workers=self.jobs, mp_context=ctx, initializer=_worker_init, initargs=(self.threads,)
        )

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


class RayTasks:
    """``--executor ray``: the same :func:`convert` as a Ray task (``RAY_ADDRESS`` picks a cluster;
    the zoo and OUT_DIR must be on a filesystem every node sees)."""

    def __init__(self, jobs: int):
        try:
            import ray
        except ImportError as e:
            raise OptionError(
                None,
                "--executor ray needs the 'ray' package (pip install ray); the default --executor process needs nothing",
            ) from e
        self.ray = ray
        if not ray.is_initialized():
            ray.init(ignore_reinit_error=True, log_to_driver=False)
        self.remote = ray.remote(num_cpus=1)(convert)
        self.refs: list = []

    def submit(self, fn, *args) -> Future:
        ref = self.remote.remote(*args)
        self.refs.append(ref)
        return ref.future()

    def interrupt(self) -> None:
        for ref in self.refs:  # KeyboardInterrupt inside the task: its atomic write cleans up
            with contextlib.suppress(Exception):
                self.ray.cancel(ref)

    def shutdown(self) -> None:
        return  # nothing to release


# ------------------------------------------------------------------ signals, lock, temporary files
_MAIN: dict[str, Any] = {"stop": False, "executor": None}


def _main_signal(signum, frame) -> None:
    _MAIN["stop"] = True
    ex = _MAIN["executor"]
    if ex is not None:
        ex.interrupt()
    _raise_if_busy()  # a conversion running inline, or the zoo-sharing step


def stop_requested() -> bool:
    """True once SIGINT/SIGTERM reached this batch."""
    return _MAIN["stop"]


@contextlib.contextmanager
def open_executor(kind: str, jobs: int, threads: int) -> Iterator[Any]:
    """The executor of this batch (``ray``: Ray tasks; else one job inline, or a process pool of
    ``jobs`` workers with ``threads`` torch threads each), told of SIGINT/SIGTERM while it runs."""
    ex: Any = RayTasks(jobs) if kind == "ray" else (Inline() if jobs == 1 else Pool(jobs, threads))
    _MAIN["executor"] = ex
    try:
        yield ex
    finally:
        ex.shutdown()
        _MAIN["executor"] = None


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """A step of the main process itself (zoo sharing): SIGINT/SIGTERM raise :class:`Interrupted`
    inside it (at once when a stop came before)."""
    _W["busy"], _W["raised"] = True, False
    try:
        if _MAIN["stop"]:
            raise Interrupted()
        yield
    finally:
        _W["busy"] = False


@contextlib.contextmanager
def signals() -> Iterator[None]:
    """While a batch runs in this (main) thread, SIGINT/SIGTERM stop it instead of killing it:
    no new adapter starts, the executor interrupts its conversions; the old handlers (the CLI's)
    come back after (:func:`adaptzip.runtime.on_signals`)."""
    _MAIN.update(stop=False, executor=None)
    _W.update(busy=False, raised=False, stop=False)
    try:
        with on_signals(_main_signal):
            yield
    finally:
        _MAIN["executor"] = None


@contextlib.contextmanager
def lock(out: Path) -> Iterator[int]:
    """One batch at a time per output folder (so temporary files found there are stale). Yields
    the time the lock was taken on the output file system's clock (ns; the lock file's mtime):
    a container modified since was written by this run."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield time.time_ns()
        return
    try:
        fh = open(out / LOCK_FILE, "a+")  # noqa: SIM115 (closed below; closing releases the lock)
    except OSError as e:
        raise output_error(out / LOCK_FILE, e) or OutputError(out, str(e)) from e
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            raise OptionError(out, "another adaptzip batch is writing into this folder") from e
        try:
            os.utime(fh.fileno())
            since = os.fstat(fh.fileno()).st_mtime_ns
        except OSError:
            since = time.time_ns()
        yield since


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
