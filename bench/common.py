"""Plumbing shared by the bench scripts: peak RSS, one child process per case, the synthetic
Llama-7B-shaped adapter, common command-line options, the printed and markdown tables, and writing
``bench/out/NAME.json`` / ``NAME.md``.

The bench scripts run as ``python bench/bench_NAME.py``, so this directory is on ``sys.path`` and
they import this module as ``common``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
ADAPTER_FILE = Path("adapter") / "adapter_model.safetensors"  # the synthetic adapter, relative to the work folder


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``ru_maxrss``; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_child(
    script: str | Path,
    args: Sequence[str],
    timeout: float,
    *,
    what: str = "case",
    name: str = "",
    process_s: bool = True,
) -> dict:
    """Run ``python SCRIPT ARGS`` in a fresh process and return the JSON object on the last line of
    its stdout. Raises ``RuntimeError`` (with the tail of stderr, naming ``WHAT NAME``) when the child
    fails, ``subprocess.TimeoutExpired`` after ``timeout`` seconds. With ``process_s`` the wall time of
    the whole child process (interpreter start and imports included) is added as ``process_s``."""
    cmd = [sys.executable, str(Path(script).resolve()), *map(str, args)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{what} {name} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if process_s:
        res["process_s"] = wall
    return res


def build_adapter(work: Path, layers: int) -> dict:
    """Write the synthetic Llama-7B-shaped LoRA (r=16, seed 0) to ``WORK/adapter`` (the ``build``
    case, run in a child); return its build seconds, file bytes and module count."""
    import adaptzip

    sys.path.insert(0, str(HERE))
    from llama7b_adapter import build_llama7b_adapter

    src = work / "adapter"
    t0 = time.perf_counter()
    build_llama7b_adapter(src, layers=layers, rank=16, seed=0)
    return {
        "seconds": time.perf_counter() - t0,
        "bytes": (src / "adapter_model.safetensors").stat().st_size,
        "modules": len(adaptzip.load_adapter(src).modules),
    }


def ensure_adapter(work: Path, build: Callable[[], object]) -> int:
    """Call ``build()`` (which runs the ``build`` child) unless ``WORK/adapter`` already holds the
    synthetic adapter; return the adapter file's size in bytes."""
    if not (work / ADAPTER_FILE).exists():
        print("… build the synthetic adapter", file=sys.stderr, flush=True)
        build()
    return (work / ADAPTER_FILE).stat().st_size


def module_count(layers: int) -> int:
    """Number of LoRA modules in the synthetic adapter with ``layers`` decoder layers."""
    sys.path.insert(0, str(HERE))
    from llama7b_adapter import module_shapes

    return layers * len(module_shapes())


def machine_info() -> dict:
    """``cpu``, ``python`` and ``torch`` versions for a result's header (imports torch)."""
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def add_common_args(
    ap: argparse.ArgumentParser,
    name: str,
    cases: Sequence[str] | None = None,
    *,
    timeout: float = 1800,
    what: str = "case",
) -> None:
    """Add the options every case-per-process bench shares: ``--layers``, ``--cases`` (when ``cases``
    is given), ``--work``, ``--keep``, ``--out`` (``NAME.json`` / ``NAME.md``) and ``--timeout``
    (seconds per ``what``). ``--threads`` and the hidden child flag differ per script and stay there."""
    ap.add_argument("--layers", type=int, default=32, help="decoder layers of the synthetic adapter (32 = Llama-7B)")
    if cases is not None:
        ap.add_argument("--cases", default=",".join(cases), help=f"comma-separated subset of {', '.join(cases)}")
    ap.add_argument(
        "--work", type=Path, default=None, help="scratch directory (default: a temporary one, removed afterwards)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where {name}.json / {name}.md go")
    ap.add_argument("--timeout", type=float, default=timeout, help=f"seconds allowed per {what}")


def parse_cases(ap: argparse.ArgumentParser, spec: str, known: Sequence[str]) -> list[str]:
    """The comma-separated ``--cases`` value as a list; an unknown name is a usage error (exit 2)."""
    cases = [c for c in spec.split(",") if c]
    unknown = [c for c in cases if c not in known]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r} (known: {', '.join(known)})")
    return cases


@contextmanager
def scratch(work: Path | None, prefix: str, keep: bool) -> Iterator[Path]:
    """The scratch folder: ``work`` if given (kept), else a new temporary one that is removed on exit
    unless ``keep``."""
    path = work or Path(tempfile.mkdtemp(prefix=prefix))
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if work is None and not keep:
            shutil.rmtree(path, ignore_errors=True)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table for the terminal: the first column left-aligned, the others right-aligned,
    each padded to its widest cell, two spaces between columns."""
    data = [list(columns)] + [list(r) for r in rows]
    w = [max(len(r[i]) for r in data) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r)) for r in data)


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a markdown table: the first column left-aligned, the others right-aligned."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(columns))) + "|",
    ]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def check_targets(targets: list[dict]) -> list[dict]:
    """Set ``ok`` on every target (``measured <= limit``); return the list."""
    for t in targets:
        t["ok"] = t["measured"] <= t["limit"]
    return targets


def targets_markdown(targets: Sequence[dict]) -> list[str]:
    """Lines of the ``| target | measured | limit | met |`` table, preceded by a blank line (none
    without targets)."""
    if not targets:
        return []
    lines = ["", "| target | measured | limit | met |", "|---|---:|---:|:---:|"]
    for t in targets:
        lines.append(
            f"| {t['name']} | {_figure(t['measured'])} | {_figure(t['limit'])} | {'yes' if t['ok'] else '**no**'} |"
        )
    return lines


def _figure(v: float) -> str:
    """Three significant digits, trailing zeros kept (1.0006 → 1.00, 1.1 → 1.10), no exponent
    above 100 (1774.3 → 1,774)."""
    s = f"{v:#.3g}"
    return f"{v:,.0f}" if abs(v) >= 1 and ("e" in s or s.endswith(".")) else s


def write_outputs(out: Path, name: str, result: dict, md: str, *, indent: int = 2) -> None:
    """Write ``OUT/NAME.json`` (the result, indented) and ``OUT/NAME.md`` (the markdown), creating ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=indent) + "\n")
    (out / f"{name}.md").write_text(md)


def loadavg() -> float:
    """The machine's 1-minute load average."""
    return os.getloadavg()[0]


def markdown_doc(
    intro: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    targets: Sequence[dict],
    notes: Sequence[str] = (),
) -> str:
    """A bench's markdown: the intro paragraph, a blank line, the results table, the targets table,
    then each note as a paragraph of its own; ends with a newline."""
    lines = [intro, "", *markdown_table(columns, rows), *targets_markdown(targets)]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def peft_quietly(fn: Callable, *args, **kwargs):
    """Call a PEFT loader (``PeftModel.from_pretrained``, ``load_adapter``); its missing or
    unexpected adapter keys and adapter-name warnings are errors here."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    bad = [str(x.message) for x in w if any(s in str(x.message) for s in ("adapter keys", "prefix", "nexpected"))]
    if bad:
        raise RuntimeError(bad[0])
    return out
