"""Thread control and signals: the one place that changes torch's intra-op thread count, and the
one place that installs SIGINT/SIGTERM handlers.

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
