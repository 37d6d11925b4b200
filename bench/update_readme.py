"""Copy benchmark tables into the docs, so that the numbers in the docs come from code.

Every bench script (and ``examples/real_*.py``) writes ``bench/out/NAME.md``; this replaces the
text between the markers

    <!-- bench:NAME -->
    ...
    <!-- /bench:NAME -->

with that file's contents (markers kept), in two files:

* ``docs/benchmarks.md`` holds every table (``foundation``, ``bslora``, ``masa``, ``vblora``,
  ``real_smollm2``, ``real_minilm``, ``calibrate``, ``converge``, ``sigma``, ``gpu_check``,
  ``quant``, ``zoo``, ``zoo_joint``, ``zoo_serve``, ``zoo_ray``, ``native``);
* ``README.md`` holds the one front-page table, ``real_smollm2_front``: a *derived* block, the
  most telling rows of the real-model grid (every form at the quick start's budget, svd and
  bslora-ke at every budget) without the machine-specific run facts. It is derived from
  ``bench/out/real_smollm2.md`` when that exists, else from the ``real_smollm2`` block of
  ``docs/benchmarks.md`` (itself generated), so the front page always agrees with the docs.

A block whose source does not exist is left as it is (and reported). ``--check`` changes
nothing and exits 1 when a file is stale.

    python bench/update_readme.py                       # every block that has a table
    python bench/update_readme.py foundation masa       # only these (and what derives from them)
    python bench/update_readme.py --check
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOCK = re.compile(
    r"(?P<open><!--\s*bench:(?P<name>[A-Za-z0-9_.-]+)\s*-->)(?P<body>.*?)(?P<close><!--\s*/bench:(?P=name)\s*-->)", re.S
)
OPEN = re.compile(r"<!--\s*bench:([A-Za-z0-9_.-]+)\s*-->")
CLOSE = re.compile(r"<!--\s*/bench:([A-Za-z0-9_.-]+)\s*-->")

# The front page's table: the real-model grid's rows at the budget of the README's quick start
# (--budget 0.06 ≈ 5%), plus these forms at every budget.
FRONT_BUDGET = "5%"
FRONT_FORMS = ("svd", "bslora-ke")
# Sentences of a table's caption that describe the machine, not the experiment (front page only).
MACHINE_FACT = re.compile(r"\b(min|minutes|seconds|CPUs?|cores?|load|threads?)\b")


def check_markers(text: str, where: str = "README") -> None:
    """Every opening marker has exactly one closing marker after it, blocks do not nest."""
    opens = [m.group(1) for m in OPEN.finditer(text)]
    closes = [m.group(1) for m in CLOSE.finditer(text)]
    for name in sorted(set(opens) | set(closes)):
        if opens.count(name) != 1 or closes.count(name) != 1:
            raise ValueError(
                f"{where} marker bench:{name}: {opens.count(name)} opening and {closes.count(name)} closing markers (need one each)"
            )
    found = [m.group("name") for m in BLOCK.finditer(text)]
    if sorted(found) != sorted(opens):
        missing = sorted(set(opens) - set(found))
        raise ValueError(
            f"{where} marker bench:{missing[0] if missing else '?'}: closing marker before its opening one, or blocks nested"
        )


def blocks(text: str) -> dict[str, str]:
    """name -> body (stripped) of every block."""
    return {m.group("name"): m.group("body").strip("\n") for m in BLOCK.finditer(text)}


def split_table(md: str) -> tuple[list[str], list[str], list[str]]:
    """(lines before the first table, the first table's lines, lines after it)."""
    lines = md.strip("\n").splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("|")), None)
    if start is None:
        return lines, [], []
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return lines[:start], lines[start:end], lines[end:]


def cells(row: str) -> list[str]:
    return [c.strip() for c in row.strip().strip("|").split("|")]


