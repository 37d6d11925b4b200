"""Zoo benchmark: batch throughput with 1 and 2 worker processes, and zoo bytes and error with and
without ``--shared-basis``.

The zoo: N tiny PEFT LoRAs (3-layer Llama, hidden 64, r=8, all linear modules, fp32, trained 8
Adam steps at lr 5e-3 on synthetic text): half from ONE LoRA init seed on different data
(``zoo/same/``, the pipeline case zoo sharing is for), half each from its own seed
(``zoo/diff/``, where sharing must be refused). Every run is the real CLI in its own process:

    python bench/bench_zoo.py            # N = 100
    python bench/bench_zoo.py --n 20     # quick run

Prints a table; writes bench/out/zoo.json and bench/out/zoo.md. Errors are weight-space relative
errors, energy-weighted over the adapters: sqrt(Σ_a e_a²‖ΔW_a‖² / Σ_a ‖ΔW_a‖²).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE.parent / "tests"))


def build_zoo(work: Path, n: int) -> Path:
    """N adapters: n//2 with init seed 0 (different data), the rest with their own init seeds."""
    import torch

    torch.set_num_threads(1)
    from fixtures import make_base, train_lora

    base = make_base(work / "base")
    zoo = work / "zoo"
    for k in range(n):
        same = k < n // 2
        train_lora(
            base,
            zoo / ("same" if same else "diff") / f"ad{k:03d}",
            init_seed=0 if same else 1000 + k,
            data_seed=k,
            lr=5e-3,
        )
    return zoo


