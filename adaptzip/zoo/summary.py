"""The batch summary: ``batch.json`` (every row, totals, the sharing report) and ``batch.md``
(the same as tables), written once at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_file, json_clean
from .discovery import SUMMARY_JSON, SUMMARY_MD, canon
from .run import OK_STATUSES


def build_summary(
    rows: list[dict],
    interrupted: bool,
    zoo: Path,
    out: Path,
    opts: dict,
    digest: str,
    jobs: int,
    executor: str,
    sharing: dict | None,
    seconds: float,
    swept: int,
) -> dict:
    """The summary of a run (what :func:`adaptzip.zoo.batch` returns and ``batch.json`` holds)."""
    rows = sorted(rows, key=lambda r: r["adapter"])
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    ok = [r for r in rows if r["status"] in OK_STATUSES]
    shared_files = {r["shared_file"] for r in ok if r.get("shared_file")}
    shared_bytes = sum((out / f).stat().st_size for f in shared_files if (out / f).is_file())
    src = sum(r["source_bytes"] or 0 for r in ok)
    cb = sum(r["bytes"] or 0 for r in ok)
    return {
        "zoo": str(zoo),
        "output": str(out),
        "options": canon(opts),
        "options_sha256": digest,
        "jobs": jobs,
        "executor": executor,
        "seconds": seconds,
        "interrupted": interrupted,
        "stale_temporaries_removed": swept,
        "counts": counts,
        "failed": counts.get("failed", 0),
        "totals": {
            "adapters": len(ok),
            "source_bytes": src,
            "container_bytes": cb,
            "shared_bytes": shared_bytes,
            "zoo_bytes": cb + shared_bytes,
            "ratio": (cb + shared_bytes) / src if src else None,
        },
        "sharing": sharing,
        "adapters": rows,
    }


def _f(x: Any, spec: str = ".4g") -> str:
    return "–" if x is None else format(x, spec)


def _md_cell(s: Any) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def write_summary(out: Path, s: dict) -> None:
    """``batch.json`` and ``batch.md`` in OUT_DIR (atomically)."""
    with atomic_file(out / SUMMARY_JSON) as tmp:
        tmp.write_text(json.dumps(json_clean(s), indent=1, sort_keys=False, allow_nan=False) + "\n")
    t = s["totals"]
    lines = [
        f"# adaptzip batch: {_md_cell(s['zoo'])}",
        "",
        f"- form `{s['options']['to']}`, budget `{s['options'].get('budget')}`, options sha256 `{s['options_sha256'][:12]}`",
        f"- {', '.join(f'{k}: {v}' for k, v in sorted(s['counts'].items()))}"
        + ("  **(interrupted: rerun to finish)**" if s["interrupted"] else ""),
        f"- source bytes {t['source_bytes']}, zoo bytes {t['zoo_bytes']} (containers {t['container_bytes']} + shared {t['shared_bytes']}), ratio {_f(t['ratio'])}",
        f"- {s['jobs']} job(s), executor {s['executor']}, {s['seconds']:.1f} s",
        "",
    ]
    if s.get("sharing"):
        lines += [
            "## Zoo sharing (--shared-basis)",
            "",
            "| group | adapters | A-overlap | random | B-overlap | random | separate bytes | separate error | shared kind | shared bytes | shared error | decision |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for g in s["sharing"]["groups"]:
            sh = g["shared"] or {}
            lines.append(
                f"| {g['group']} | {g['adapters']} | {_f(g['overlap'], '.3f')} | {_f(g['overlap_random'], '.3f')} | "
                f"{_f(g['overlap_out'], '.3f')} | {_f(g['overlap_out_random'], '.3f')} | {g['separate']['bytes']} | "
                f"{_f(g['separate']['rel_error'])} | {sh.get('kind', '–')} | {_f(sh.get('bytes'), 'd') if sh else '–'} | {_f(sh.get('rel_error'))} | {g['decision']}: {_md_cell(g['reason'])} |"
            )
        lines.append("")
    lines += [
        "## Adapters",
        "",
        "| adapter | source bytes | container bytes | ratio | error | svd-baseline error | time (s) | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in s["adapters"]:
        status = r["status"] + (f": {_md_cell(r['error'])}" if r.get("error") else "")
        lines.append(
            f"| {_md_cell(r['adapter'])} | {_f(r.get('source_bytes'), 'd') if r.get('source_bytes') is not None else '–'} | "
            f"{_f(r.get('bytes'), 'd') if r.get('bytes') is not None else '–'} | {_f(r.get('ratio'))} | {_f(r.get('rel_error'))} | "
            f"{_f(r.get('svd_baseline_rel_error'))} | {r.get('seconds', 0):.2f} | {status} |"
        )
    with atomic_file(out / SUMMARY_MD) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
