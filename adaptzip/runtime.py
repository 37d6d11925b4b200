"""Thread control and signals: the one place that changes torch's intra-op thread count, and the
one place that installs SIGINT/SIGTERM handlers.

Every command that computes takes ``--threads N`` (:func:`use_threads`); without it a command uses
the cores that are idle when it starts (:func:`idle_cores`), and ``batch`` splits them among its
workers.

Small tensor work (element-wise kernels on a few thousand values, the test suite's tiny models)
is memory-bound: waking a second thread costs more than it saves, and on a shared CPU far more
(measured: ``torch.round`` on 5k values, 5 µs with one thread, 12 ms with two under load). Code
that knows its work is small says so with :func:`single_thread`; nothing else here sets threads.

Signals: a writing command must never be killed mid-write. :func:`on_signals` turns SIGINT and
SIGTERM into :class:`Interrupted`, raised in the main thread, so the atomic writers of
:mod:`adaptzip.fileio` remove what they made; :func:`shielded` defers a signal over a commit or a
cleanup. ``batch`` installs its own handler (stop starting work) through the same function.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import torch


class _SingleThread(contextlib.ContextDecorator):
    """See :func:`single_thread`. Re-entrant: each entry saves the count it found on a stack."""

    def __init__(self) -> None:
        self._saved: list[int] = []

    def __enter__(self) -> None:
        n = torch.get_num_threads()
        self._saved.append(n)
        if n != 1:
            torch.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        n = self._saved.pop()
        if n != 1:
            torch.set_num_threads(n)


def set_threads(n: int) -> None:
    """torch on ``n`` (≥ 1) intra-op threads from now on (a worker process's share of the cores)."""
    torch.set_num_threads(max(1, int(n)))


def cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def idle_cores() -> int:
    """Cores not already busy: :func:`cores` minus the 1-minute load average (rounded), at least
    one. On a shared machine a second job at full width oversubscribes the cores, and OpenMP's
    spinning threads then lose 2–4× (two jobs at 2 threads each on 2 cores, measured); starting at
    the idle width avoids that, and on an idle machine it is every core."""
    n = cores()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(n, int(round(n - busy))))


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[None]:
    """torch on ``n`` intra-op threads inside, the previous count restored after (``n`` None:
    unchanged) — ``RunOptions.threads`` of the Python API."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    set_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def use_threads(n: int | None) -> int:
    """torch's intra-op threads for this command: ``n`` when given (``--threads``), else
    :func:`idle_cores`. Returns the count set."""
    k = idle_cores() if n is None else int(n)
    set_threads(k)
    return max(1, k)


def single_thread() -> _SingleThread:
    """torch on one intra-op thread inside, the previous count restored after (also on error).

    As a context manager: ``with single_thread(): ...``; as a decorator: ``@single_thread()``
    (each call of the decorated function enters it; nested and recursive use is safe). When
    torch already runs one thread it changes nothing."""
    return _SingleThread()


# ------------------------------------------------------------------ signals
class Interrupted(BaseException):
    """SIGINT or SIGTERM reached a command, or a batch worker was told to stop.

    It unwinds the stack like KeyboardInterrupt, so every ``finally`` runs (temporary files and
    folders made by the writers are removed), but it is not one: click turns a KeyboardInterrupt
    into an Abort and prints a blank line first, and nothing may be printed before the CLI's
    ``adaptzip: interrupted``. Catch it as ``except (KeyboardInterrupt, Interrupted)``."""


_SIG: dict = {"shield": 0, "pending": None, "raised": False}


def interrupt(exc: BaseException | None = None) -> None:
    """Raise ``exc`` (default :class:`Interrupted`) now, or, inside :func:`shielded`, when the
    outermost shielded section ends (a second signal never cuts a cleanup or a rename short)."""
    exc = Interrupted() if exc is None else exc
    _SIG["raised"] = True
    if _SIG["shield"]:
        if _SIG["pending"] is None:
            _SIG["pending"] = exc
        return
    raise exc


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Signals that arrive inside are deferred (see :func:`interrupt`) to the end of the section:
    used around committing an output (renames) and removing temporary files."""
    _SIG["shield"] += 1
    try:
        yield
    finally:
        _SIG["shield"] -= 1
        if not _SIG["shield"] and _SIG["pending"] is not None:
            exc, _SIG["pending"] = _SIG["pending"], None
            raise exc


def was_interrupted() -> bool:
    """True once a signal was turned into :class:`Interrupted` (since :func:`on_signals` or
    :func:`set_signal_handler`). Some libraries turn an exception raised inside their callbacks
    into another (torch: ``ValueError: could not determine the shape ...``): a failure after an
    interrupt is the interrupt."""
    return _SIG["raised"]


def _raise_interrupted(signum, frame) -> None:
    interrupt()


@contextlib.contextmanager
def on_signals(handler: Callable[[int, Any], None] = _raise_interrupted) -> Iterator[None]:
    """SIGINT and SIGTERM call ``handler`` (default: raise :class:`Interrupted`, deferred inside
    :func:`shielded`) while the block runs, in the main thread; the previous handlers come back
    after. In another thread (where Python allows no handlers) it changes nothing. The one place
    that installs signal handlers: the CLI around every command, ``batch`` and its workers."""
    old = {}
    _SIG["raised"] = False
    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                old[s] = signal.signal(s, handler)
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def set_signal_handler(handler: Callable[[int, Any], None] = _raise_interrupted) -> None:
    """SIGINT and SIGTERM call ``handler`` from now on (a worker process, for its lifetime)."""
    _SIG["raised"] = False
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)
