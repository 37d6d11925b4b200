"""Zoo conversion: every PEFT LoRA adapter below a folder, converted in parallel, resumable, and
optionally compressed together with a zoo-level shared basis.

Layout (see docs/zoo.md and formats/shared.md)::

    ZOO_DIR/<rel>/adapter_config.json   →   OUT_DIR/<rel>.safetensors      one container per adapter
                                            OUT_DIR/_shared/<sha256>.safetensors   shared parts (--shared-basis)
                                            OUT_DIR/batch.json, OUT_DIR/batch.md   the summary

Pipeline: :func:`discover` walks the zoo lazily (``os.scandir``, never following symlinked
folders); each adapter becomes a :class:`Job`; :func:`convert` (a plain picklable function, so
any executor can run it: a local process pool, Ray, Dask) skips an up-to-date container or calls
:func:`adaptzip.pipeline.compress` (what :func:`adaptzip.api.compress` runs), and returns one summary
row. Only the rows are kept.

Resumability: every container written by a batch carries the sha256 of the batch's conversion
options at the end of its manifest ``command`` (``[adaptzip-batch options_sha256=<hex>]``). A
container is up to date when it verifies (payload hash, and the shared file's hash when it uses
one), its manifest's ``source.sha256`` is the source weights file's, and its options hash matches.

Zoo sharing (``shared_basis=True``): see :mod:`adaptzip.zoo.sharing`.

This package: :func:`batch` and its loop here; :mod:`~adaptzip.zoo.discovery` (the zoo's and
OUT_DIR's layout, resume stamps), :mod:`~adaptzip.zoo.run` (jobs, the worker, executors, signals,
lock), :mod:`~adaptzip.zoo.sharing` (the shared basis), :mod:`~adaptzip.zoo.summary` (batch.json
and batch.md); the shared-basis maths is in :mod:`adaptzip.linalg`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import runtime
from ..budget import parse_budget
from ..errors import OptionError
from ..fileio import check_writable, make_dirs
from ..forms import BASELINE, get_form, make_config
from ..forms.base import config_to_json
from ..options import CalibrationOptions, FitOptions, QuantOptions
from ..progress import Bar, progress_bar
from ..runtime import Interrupted
from .discovery import (
    LOCK_FILE,
    RESERVED,
    SHARED_DIR,
    SUMMARY_JSON,
    SUMMARY_MD,
    Found,
    batch_options,
    discover,
    group_key,
    inside,
    options_sha256,
    output_for,
    stamp,
    stamped_options,
)
from .run import (
    OK_STATUSES,
    Job,
    Pool,
    base_row,
    convert,
    empty_row,
    interruptible,
    lock,
    open_executor,
    settle,
    signals,
    stop_requested,
    sweep_temporaries,
    up_to_date,
)
from .sharing import OVERLAP_KEYS, cluster_by_overlap, share_zoo
from .summary import build_summary, write_summary


@dataclass
class _Run:
    rows: list[dict] = field(default_factory=list)
    interrupted: bool = False
    since_ns: int = 0  # when this run took the lock (file system clock): containers modified since are its own


def batch(
    zoo: str | Path,
    output: str | Path,
    *,
    to: str = BASELINE,
    budget: str | float | None = None,
    options: dict[str, Any] | None = None,
    fitting: FitOptions | None = None,
    calibration: CalibrationOptions | None = None,
    quant: QuantOptions | None = None,
    jobs: int | None = None,
    threads: int | None = None,
    force: bool = False,
    shared_basis: bool = False,
    executor: str = "process",
    progress: bool = False,
    command: str | None = None,
) -> dict:
    """Convert every PEFT LoRA adapter below ``zoo`` into ``output/<rel>.safetensors``.

    ``to``/``budget``/``options``/``fitting``/``calibration``/``quant``: as
    :func:`adaptzip.api.compress` (the budget applies to each adapter; None: the defaults).
    ``jobs``: worker processes (default: CPU cores). ``threads``: torch threads per worker
    (default: the idle cores divided among the workers, at least one). ``force``: redo containers that are up to
    date. ``shared_basis``: also fit zoo-level shared bases where sharing pays
    (:mod:`adaptzip.zoo.sharing`; in weight space, or Σ-weighted with ``fitting.stats`` or a
    stats file alone, ``CalibrationOptions(stats_file=…)``; not with distillation or quantisation). ``executor``: ``process`` or ``ray`` (Ray tasks on the cluster that ``ray.init()``
    finds, e.g. by ``RAY_ADDRESS``; the adapters and containers travel through Ray's object store,
    so the nodes need not see ``zoo`` or ``output``: docs/zoo.md).
    ``command``: the command line recorded in every manifest (before the resume stamp).

    Returns the summary also written to ``output/batch.json``: ``adapters`` (one row each:
    adapter, output, status converted/skipped/shared/failed/ignored/interrupted, source_bytes,
    bytes, ratio, rel_error, svd_baseline_rel_error, seconds, error), ``counts``, ``totals``,
    ``sharing`` (per group: overlap, bytes and error with and without sharing, decision) and
    ``interrupted``. Every adapter of the zoo has exactly one row, also after an interrupt (the
    ones not reached are listed too), and its status is what is on disk: ``converted`` or
    ``skipped`` only with an up-to-date container, ``interrupted`` when a rerun converts it."""
    t0 = time.perf_counter()
    fitting, quant = fitting or FitOptions(), quant or QuantOptions()
    zoo, out = Path(zoo), Path(output)
    if not zoo.is_dir():
        raise OptionError(zoo, "no such folder (expected a folder of PEFT LoRA adapters)")
    zoo_real, out_real = os.path.realpath(zoo), os.path.realpath(out)
    if inside(zoo_real, out_real):
        raise OptionError(out, "the output folder must not contain the zoo")
    if out.exists() and not out.is_dir():
        raise OptionError(out, "exists and is not a folder")
    config = make_config(get_form(to), options or {})
    if budget is not None:
        parse_budget(budget, 1 << 20)
    jobs = runtime.cores() if jobs is None else jobs
    if jobs < 1:
        raise OptionError(None, f"--jobs {jobs}: expected ≥ 1")
    if threads is not None and threads < 1:
        raise OptionError(None, f"--threads {threads}: expected ≥ 1")
    if executor not in ("process", "ray"):
        raise OptionError(None, f"--executor {executor!r}: expected process or ray")
    if shared_basis:
        for what, used in (
            ("distillation (--base-model/--calib)", calibration is not None and calibration.teacher),
            (f"--quant {quant.scheme}", quant.scheme != "none"),
        ):
            if used:
                raise OptionError(
                    None,
                    f"--shared-basis fits in weight space (Σ-weighted with --stats FILE); it cannot be combined with {what}",
                )
    opts = batch_options(to, budget, config_to_json(config), fitting, calibration, quant)
    digest = options_sha256(opts)
    first = next(iter(discover(zoo, exclude=out)), None)
    if first is None:  # (a wrong path, most likely: say so, write nothing)
        raise OptionError(zoo, "no PEFT adapter below it (no folder with an adapter_config.json)")
    if first.rel == "" and first.status == "failed":  # the zoo folder itself cannot be listed (sub-folders: rows)
        raise OptionError(zoo, first.problem)
    check_writable(out, folder=True)
    made = make_dirs(out)
    threads = max(1, runtime.idle_cores() // jobs) if threads is None else threads
    run = _Run()
    sharing: dict | None = None
    try:
        with lock(out) as since_ns:
            run.since_ns = since_ns
            swept = sweep_temporaries(out)
            with signals(), progress_bar(progress, "batch (scanning)", None) as bar:

                def job_of(f: Found, o: Path) -> Job:
                    return Job(
                        rel=f.rel,
                        src=str(f.path),
                        out=str(o),
                        out_rel=o.relative_to(out).as_posix(),
                        to=to,
                        budget=budget,
                        options=dict(options or {}),
                        fitting=fitting,
                        calibration=calibration,
                        quant=quant,
                        force=force,
                        digest=digest,
                        command=command,
                        shared_basis=shared_basis,
                    )

                with open_executor(executor, jobs, threads, calibration) as ex:
                    _loop(
                        ex,
                        discover(zoo, exclude=out),
                        job_of,
                        out,
                        zoo.name,
                        jobs if executor == "ray" else 2 * jobs,
                        run,
                        bar,
                    )
                if shared_basis and not run.interrupted:
                    try:
                        with interruptible():
                            sharing = share_zoo(
                                run.rows,
                                out,
                                command=stamp(command, digest),
                                log=bar.log,
                                job_of=job_of,
                                stats=fitting.stats
                                if fitting.stats is not None
                                else (None if calibration is None else calibration.stats_file),
                            )
                    except (KeyboardInterrupt, Interrupted):
                        run.interrupted = True
            swept += sweep_temporaries(out)  # a kill can land between a temp file's creation and its guard
            summary = build_summary(
                run.rows,
                run.interrupted,
                zoo,
                out,
                opts,
                digest,
                jobs,
                executor,
                sharing,
                time.perf_counter() - t0,
                swept,
            )
            write_summary(out, summary)
    except BaseException:
        if made and sorted(os.listdir(out)) == [LOCK_FILE]:  # a failed batch leaves no folder of its own
            with contextlib.suppress(OSError):
                os.unlink(out / LOCK_FILE)
                for d in reversed(made):
                    os.rmdir(d)
        raise
    return summary


def _loop(ex, found: Iterator[Found], job_of, out: Path, zoo_name: str, max_inflight: int, run: _Run, bar: Bar) -> None:
    """Submit the adapters as discovery finds them (at most ``max_inflight`` at a time), collect
    their rows, retry the jobs of a broken process pool twice, and stop on SIGINT/SIGTERM."""
    pending: dict[Future, tuple[Job, int]] = {}
    seen: set[str] = set()
    n_found = 0
    exhausted = False

    def record(row: dict) -> None:
        run.rows.append(row)
        bar.end(row["adapter"])
        if row["status"] == "failed":  # the house error line, naming the file at fault (the batch goes on)
            bar.log(f"adaptzip: error: {row.get('error_path') or row.get('source')}: {row['error']}")

    def resolve(fut: Future, redo: list[tuple[Job, int]]) -> None:
        job, tries = pending.pop(fut)
        try:
            row = ex.result(fut, job)  # Ray: the container it sent back is written here first
        except (KeyboardInterrupt, Interrupted):  # in a worker or inline: the disk says how far it got
            row = settle(job, run.since_ns)
            run.interrupted = True
        except BrokenProcessPool:
            if stop_requested():  # workers told to stop can die before their handler is set
                row = settle(job, run.since_ns)
            elif tries < 2:
                redo.append((job, tries + 1))  # on a fresh pool: the culprit may be another adapter
                return
            else:
                row = {**base_row(job), "error": "the worker process died (killed, or out of memory)"}
        except Exception as e:  # noqa: BLE001  (e.g. a Ray task error): isolated to this adapter
            if stop_requested():  # e.g. a cancelled Ray task: redone by the next run
                row = settle(job, run.since_ns)
                run.interrupted = True
            else:
                row = {**base_row(job), "error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
        record(row)

    def job_for(f: Found) -> Job | dict:
        """The job of a discovered adapter, or its row when it is refused (discovery or output path)."""
        base = empty_row(f.rel, str(f.path), None, f.status, f.problem)
        if f.problem is not None:
            return base
        o, why = output_for(out, f.rel, zoo_name)
        if o is not None and str(o) in seen:
            o, why = None, f"output {o.relative_to(out).as_posix()} is already used by another adapter"
        if o is None:
            return {**base, "status": "failed", "error": why}
        seen.add(str(o))
        return job_of(f, o)

    while True:
        while not exhausted and not stop_requested() and len(pending) < max_inflight:
            f = next(found, None)
            if f is None:
                exhausted = True
                bar.set_total(n_found, "batch")
                break
            n_found += 1
            bar.set_total(n_found, "batch (scanning)")
            job = job_for(f)
            if isinstance(job, dict):
                record(job)
                continue
            bar.begin(job.rel or ".")
            pending[ex.submit(convert, job)] = (job, 0)
        if not pending:
            break
        done, _ = wait(list(pending), timeout=0.25, return_when=FIRST_COMPLETED)
        redo: list[tuple[Job, int]] = []
        for fut in done:
            resolve(fut, redo)
        if redo and isinstance(ex, Pool):
            wait(list(pending))  # a broken pool fails every pending call at once
            for fut in list(pending):
                resolve(fut, redo)
            ex.renew()
        for job, tries in redo:
            pending[ex.submit(convert, job)] = (job, tries)
        if stop_requested():
            run.interrupted = True
            for fut in list(pending):
                if fut is not None and fut.cancel():
                    job, _ = pending.pop(fut)
                    record(settle(job, run.since_ns))
    if run.interrupted:  # the adapters not reached get their rows too (no conversion)
        for f in found:
            job = job_for(f)
            n_found += 1
            record(job if isinstance(job, dict) else settle(job, run.since_ns))
        bar.set_total(n_found, "batch")


__all__ = [
    "LOCK_FILE",
    "OK_STATUSES",
    "OVERLAP_KEYS",
    "RESERVED",
    "SHARED_DIR",
    "SUMMARY_JSON",
    "SUMMARY_MD",
    "Found",
    "Interrupted",
    "Job",
    "batch",
    "batch_options",
    "cluster_by_overlap",
    "convert",
    "discover",
    "group_key",
    "options_sha256",
    "output_for",
    "share_zoo",
    "stamp",
    "stamped_options",
    "sweep_temporaries",
    "up_to_date",
    "write_summary",
]
