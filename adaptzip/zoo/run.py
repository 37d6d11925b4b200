"""Running conversions: the :class:`Job`, the worker :func:`convert` (a plain picklable function,
so any executor runs it), the executors (inline for one job, a local process pool, Ray tasks),
SIGINT/SIGTERM handling (stop starting work, abort the running conversions inside Python so
their atomic writes clean up), the per-OUT_DIR lock and the sweep of stale temporary files."""

from __future__ import annotations

import abc
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .. import container as ct
from .. import pipeline
from ..adapter import DTYPE_NAMES, Adapter, load_adapter
from ..budget import resolve_dtype
from ..errors import AdapterError, AdaptzipError, OptionError, OutputError, os_error
from ..fileio import atomic_file, output_error
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


def _source(job: Job, row: dict) -> Adapter | None:
    """Load the job's source adapter and fill the row's source fields; None when its container is
    up to date (the row is then ``skipped``, complete), else the adapter to convert. Raises the
    adapter's error (:func:`_failed` makes it the row's)."""
    ad = load_adapter(job.src)
    dt = resolve_dtype(job.fitting.dtype, ad)
    row.update(source_bytes=ad.bytes, group=group_key(ad, dt), dtype=DTYPE_NAMES[dt])
    c = None if job.force else up_to_date(job, ad)
    if c is None:
        return ad
    _row_from_container(c, row)
    row["status"] = "skipped"
    _finish_row(row)
    return None


def _failed(row: dict, e: Exception) -> dict:
    """The row of a conversion that raised ``e``: ``failed``, with a one-line ``error`` (and the
    file at fault as ``error_path`` for an adaptzip error)."""
    if isinstance(e, OSError):
        e = os_error(e) or e
    if isinstance(e, AdaptzipError):
        row.update(status="failed", error=e.cause, error_path=e.path)
    else:
        row.update(status="failed", error=f"{type(e).__name__}: {' '.join(str(e).split())}")
    return row


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
        if _source(job, row) is not None:
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
        _failed(row, e)
    finally:
        _W["busy"] = outer
        row["seconds"] = time.perf_counter() - t0
        row["cpu_seconds"] = time.process_time() - c0  # this worker process's CPU time for the adapter
    return row


# ------------------------------------------------------------------ executors
class Executor(abc.ABC):
    """What the batch loop uses: ``submit(convert, job)`` gives a future, :meth:`result` the row
    of a finished one, :meth:`interrupt` (from the signal handler) stops the running jobs,
    :meth:`shutdown` releases the workers."""

    @abc.abstractmethod
    def submit(self, fn, *args) -> Future:
        """Start ``fn(*args)``; its future."""

    def result(self, fut: Future, job: Job) -> dict:
        """The row of the finished job ``job`` (raises what the job raised)."""
        return fut.result()

    def interrupt(self) -> None:
        return  # the main process's own handler raises inside a conversion running inline

    def shutdown(self) -> None:
        return  # nothing to release


class Inline(Executor):
    """``--jobs 1``: run each job in this process when it is submitted."""

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001  (Interrupted included: the loop decides)
            fut.set_exception(e)
        return fut


class Pool(Executor):
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


RAY_HINT = "with --executor ray, the base model and calibration files must be at this path on every node"


def ray_convert(job: Job, files: dict[str, bytes]) -> tuple[dict, dict[str, bytes], dict[str, str]]:
    """The Ray task. It runs on any node and opens none of the driver's paths: ``files`` (the
    adapter's, by file name) are written into a temporary folder of its own, ``job.src`` and
    ``job.out`` are names inside that folder, and :func:`convert` runs there. Returns the row, the
    bytes of every file the conversion wrote (the container; with calibration also its Σ file),
    and the temporary paths (which the driver replaces by its own in error messages).

    ``ray.cancel`` reaches a running task as SIGINT in the worker's main thread: while the task
    runs, that is the pool workers' handler, so the conversion stops inside Python (raising
    :class:`Interrupted`, deferred over a commit) and the folder is always removed."""
    _W.update(busy=False, raised=False, stop=False)  # a worker runs task after task (of one batch or more)
    old = None
    with contextlib.suppress(ValueError):  # not the main thread: Ray's own KeyboardInterrupt then
        old = signal.signal(signal.SIGINT, _worker_signal)
    try:
        with tempfile.TemporaryDirectory(prefix="adaptzip-ray-") as tmp:
            src, out = Path(tmp) / "src" / job.src, Path(tmp) / "out"
            src.mkdir(parents=True)
            out.mkdir()
            for name, data in files.items():
                (src / name).write_bytes(data)
            row = convert(replace(job, src=str(src), out=str(out / job.out)))
            made: dict[str, bytes] = {}
            if row["status"] == "converted":
                for p in sorted(out.iterdir()):
                    if p.is_file() and not p.name.startswith("."):
                        made[p.name] = p.read_bytes()
            return row, made, {"src": str(src), "out": str(out)}
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def ray_missing(paths: list[str]) -> list[str]:
    """Ray probe run once on every node: the ``paths`` that do not exist there."""
    return [p for p in paths if not os.path.exists(p)]


