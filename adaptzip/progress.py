"""Rich progress on stderr (never stdout, which carries ``--json`` results)."""

from __future__ import annotations

import contextlib
import sys
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
)

console = Console(stderr=True)


class Bar:
    """What :func:`progress_bar` yields. Call it to advance: ``bar(n=1, **fields)`` (fields, e.g.
    ``loss``, are shown beside the bar). ``log(msg)`` prints a line on stderr (above the bar while
    one is shown; also when the bar is disabled). ``set_total`` changes the total and the label;
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
        (console if self._p is None else self._p.console).print(msg, markup=False, highlight=False)


@contextlib.contextmanager
def progress_bar(enabled: bool, label: str, total: int | None) -> Iterator[Bar]:
    """A transient progress bar on stderr (when ``enabled`` and stderr exists); yields a :class:`Bar`."""
    if not enabled or not sys.stderr:
        yield Bar()
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as p:
        yield Bar(p, p.add_task(f"[bold]{label}[/]", total=total, info=""))
