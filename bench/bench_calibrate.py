"""Calibration throughput: Σ statistics collection (teacher forward + hooks, tokens/s),
distillation (student forward + backward, tokens/s) and peak RSS, on the tiny test Llama built
here, and on SmolLM2-135M when ``examples/real_smollm2.py`` has run (its measured timings are
read from examples/out/real_smollm2.json, not re-measured).

    python bench/bench_calibrate.py [--tokens 16384] [--steps 30] [--threads 1]

Writes bench/out/calibrate.json and bench/out/calibrate.md (README block ``bench:calibrate``).
Each case runs in its own process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def tiny_case(tokens: int, steps: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from calib_fixtures import base_with_tokenizer, make_text, train_text_lora
    from fixtures import make_base

    from adaptzip import distill, load_adapter
    from adaptzip.forms import FitContext, get_form

    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        text = make_text(max(400, tokens // 8), seed=0)
        (d / "calib.txt").write_text(text)
        base = base_with_tokenizer(make_base(d / "b0"), d / "base", text)
        lora = train_text_lora(base, d / "lora", text, steps=20)
        ad = load_adapter(lora)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        cal = distill.prepare(ad, base, d / "calib.txt", calib_tokens=tokens, seq_len=64, batch_size=8)
        svd = get_form("svd").fit(ad, get_form("svd").Config(rank=2), FitContext(stats=cal.stats))
        info = cal.distil(svd, steps=steps, lr=1e-3, eval_every=10**9)  # no held-out checks: pure step cost
        return {
            "case": "tiny llama (3 layers, d=64, 21 modules)",
            "threads": threads,
            "calib_tokens": tokens,
            "stats_tokens_per_s": cal.timings["stats_tokens_per_s"],
            "distill_tokens_per_s": info["distill_tokens_per_s"],
            "distill_step_ms": 1000 * info["distill_seconds"] / max(info["distill_steps"], 1),
            "batch_tokens": 8 * 64,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_calibration_mb": rss0 / 1024,
        }


def smollm2_case() -> dict | None:
    p = ROOT / "examples" / "out" / "real_smollm2.json"
    if not p.is_file():
        return None
    r = json.loads(p.read_text())
    dist = [x for x in r["rows"] if x.get("distilled") and x.get("distill_tokens_per_s")]
    cfg = r["config"]
    return {
        "case": f"SmolLM2-135M (30 layers, 210 modules; from examples/real_smollm2.py{' --quick' if r['quick'] else ''})",
        "threads": None,
        "calib_tokens": r["reference"]["calib_tokens"],
        "stats_tokens_per_s": r["timings"]["stats_tokens_per_s"],
        "distill_tokens_per_s": sum(x["distill_tokens_per_s"] for x in dist) / len(dist) if dist else None,
        "distill_step_ms": None,
        "batch_tokens": cfg["batch"] * cfg["seq"],
        "peak_rss_mb": r.get("peak_rss_mb"),
        "rss_before_calibration_mb": None,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case == "tiny":
        print(json.dumps(tiny_case(args.tokens, args.steps, args.threads)))
        return
    t0 = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--case",
            "tiny",
            "--tokens",
            str(args.tokens),
            "--steps",
            str(args.steps),
            "--threads",
            str(args.threads),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    cases = [json.loads(out.stdout.strip().splitlines()[-1])]
    s = smollm2_case()
    if s:
        cases.append(s)
    res = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cpu",
        "seconds": time.perf_counter() - t0,
        "cases": cases,
    }
    (HERE / "out").mkdir(exist_ok=True)
    (HERE / "out" / "calibrate.json").write_text(json.dumps(res, indent=1))

    def f(v, fmt="{:,.0f}"):
        return "–" if v is None else fmt.format(v)

    md = [
        f"Calibration throughput on {res['machine']} (shared, loaded machine: compare ratios, not absolutes).",
        "",
        "| case | threads | batch tokens | Σ + teacher pass tokens/s | distillation tokens/s | step ms | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        md.append(
            f"| {c['case']} | {f(c['threads'], '{}')} | {c['batch_tokens']} | {f(c['stats_tokens_per_s'])} | "
            f"{f(c['distill_tokens_per_s'])} | {f(c['distill_step_ms'], '{:.1f}')} | {f(c['peak_rss_mb'])} |"
        )
    (HERE / "out" / "calibrate.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