def _check_ray_address() -> None:
    """Fail at once when ``RAY_ADDRESS`` (``host:port``) accepts no connection: ``ray.init``
    would retry for many minutes, deaf to Ctrl-C, writing warnings to stderr."""
    addr = os.environ.get("RAY_ADDRESS", "").strip()
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or "://" in addr:
        return  # unset, "auto", "local", a Ray Client address: ray.init decides
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        why = (e.strerror or str(e) or type(e).__name__).lower() if not isinstance(e, TimeoutError) else "timed out"
        raise OptionError(None, f"--executor ray: cannot reach the Ray cluster at RAY_ADDRESS={addr}: {why}") from e


@contextlib.contextmanager
def _keep_signal_handlers() -> Iterator[None]:
    """``ray.init`` installs a SIGTERM handler that exits the process: the batch's own handler
    (stop starting work, let the running conversions end cleanly) is put back after it."""
    old = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):
            old[s] = signal.getsignal(s)
    try:
        yield
    finally:
        for s, h in old.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(s, h)


class RayTasks(Executor):
    """``--executor ray``: each conversion is a Ray task, and no node needs to see the driver's
    files. The driver (this process) loads each adapter and checks its container: a bad adapter
    fails and an up-to-date one is skipped here, without a task. Otherwise it reads the
    adapter's files into the object store; the task (:func:`ray_convert`) converts them in a
    temporary folder of its node and returns the container's bytes, which the driver writes
    atomically into OUT_DIR (:meth:`result`). ``ray.init()`` picks the cluster (``RAY_ADDRESS``),
    unless this process is connected to one already. With calibration, the base model and the
    calibration files must exist at the same absolute path on every node with CPUs: one tiny
    task per node checks that before any work (else :class:`OptionError` naming the path)."""

    def __init__(self, calibration: CalibrationOptions | None = None):
        try:
            import ray
        except ImportError as e:
            raise OptionError(
                None,
                "--executor ray needs the 'ray' package (pip install 'adaptzip[ray]'); the default --executor process needs nothing",
            ) from e
        self.ray = ray
        self.inputs: dict[Future, Any] = {}  # each running task's future → (its ref, its input in the object store)
        self.owned = not ray.is_initialized()  # connected here, so disconnected here at the end
        if self.owned:
            _check_ray_address()
            try:
                with _keep_signal_handlers():
                    ray.init(log_to_driver=False, logging_level=logging.WARNING)
            except Exception as e:  # noqa: BLE001  (ray raises ConnectionError, ValueError, RuntimeError ...)
                where = os.environ.get("RAY_ADDRESS")
                raise OptionError(
                    None,
                    f"--executor ray: cannot connect to the Ray cluster{f' at RAY_ADDRESS={where}' if where else ''}: "
                    f"{' '.join(str(e).split()) or type(e).__name__}",
                ) from e
        try:
            self.calibration = None if calibration is None else self._calibration_everywhere(calibration)
        except BaseException:
            self.shutdown()
            raise
        self.remote = ray.remote(num_cpus=1, max_retries=2)(ray_convert)

    def _calibration_everywhere(self, cal: CalibrationOptions) -> CalibrationOptions:
        """``cal`` with absolute paths, once every node with CPUs has them all (else OptionError)."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        fields = ("base_model", "calib", "eval_text", "stats_file")
        absolute = {f: os.path.abspath(getattr(cal, f)) for f in fields if getattr(cal, f) is not None}
        nodes = [n for n in self.ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
        if not nodes:
            raise OptionError(None, "--executor ray: the Ray cluster has no node with CPUs")
        probe = self.ray.remote(num_cpus=0, max_retries=0)(ray_missing)
        refs = [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                list(absolute.values())
            )
            for n in nodes
        ]
        try:
            answers = self.ray.get(refs, timeout=300)
        except Exception as e:  # noqa: BLE001  (a node that died or never answered)
            raise OptionError(
                None, f"--executor ray: checking the calibration paths on every node failed: {' '.join(str(e).split())}"
            ) from e
        for n, missing in zip(nodes, answers):
            if missing:
                raise OptionError(
                    missing[0], f"no such file or folder on Ray node {n['NodeManagerAddress']} ({RAY_HINT})"
                )
        return replace(cal, **absolute)

    def submit(self, fn, *args) -> Future:
        """Check the job here (a row at once for a skipped or bad adapter), else start its task
        (``fn`` is :func:`convert`: the task runs it on the node's copy of the adapter)."""
        (job,) = args
        t0, c0 = time.perf_counter(), time.process_time()
        row = base_row(job)
        fut: Future = Future()
        fut.set_running_or_notify_cancel()  # the loop waits for every task's answer, also after a stop
        try:
            ad = _source(job, row)
            if ad is not None:
                files = {}
                for p in (ad.path / "adapter_config.json", ad.weights_file):
                    try:
                        files[p.name] = p.read_bytes()
                    except OSError as e:
                        raise AdapterError(p, f"cannot read: {e.strerror or e}") from e
        except Exception as e:  # noqa: BLE001  (the same isolation as in convert)
            ad = None
            _failed(row, e)
        if ad is None:
            row["seconds"], row["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
            fut.set_result((row, {}, None))
            return fut
        task = replace(
            job,
            src=ad.path.name or "adapter",
            out=Path(job.out).name,
            force=True,  # the driver found no up-to-date container
            calibration=self.calibration,
        )
        try:
            data = self.ray.put(files)
            del files
            ref = self.remote.remote(task, data)
        except Exception as e:  # noqa: BLE001  (e.g. the object store refused the files): this adapter fails
            fut.set_result((_failed(row, e), {}, None))
            return fut
        self.inputs[fut] = (ref, data)
        inner = ref.future()

        def done(f: Future) -> None:
            e = f.exception()
            fut.set_exception(e) if e is not None else fut.set_result(f.result())

        inner.add_done_callback(done)
        return fut

    def result(self, fut: Future, job: Job) -> dict:
        """The row of a finished task, after writing what it returned into OUT_DIR (atomically,
        the container last: a container on disk is a finished conversion). A task that died
        with its worker fails its adapter; a cancelled one raises (the loop settles it)."""
        self.inputs.pop(fut, None)
        try:
            row, made, where = fut.result()
        except self.ray.exceptions.TaskCancelledError:  # cancelled before it started
            raise Interrupted() from None
        except self.ray.exceptions.RayError as e:  # stopped (Interrupted), its worker or node died, or a bug
            if stop_requested():
                raise Interrupted() from e
            ex = self.ray.exceptions
            if isinstance(e, (ex.WorkerCrashedError, ex.NodeDiedError, ex.OutOfMemoryError)):
                return {**base_row(job), "error": "the worker process died (killed, or out of memory)"}
            cause = getattr(e, "cause", None) or e
            return {**base_row(job), "error": f"{type(cause).__name__}: {' '.join(str(cause).split())}"}
        if where is None:
            return row
        row["source"] = job.src
        for k in ("error", "error_path"):
            if isinstance(row.get(k), str):
                row[k] = row[k].replace(where["src"], job.src).replace(where["out"], str(Path(job.out).parent))
        if not made:
            return row
        out = Path(job.out)
        try:
            for name in sorted(made, key=lambda n: n == out.name):
                with atomic_file(out.parent / name) as tmp:
                    tmp.write_bytes(made[name])
        except AdaptzipError as e:  # OutputError: no space left on device, permission denied
            for k in ("bytes", "ratio", "rel_error", "svd_baseline_rel_error"):
                row[k] = None
            _failed(row, e)
        return row

    def interrupt(self) -> None:
        """Cancel every unfinished task (see :func:`ray_convert`; a task writes nothing of the
        driver's). Called from the signal handler: the cancels run in a thread of their own."""
        refs = [ref for ref, _ in self.inputs.values()]

        def cancel() -> None:
            for ref in refs:
                with contextlib.suppress(Exception):
                    self.ray.cancel(ref)

        threading.Thread(target=cancel, name="adaptzip-ray-cancel", daemon=True).start()

    def shutdown(self) -> None:
        self.inputs.clear()
        if self.owned and self.ray.is_initialized():
            self.ray.shutdown()


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
def open_executor(kind: str, jobs: int, threads: int, calibration: CalibrationOptions | None = None) -> Iterator[Any]:
    """The executor of this batch (``ray``: Ray tasks, ``calibration`` checked on every node; else
    one job inline, or a process pool of ``jobs`` workers with ``threads`` torch threads each),
    told of SIGINT/SIGTERM while it runs."""
    ex: Executor = RayTasks(calibration) if kind == "ray" else (Inline() if jobs == 1 else Pool(jobs, threads))
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