def run_batch(zoo: Path, out: Path, jobs: int, shared: bool, budget: str) -> tuple[dict, float, float]:
    """One CLI run; returns its summary, wall seconds and the CPU seconds of the CLI process (its pool
    workers are forkserver children, not counted there: the rows' ``cpu_seconds`` count them)."""
    cmd = [
        sys.executable,
        "-m",
        "adaptzip.cli",
        "batch",
        str(zoo),
        "-o",
        str(out),
        "--budget",
        budget,
        "--jobs",
        str(jobs),
        "--json",
    ] + (["--shared-basis"] if shared else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"batch failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout), wall, cpu


def zoo_error(summary: dict, norms: dict[str, float], prefix: str = "") -> float:
    num = den = 0.0
    for r in summary["adapters"]:
        if r["adapter"].startswith(prefix) and r["rel_error"] is not None:
            n2 = norms[r["adapter"]]
            num += r["rel_error"] ** 2 * n2
            den += n2
    return math.sqrt(num / den) if den else float("nan")


def sub_bytes(summary: dict, out: Path, prefix: str) -> int:
    """Bytes of the containers below ``prefix`` plus the shared files they reference (once each)."""
    rows = [r for r in summary["adapters"] if r["adapter"].startswith(prefix) and r["bytes"] is not None]
    shared = {r["shared_file"] for r in rows if r.get("shared_file")}
    return sum(r["bytes"] for r in rows) + sum((out / f).stat().st_size for f in shared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="adapters in the zoo")
    ap.add_argument("--budget", default="0.25", help="per-adapter budget (as adaptzip batch --budget)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="adaptzip-bench-zoo-"))
    try:
        t0 = time.perf_counter()
        zoo = build_zoo(work, args.n)
        build_s = time.perf_counter() - t0
        import torch

        from adaptzip import fit
        from adaptzip.adapter import load_adapter
        from adaptzip.forms import FitContext

        torch.set_num_threads(1)
        norms = {}
        for d in sorted(zoo.glob("*/*")):
            ad = load_adapter(d)
            norms[d.relative_to(zoo).as_posix()] = sum(t.norm2 for t in fit.targets(ad, FitContext()))
        load = os.getloadavg()[0]
        runs = {}
        for name, jobs, shared in (("jobs1", 1, False), ("jobs2", 2, False), ("jobs2_shared", 2, True)):
            out = work / f"out_{name}"
            s, wall, cpu = run_batch(zoo, out, jobs, shared, args.budget)
            conv_cpu = sum(r.get("cpu_seconds") or 0.0 for r in s["adapters"])
            runs[name] = {
                "jobs": jobs,
                "shared_basis": shared,
                "wall_s": wall,
                "cli_cpu_s": cpu,
                "conversion_cpu_s": conv_cpu,
                "batch_s": s["seconds"],
                "adapters_per_s": args.n / wall,
                "counts": s["counts"],
                "zoo_bytes": s["totals"]["zoo_bytes"],
                "source_bytes": s["totals"]["source_bytes"],
                "rel_error": zoo_error(s, norms),
                "same_bytes": sub_bytes(s, out, "same/"),
                "diff_bytes": sub_bytes(s, out, "diff/"),
                "same_rel_error": zoo_error(s, norms, "same/"),
                "diff_rel_error": zoo_error(s, norms, "diff/"),
                "sharing": s.get("sharing"),
            }
        sep, sh = runs["jobs2"], runs["jobs2_shared"]
        result = {
            "adapters": args.n,
            "budget": args.budget,
            "build_s": build_s,
            "cpus": os.cpu_count(),
            "load_avg_1m": load,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "runs": runs,
            "throughput_ratio_jobs2_over_jobs1": runs["jobs2"]["adapters_per_s"] / runs["jobs1"]["adapters_per_s"],
            "sharing": {
                "bytes_without": sep["zoo_bytes"],
                "bytes_with": sh["zoo_bytes"],
                "bytes_saved": sep["zoo_bytes"] - sh["zoo_bytes"],
                "error_without": sep["rel_error"],
                "error_with": sh["rel_error"],
                "groups": [
                    {
                        k: g[k]
                        for k in ("group", "adapters", "cluster", "overlap", "overlap_random", "decision", "reason")
                    }
                    | {"separate_bytes": g["separate"]["bytes"], "shared_bytes": (g["shared"] or {}).get("bytes")}
                    for g in (sh["sharing"] or {}).get("groups", [])
                ],
            },
        }
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "zoo.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        (
            f"Zoo of {args.n} tiny adapters (half one init seed, half own seeds), --budget {args.budget}, "
            f"{result['cpus']} CPUs, 1-min load average {load:.1f} at start; each run is the CLI in its own process."
        ),
        "",
        "| run | wall s | conversion CPU s | adapters/s | zoo bytes | ratio | rel. error | same-seed half: bytes / error | own-seed half: bytes / error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name.replace('_', ' + ')} | {r['wall_s']:.1f} | {r['conversion_cpu_s']:.1f} | {r['adapters_per_s']:.2f} | {r['zoo_bytes']} | "
            f"{r['zoo_bytes'] / r['source_bytes']:.4f} | {r['rel_error']:.4f} | {r['same_bytes']} / {r['same_rel_error']:.4f} | "
            f"{r['diff_bytes']} / {r['diff_rel_error']:.4f} |"
        )
    s = result["sharing"]
    lines += [
        "",
        f"Throughput ratio jobs 2 / jobs 1: **{result['throughput_ratio_jobs2_over_jobs1']:.2f}×**.",
        (
            f"--shared-basis: zoo bytes {s['bytes_without']} → {s['bytes_with']} ({s['bytes_saved']} saved, "
            f"{s['bytes_saved'] / s['bytes_without']:.1%}), error {s['error_without']:.4f} → {s['error_with']:.4f}."
        ),
        "",
        "| candidate group | adapters | cluster | A-overlap | random | separate bytes | shared bytes | decision |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for g in s["groups"]:
        lines.append(
            f"| {g['group']} | {g['adapters']} | {g['cluster']} | {g['overlap']:.3f} | {g['overlap_random']:.3f} | "
            f"{g['separate_bytes']} | {g['shared_bytes'] if g['shared_bytes'] is not None else '–'} | {g['decision']}: {g['reason']} |"
        )
    md = "\n".join(lines) + "\n"
    (OUT / "zoo.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