def front_real_smollm2(md: str) -> str | None:
    """The README's table from the real_smollm2 grid: caption without the machine facts, the rows
    at FRONT_BUDGET and FRONT_FORMS' rows at every budget, and a pointer to the full grid (which
    says when it has cells not run yet)."""
    before, table, after = split_table(md)
    if len(table) < 3:
        return None
    caption = " ".join(ln.strip() for ln in before if ln.strip())
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z`Σ])", caption)
    caption = " ".join(s for s in sentences if not MACHINE_FACT.search(s))
    head = cells(table[0])
    ib, iform = head.index("budget"), head.index("form")
    rows = [r for r in table[2:] if cells(r)[ib] == FRONT_BUDGET or cells(r)[iform] in FRONT_FORMS]
    at: dict[str, list[str]] = {}  # other budget -> the FRONT_FORMS rows it has
    for r in rows:
        if cells(r)[ib] != FRONT_BUDGET:
            at.setdefault(cells(r)[ib], []).append(cells(r)[iform])
    by_forms: dict[tuple[str, ...], list[str]] = {}  # the same forms at several budgets: said once
    for b in sorted(at, key=lambda b: -float(b.rstrip("%"))):
        by_forms.setdefault(tuple(sorted(at[b], key=FRONT_FORMS.index)), []).append(b)
    also = "; ".join(f"{' and '.join(fs)} at {' and '.join(bs)}" for fs, bs in by_forms.items())
    also = f" (and {also})" if also else ""
    pending = next((ln.strip() for ln in after if ln.startswith("Cells not run yet:")), None)
    link = "[docs/benchmarks.md](docs/benchmarks.md#real-models)"
    if pending is None:
        note = f"Rows: every form at {FRONT_BUDGET} of the source's bytes{also}. The whole grid and how it was run: {link}."
    else:
        note = (
            f"Rows: the forms at {FRONT_BUDGET} of the source's bytes{also} that the grid has measured so far. "
            f"The whole grid, the cells it has not run yet and how it was run: {link}."
        )
    return "\n".join([caption, "", table[0], table[1], *rows, "", note])


# derived block name -> (source block name, function of the source's markdown)
DERIVED: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "real_smollm2_front": ("real_smollm2", front_real_smollm2),
}


def update(
    text: str, source: Callable[[str], str | None], names: set[str] | None = None, where: str = "README"
) -> tuple[str, list[str], list[str]]:
    """(new text, names replaced, names without a source); ``source(name)`` gives a block's body."""
    check_markers(text, where)
    replaced, missing = [], []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if names is not None and name not in names and DERIVED.get(name, ("",))[0] not in names:
            return m.group(0)
        body = source(name)
        if body is None:
            missing.append(name)
            return m.group(0)
        replaced.append(name)
        return f"{m.group('open')}\n{body.strip(chr(10))}\n{m.group('close')}"

    return BLOCK.sub(sub, text), replaced, missing


def table_source(tables: Path, fallback: dict[str, str]) -> Callable[[str], str | None]:
    """A block's body: ``tables/NAME.md``; a derived block from its source's table, else from
    the source block as it stands in ``fallback`` (the already updated benchmarks page)."""

    def read(name: str) -> str | None:
        f = tables / f"{name}.md"
        return f.read_text(encoding="utf-8") if f.is_file() else None

    def source(name: str) -> str | None:
        if name in DERIVED:
            src, fn = DERIVED[name]
            md = read(src) or fallback.get(src)
            return None if md is None else fn(md)
        return read(name)

    return source


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, path.stat().st_mode & 0o777)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Copy bench/out/NAME.md tables into docs/benchmarks.md and the README's "
        "front-page table, between <!-- bench:NAME --> markers."
    )
    ap.add_argument("names", nargs="*", help="only these blocks (default: all)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="the page with every table")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the front page (derived table)")
    ap.add_argument("--tables", type=Path, default=HERE / "out", help="where the NAME.md files are")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file differs from the tables")
    a = ap.parse_args(argv)

    names = set(a.names) or None
    known: set[str] = set()
    stale, rc, fallback = [], 0, {}
    for path in (a.docs, a.readme):  # the docs first: the README's derived table may come from them
        text = path.read_text(encoding="utf-8")
        try:
            new, replaced, missing = update(text, table_source(a.tables, fallback), names, where=path.name)
        except ValueError as e:
            print(f"update_readme: error: {path}: {e}", file=sys.stderr)
            return 2
        fallback = blocks(new)
        known |= set(blocks(text))
        for n in missing:
            src = DERIVED[n][0] if n in DERIVED else n
            print(
                f"update_readme: no {a.tables / (src + '.md')}: block bench:{n} in {path.name} left as it is",
                file=sys.stderr,
            )
        if new != text:
            stale.append(path.name)
            if not a.check:
                write_atomic(path, new)
        if a.check:
            print(
                f"{path.name} {'is stale' if new != text else 'is up to date'} ({', '.join(replaced) or 'no tables'})",
                file=sys.stderr,
            )
        else:
            print(
                f"updated {path.name}: {', '.join(replaced) or 'nothing'}" + ("" if new != text else " (no change)"),
                file=sys.stderr,
            )
    sources = known | {DERIVED[n][0] for n in known if n in DERIVED}
    for n in sorted((names or set()) - sources):
        print(f"update_readme: no <!-- bench:{n} --> block in {a.docs.name} or {a.readme.name}", file=sys.stderr)
        rc = 2
    if a.check and stale:
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
