"""Thread control: the one place that changes torch's intra-op thread count for a while.

Small tensor work (element-wise kernels on a few thousand values, the test suite's tiny models)
is memory-bound: waking a second thread costs more than it saves, and on a shared CPU far more
(measured: ``torch.round`` on 5k values, 5 µs with one thread, 12 ms with two under load). Code
that knows its work is small says so with :func:`single_thread`; nothing else here sets threads.
"""

from __future__ import annotations

import contextlib

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
