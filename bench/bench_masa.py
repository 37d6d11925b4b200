"""MASA benchmark: fit time, peak RSS, ratio and weight-space error against the same-bytes svd
baseline, on the Llama-7B-shaped LoRA (32 layers, r=16, q/k/v/o/gate/up/down, fp16; see
bench/llama7b_adapter.py).

Every configuration runs in its own Python process (``--case NAME``) so its peak RSS
(``ru_maxrss``) is its own. ``fit_s`` is ``MasaForm.fit`` alone (the closed-form fit);
``compress_s`` is the whole ``adaptzip.compress`` (fit, evaluation, same-bytes svd baseline,
container write); peak RSS is that of the compress.

    python bench/bench_masa.py                 # full size (32 layers)
    python bench/bench_masa.py --layers 4      # quick run

Prints a table; writes bench/out/masa.json and bench/out/masa.md. Target (2 CPU cores): ≤ 60 s per fit.
The synthetic layers share no subspace (like real adapters, see DESIGN.md), so MASA is expected to
lose to same-bytes SVD in weight space; the table says by how much.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common
from common import peak_rss_mb as _peak_rss_mb

TARGET_FIT_S = 60.0

# name -> (label, options, budget)
CASES: dict[str, tuple[str, dict, str | None]] = {
    "default": ("rank 8, group 2, experts 1 (defaults)", {}, None),
    "paper": ("rank 8, group 2, experts 5 (paper layout)", {"experts": 5}, None),
    "r16": ("rank 16, group 2, experts 1", {"rank": 16}, None),
    "g4r16": ("rank 16, group 4, experts 1", {"rank": 16, "group": 4}, None),
    "budget": ("--budget 0.25, group 2, experts 1", {"group": 2}, "0.25"),
}


# ----------------------------------------------------------------------------- child side
def run_case(case: str, work: Path, layers: int, threads: int) -> dict:
    """Run one case in this process (called in a child)."""
    import torch

    torch.set_num_threads(threads)
    import adaptzip
    from adaptzip import api
    from adaptzip.forms import FitContext, get_form, make_config
    from adaptzip.options import FitOptions, RunOptions

    src = work / "adapter"
    if case == "build":
        return common.build_adapter(work, layers)
    _, options, budget = CASES[case]
    rss_before = _peak_rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    res = api.compress(
        src,
        work / f"masa_{case}.safetensors",
        to="masa",
        budget=budget,
        options=options,
        fitting=FitOptions(seed=0),
        run=RunOptions(force=True),
    ).to_json()
    compress_s, compress_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    peak = _peak_rss_mb()
    # the fit alone, with the configuration compress settled on
    ad = adaptzip.load_adapter(src)
    cls = get_form("masa")
    cfg = make_config(cls, res["config"])
    t1, c1 = time.perf_counter(), time.process_time()
    cls.fit(ad, cfg, FitContext(seed=0))
    fit_s, fit_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    keep = (
        "bytes",
        "source_bytes",
        "ratio",
        "stored_params",
        "rel_error",
        "worst_module_rel_error",
        "worst_module",
        "svd_baseline_rel_error",
        "svd_baseline_bytes",
        "groups",
        "experts",
        "expert_params",
        "b_params",
        "redundant_expert_params",
        "redundant_expert_share",
        "budget_choice",
        "config",
    )
    out = {k: res[k] for k in keep if k in res}
    out.update(
        fit_s=fit_s,
        fit_cpu_s=fit_cpu_s,
        compress_s=compress_s,
        compress_cpu_s=compress_cpu_s,
        peak_rss_mb=peak,
        rss_before_mb=rss_before,
        loadavg_1min=os.getloadavg()[0],
    )
    return out


# ----------------------------------------------------------------------------- parent side
def child(case: str, work: Path, layers: int, threads: int, timeout: float) -> dict:
    """Run one case in a child process; return its JSON result plus ``process_s``."""
    return common.run_child(
        __file__, ["--case", case, "--work", work, "--layers", layers, "--threads", threads], timeout, name=case
    )


COLUMNS = (
    "case",
    "rank",
    "S",
    "N",
    "fit s",
    "fit CPU s",
    "compress s",
    "peak RSS MB",
    "MB",
    "ratio",
    "rel. error",
    "svd same bytes",
    "error / svd",
    "redundant experts",
)


def rows(result: dict) -> list[list[str]]:
    out = []
    for case, r in result["cases"].items():
        c = r["config"]
        base = r.get("svd_baseline_rel_error")
        out.append(
            [
                CASES[case][0],
                str(c["rank"]),
                str(c["group"]),
                str(c["experts"]),
                f"{r['fit_s']:.2f}",
                f"{r['fit_cpu_s']:.2f}",
                f"{r['compress_s']:.2f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['bytes'] / 1e6:.2f}",
                f"{r['ratio']:.4f}",
                f"{r['rel_error']:.4f}",
                "" if base is None else f"{base:.4f}",
                "" if not base else f"{r['rel_error'] / base:.2f}×",
                f"{100 * r['redundant_expert_share']:.1f}% of payload",
            ]
        )
    return out


def markdown(result: dict) -> str:
    intro = (
        f"MASA on the Llama-7B-shaped LoRA: {result['layers']} layers, r=16, fp16, {result['modules']} modules, "
        f"{result['source_bytes'] / 1e6:.1f} MB; {result['threads']} torch thread(s) on {result['cpu']} ({result['cpus']} CPUs, "
        f"1-min load average {result['loadavg_start']:.1f} at the start, {result['loadavg_end']:.1f} at the end), "
        f"torch {result['torch']}. `fit s`: wall time of `MasaForm.fit`; `fit CPU s`: its process CPU time (robust to a "
        f"busy machine); `compress s`: the whole `adaptzip.compress` incl. evaluation and the svd baseline. Weight-space errors (no calibration); `svd same bytes` is the per-module SVD with global "
        f"rank allocation whose container has the same size. `redundant experts`: the share of the stored floats that "
        f"N > 1 adds without changing ΔŴ."
    )
    notes = []
    b = result["cases"].get("budget", {}).get("budget_choice")
    if b:
        notes.append(
            f"`--budget 0.25` chose rank {b['rank']} (payload {b['payload_bytes'] / 1e6:.2f} MB of "
            f"{b['budget_payload_bytes'] / 1e6:.2f} MB; rank {b['rank'] + 1} would need "
            f"{(b['next_rank_payload_bytes'] or 0) / 1e6:.2f} MB)."
        )
    return common.markdown_doc(intro, COLUMNS, rows(result), result["targets"], notes)


def table(result: dict) -> str:
    """The printed table."""
    return common.table(COLUMNS, rows(result))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="adaptzip MASA benchmark (Llama-7B-shaped LoRA)")
    common.add_common_args(ap, "masa", CASES)
    ap.add_argument(
        "--threads",
        type=int,
        default=max(1, min(2, os.cpu_count() or 1)),
        help="torch threads per case (default 2; use 1 on a machine shared with other jobs: OpenMP threads that "
        "must wait for a busy core slow down many-fold)",
    )
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.case:  # child mode
        print(json.dumps(run_case(a.case, a.work, a.layers, a.threads)))
        return 0

    cases = common.parse_cases(ap, a.cases, CASES)
    results: dict[str, dict] = {}
    with common.scratch(a.work, "adaptzip-bench-masa-", a.keep) as work:
        load_start = common.loadavg()
        source_bytes = common.ensure_adapter(work, lambda: child("build", work, a.layers, a.threads, a.timeout))
        for case in cases:
            print(f"… masa {CASES[case][0]}", file=sys.stderr, flush=True)
            results[case] = child(case, work, a.layers, a.threads, a.timeout)

    targets = [
        {"name": f"masa fit ({CASES[c][0]}) s", "measured": r["fit_s"], "limit": TARGET_FIT_S}
        for c, r in results.items()
    ]
    common.check_targets(targets)
    result = {
        "benchmark": "masa",
        "layers": a.layers,
        "rank": 16,
        "modules": common.module_count(a.layers),
        "source_bytes": source_bytes,
        "threads": a.threads,
        "cpus": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": common.loadavg(),
        **common.machine_info(),
        "cases": results,
        "targets": targets,
    }
    common.write_outputs(a.out, "masa", result, markdown(result))
    print(table(result))
    return 0 if all(t["ok"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
