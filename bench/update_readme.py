"""Copy benchmark tables into README.md, so that the README's numbers come from code.

Every bench script writes ``bench/out/NAME.md``; this replaces the text between the markers

    <!-- bench:NAME -->
    ...
    <!-- /bench:NAME -->

in README.md with that file's contents (markers kept). A block whose ``NAME.md`` does not exist is
left as it is (and reported). ``--check`` changes nothing and exits 1 when the README is stale.

    python bench/update_readme.py                 # every block that has a table
    python bench/update_readme.py foundation masa # only these
    python bench/update_readme.py --check
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BLOCK = re.compile(r"(?P<open><!--\s*bench:(?P<name>[A-Za-z0-9_.-]+)\s*-->)(?P<body>.*?)(?P<close><!--\s*/bench:(?P=name)\s*-->)", re.S)
OPEN = re.compile(r"<!--\s*bench:([A-Za-z0-9_.-]+)\s*-->")
CLOSE = re.compile(r"<!--\s*/bench:([A-Za-z0-9_.-]+)\s*-->")


def check_markers(text: str) -> None:
    """Every opening marker has exactly one closing marker after it, blocks do not nest."""
    opens = [m.group(1) for m in OPEN.finditer(text)]
    closes = [m.group(1) for m in CLOSE.finditer(text)]
    for name in set(opens) | set(closes):
        if opens.count(name) != 1 or closes.count(name) != 1:
            raise ValueError(f"README marker bench:{name}: {opens.count(name)} opening and {closes.count(name)} closing markers (need one each)")
    found = [m.group("name") for m in BLOCK.finditer(text)]
    if sorted(found) != sorted(opens):
        missing = sorted(set(opens) - set(found))
        raise ValueError(f"README marker bench:{missing[0] if missing else '?'}: closing marker before its opening one, or blocks nested")


def update(text: str, tables: Path, names: set[str] | None = None) -> tuple[str, list[str], list[str]]:
    """(new text, names replaced, names without a table)."""
    check_markers(text)
    replaced, missing = [], []

    def sub(m: re.Match) -> str:
        name = m.group("name")
        if names is not None and name not in names:
            return m.group(0)
        f = tables / f"{name}.md"
        if not f.is_file():
            missing.append(name)
            return m.group(0)
        body = f.read_text(encoding="utf-8").strip("\n")
        replaced.append(name)
        return f"{m.group('open')}\n{body}\n{m.group('close')}"

    return BLOCK.sub(sub, text), replaced, missing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Copy bench/out/NAME.md tables into README.md between <!-- bench:NAME --> markers.")
    ap.add_argument("names", nargs="*", help="only these blocks (default: all)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--tables", type=Path, default=HERE / "out", help="where the NAME.md files are")
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if the README differs from the tables")
    a = ap.parse_args(argv)

    text = a.readme.read_text(encoding="utf-8")
    try:
        new, replaced, missing = update(text, a.tables, set(a.names) or None)
    except ValueError as e:
        print(f"update_readme: error: {a.readme}: {e}", file=sys.stderr)
        return 2
    unknown = sorted(set(a.names) - set(m.group("name") for m in BLOCK.finditer(text)))
    for n in unknown:
        print(f"update_readme: README has no <!-- bench:{n} --> block", file=sys.stderr)
    for n in missing:
        print(f"update_readme: no {a.tables / (n + '.md')}: block bench:{n} left as it is", file=sys.stderr)
    if a.check:
        stale = new != text
        print(f"README {'is stale' if stale else 'is up to date'} ({', '.join(replaced) or 'no tables'})", file=sys.stderr)
        return 1 if stale else 0
    if new != text:
        fd, tmp = tempfile.mkstemp(prefix=".README.", dir=a.readme.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(new)
        os.chmod(tmp, a.readme.stat().st_mode & 0o777)
        os.replace(tmp, a.readme)
    print(f"updated {a.readme.name}: {', '.join(replaced) or 'nothing'}"
          + ("" if new != text else " (no change)"), file=sys.stderr)
    return 2 if unknown else 0


if __name__ == "__main__":
    sys.exit(main())
