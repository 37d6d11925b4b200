"""Rich progress on stderr (never stdout, which carries ``--json`` results), and quiet third-party
libraries: transformers' and huggingface_hub's progress bars, their log messages and Python
warnings are kept off stderr while adaptzip calls them (:func:`quiet_third_party`), unless
``--debug`` (:func:`set_debug`), so that a failing command prints its one error line and nothing
before it."""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class Bar:
    """What :func:`progress_bar` yields. Call it to advance: ``bar(n=1, **fields)`` (fields, e.g.
    ``loss``, are shown beside the bar). ``log(msg)`` prints a line on stderr, never wrapped (above the
    bar while one is shown; also when the bar is disabled). ``set_total`` changes the total and the label;
    ``begin(name)``/``end(name)`` show one line per item in flight (``end`` also advances by 1).
    Everything but ``log`` does nothing when the bar is disabled."""

    def __init__(self, p: Progress | None = None, task: TaskID | None = None):
        self._p, self._task = p, task
        self._items: dict[str, TaskID] = {}

    def __call__(self, n: int = 1, **fields: Any) -> None:
        if self._p is not None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            self._p.update(self._task, advance=n, info=info)

    def set_total(self, total: int | None, label: str | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, total=total, **({} if label is None else {"description": f"[bold]{label}[/]"}))

    def begin(self, name: str) -> None:
        if self._p is not None:
            self._items[name] = self._p.add_task(f"  {escape(name)}", total=None, info="")

    def end(self, name: str) -> None:
        if self._p is not None:
            t = self._items.pop(name, None)
            if t is not None:
                self._p.remove_task(t)
            self._p.advance(self._task)

    def log(self, msg: str) -> None:
        (console if self._p is None else self._p.console).print(msg, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: int | None) -> Iterator[Bar]:
    """A transient progress bar on stderr with the elapsed time and an ETA (when ``enabled`` and
    stderr is a terminal: elsewhere rich cannot redraw a bar, and would leave a blank line where it
    was); yields a :class:`Bar`. stdout is never touched, so ``--json`` results and bars coexist;
    ``--quiet`` turns them off. A distillation's bar counts to its step cap: a run that converges
    sooner ends early."""
    if not enabled or not sys.stderr or not console.is_terminal:
        yield Bar()
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as p:
        yield Bar(p, p.add_task(f"[bold]{label}[/]", total=total, info=""))


_DEBUG = {"on": False}
_log = logging.getLogger("adaptzip.third_party")


def set_debug(on: bool) -> None:
    """``--debug``: :func:`quiet_third_party` changes nothing (warnings and bars are shown)."""
    _DEBUG["on"] = bool(on)


def _to_log(message, category, filename, lineno, file=None, line=None) -> None:
    _log.debug("%s:%s: %s: %s", filename, lineno, category.__name__, message)


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """While the block runs: Python warnings go to the logging module (logger
    ``adaptzip.third_party``, level DEBUG: not printed unless logging is configured so),
    transformers logs only errors, and transformers' and huggingface_hub's progress bars are
    off (when those libraries are imported; enter the block after importing them). Everything is
    restored after; nested use is fine. With :func:`set_debug` on, it changes nothing."""
    if _DEBUG["on"]:
        yield
        return
    with warnings.catch_warnings():
        warnings.showwarning = _to_log
        restore = []
        tl = sys.modules.get("transformers.utils.logging")
        if tl is not None:
            verbosity, bars = tl.get_verbosity(), tl.is_progress_bar_enabled()
            tl.set_verbosity_error()
            tl.disable_progress_bar()
            restore.append(lambda: (tl.set_verbosity(verbosity), tl.enable_progress_bar() if bars else None))
        hub = sys.modules.get("huggingface_hub.utils")
        if hub is not None:
            hub_off = hub.are_progress_bars_disabled()
            hub.disable_progress_bars()
            restore.append(lambda: hub.disable_progress_bars() if hub_off else hub.enable_progress_bars())
        try:
            yield
        finally:
            for r in restore:
                with contextlib.suppress(Exception):
                    r()
