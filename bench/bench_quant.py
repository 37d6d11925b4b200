"""Quantised storage benchmark: weight-space error against container bytes for ``svd`` stored in
fp16, int8, int4 and ``--quant auto``, on the Llama-7B-shaped LoRA (bench/llama7b_adapter.py:
32 layers, r=16, q/k/v/o/gate/up/down, fp16) and on any PEFT LoRA given with ``--adapter``
(e.g. the real SmolLM2 LoRA of examples/real_smollm2.py); plus quantise/dequantise throughput.

Every point is a real ``adaptzip.compress`` (``--to svd --budget B --dtype fp16 --quant Q``): its
bytes are the written file's size, its error is measured on the stored (dequantised) form.

    python bench/bench_quant.py                      # full size (32 layers; ~10-20 min on 2 cores)
    python bench/bench_quant.py --layers 4           # quick run
    python bench/bench_quant.py --adapter "SmolLM2-135M real LoRA=$HOME/.cache/adaptzip-examples/smollm2/lora"

Writes bench/out/quant.json, bench/out/quant.png and bench/out/quant.md (the README's table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from adaptzip import api, load_adapter  # noqa: E402
from adaptzip import quant as qz  # noqa: E402
from adaptzip.budget import FitRequest, fit_to_budget, parse_budget  # noqa: E402
from adaptzip.forms import FitContext, get_form  # noqa: E402
from adaptzip.options import FitOptions, QuantOptions, RunOptions  # noqa: E402
from bench.llama7b_adapter import build_llama7b_adapter  # noqa: E402

SCHEMES = ("none", "int8", "int4", "auto")
BUDGETS = (0.01, 0.02, 0.04, 0.08, 0.15, 0.25)


def curve(adapter_dir: Path, work: Path, budgets, schemes, group_size: int) -> list[dict]:
    rows = []
    for b in budgets:
        for q in schemes:
            t0 = time.perf_counter()
            out = work / f"{q}_{b}.safetensors"
            try:
                r = api.compress(
                    adapter_dir,
                    out,
                    to="svd",
                    budget=b,
                    fitting=FitOptions(dtype="fp16", baseline=False),
                    quant=QuantOptions(q, group_size),
                    run=RunOptions(force=True),
                )
            except Exception as e:  # a budget below a scheme's floor: record it, go on
                rows.append({"budget": b, "quant": q, "error": f"{type(e).__name__}: {e}"})
                print(f"  budget {b:<5} {q:<5} skipped: {e}", flush=True)
                continue
            secs = time.perf_counter() - t0
            row = {
                "budget": b,
                "quant": q,
                "bytes": r.bytes,
                "ratio": r.ratio,
                "rel_error": r.rel_error,
                "ranks_total": r.state["ranks"]["total"],
                "seconds": secs,
            }
            if q == "auto":
                bits = r.quant["bits"]
                row.update(
                    chosen=r.quant["auto"]["chosen"],
                    considered=r.quant["auto"]["considered"],
                    mean_bits=bits["mean_bits"],
                    bits_hist=bits["bits"],
                    by_position=[(p["position"], p["kept"], round(p["mean_bits"], 2)) for p in bits["by_position"]],
                    by_type={k: (v["kept"], round(v["mean_bits"], 2)) for k, v in bits["by_type"].items()},
                )
            rows.append(row)
            out.unlink(missing_ok=True)
            print(
                f"  budget {b:<5} {q:<5} {r.bytes:>10} B  rel.err {r.rel_error:.4f}  rank {row['ranks_total']:>5}"
                f"{'  ' + row.get('chosen', '') if q == 'auto' else ''}  ({secs:.1f}s)",
                flush=True,
            )
    return rows


def throughput(adapter_dir: Path, group_size: int) -> list[dict]:
    """Quantise (+pack) and unpack (+dequantise) every balanced svd factor of the adapter at full rank."""
    ad = load_adapter(adapter_dir)
    sv = get_form("svd")
    form = sv.fit(ad, sv.Config(), FitContext())
    tensors = {n: t.detach().float().contiguous() for n, t in form.tensors().items()}
    n_values = sum(t.numel() for t in tensors.values())
    res = []
    for bits in (8, 4, 3, 2):
        plan = {n: qz.TensorQuant(bits, qz.group_axis(t.shape), group_size) for n, t in tensors.items()}
        qz._ENCODED.clear()
        t0 = time.perf_counter()
        parts = {}
        for n, t in tensors.items():
            parts.update(qz.encode(n, t, plan[n], torch.float16))
        t_enc = time.perf_counter() - t0
        qz._ENCODED.clear()
        t0 = time.perf_counter()
        for n, t in tensors.items():
            qz.decode(n, parts, plan[n], tuple(t.shape), torch.float16)
        t_dec = time.perf_counter() - t0
        stored = sum(p.numel() * p.element_size() for p in parts.values())
        res.append(
            {
                "bits": bits,
                "values": n_values,
                "stored_bytes": stored,
                "bits_per_value": 8 * stored / n_values,
                "quantise_s": t_enc,
                "dequantise_s": t_dec,
                "quantise_Mvalues_per_s": n_values / t_enc / 1e6,
                "dequantise_Mvalues_per_s": n_values / t_dec / 1e6,
            }
        )
        print(
            f"  {bits}-bit: {n_values / 1e6:.1f} M values, {8 * stored / n_values:.3f} bits/value stored, "
            f"quantise {n_values / t_enc / 1e6:.1f} M/s, dequantise {n_values / t_dec / 1e6:.1f} M/s",
            flush=True,
        )
    return res


def distil_experiment(
    work: Path,
    *,
    budget: float = 0.1,
    steps: int = 150,
    scheme: str = "int4",
    hidden: int = 256,
    inter: int = 512,
    layers: int = 4,
    rank: int = 16,
) -> dict:
    """Distillation with quantised forms, on a small text model built like the calibration tests'
    (a Llama with a BPE tokenizer trained on a toy grammar; here hidden 256, 4 layers, so that the
    payload, not the header, dominates the container) and an r=16 LoRA trained on that text: svd at
    ``budget`` of the source bytes,
    KL to the teacher on held-out text, every form measured as stored (dequantised):

    * fp16 svd: fitted / distilled ``steps`` — the reference at the same bytes;
    * ``scheme`` svd (more rank in the same bytes): fitted (weight-space fit, then quantised);
    * PTQ: distilled in float, then quantised;
    * QAT: distilled ``steps`` through the straight-through fake quantiser
      (:func:`adaptzip.quant.attach_fake_quant`), then stored."""
    import copy

    sys.path.insert(0, str(ROOT / "tests"))
    from calib_fixtures import base_with_tokenizer, make_text, train_text_lora
    from fixtures import make_base

    from adaptzip import container as ct
    from adaptzip import distill

    torch.set_num_threads(1)
    text = make_text(1200, seed=0)
    (work / "calib.txt").write_text(text)
    (work / "eval.txt").write_text(make_text(200, seed=1))
    base = base_with_tokenizer(
        make_base(work / "base0", hidden=hidden, inter=inter, layers=layers), work / "base", text
    )
    lora = train_text_lora(base, work / "lora", text, steps=40, r=rank, lr=3e-3)
    ad = load_adapter(lora)
    cal = distill.prepare(
        ad,
        base,
        work / "calib.txt",
        calib_tokens=6000,
        eval_text=work / "eval.txt",
        seq_len=32,
        batch_size=8,
        device="cpu",
    )
    ctx = FitContext(stats=cal.stats, seed=0)
    dt = torch.float16
    budget_bytes = parse_budget(budget, ad.bytes)
    svd = get_form("svd")
    rows: list[dict] = []

    def record(label: str, form, storage, seconds: float, **kw) -> None:
        t, m = ct.build(form, ad, dt, storage=storage)
        size = ct.serialized_size(t, m)
        stored = ct.decoded_form(form, t, m)
        ev = cal.evaluate(stored)
        rows.append(
            {
                "case": label,
                "bytes": size,
                "kl": ev["kl"],
                "top1": ev["top1"],
                "improvement_kept": cal.improvement_kept(ev),
                "seconds": seconds,
                **kw,
            }
        )
        print(f"  {label:<34} {size:>7} B  KL {ev['kl']:.5f}  top-1 {ev['top1']:.4f}  ({seconds:.1f}s)", flush=True)

    req = FitRequest(ad, svd, svd.Config(), budget_bytes, dt, ctx)
    f16 = fit_to_budget(req).form
    fq, _, man, _ = fit_to_budget(req, quant=scheme)
    storage = qz.Storage.from_json(man["storage"])
    lr = None  # probed, as compress does
    record("fp16 svd, fitted", f16, None, 0.0, rank=sum(f16.state_info["ranks"]))
    g = copy.deepcopy(f16)
    t0 = time.perf_counter()
    cal.distil(g, steps=steps, lr=lr)
    record(f"fp16 svd, distilled {steps}", g, None, time.perf_counter() - t0)
    record(f"{scheme} svd, fitted", fq, storage, 0.0, rank=sum(fq.state_info["ranks"]))
    ptq = copy.deepcopy(fq)
    t0 = time.perf_counter()
    cal.distil(ptq, steps=steps, lr=lr)
    record(f"{scheme} PTQ (distil, then quantise)", ptq, storage, time.perf_counter() - t0)
    qat = copy.deepcopy(fq)
    t0 = time.perf_counter()
    h = qz.attach_fake_quant(qat, storage, dt)
    cal.distil(qat, steps=steps, lr=lr)
    h.remove()
    record(f"{scheme} QAT (straight-through) {steps}", qat, storage, time.perf_counter() - t0)
    return {
        "budget": budget,
        "budget_bytes": budget_bytes,
        "source_bytes": ad.bytes,
        "scheme": scheme,
        "steps": steps,
        "rows": rows,
    }


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4.6), squeeze=False)
    style = {"none": ("fp16", "o-"), "int8": ("int8", "s-"), "int4": ("int4", "^-"), "auto": ("auto", "D-")}
    for ax, name in zip(axes[0], names):
        rows = [r for r in results[name]["curve"] if "bytes" in r]
        for q in SCHEMES:
            pts = sorted((r["bytes"] / 1e6, r["rel_error"]) for r in rows if r["quant"] == q)
            if pts:
                lab, st = style[q]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], st, label=f"svd {lab}", markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("container bytes (MB, real file size)")
        ax.set_ylabel("relative weight-space error")
        ax.set_title(f"{name}\n(source {results[name]['source_bytes'] / 1e6:.1f} MB)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(results: dict, tp: list[dict], meta: dict) -> str:
    lines = []
    for name, res in results.items():
        lines.append(
            f"**{name}** (source {res['source_bytes'] / 1e6:.2f} MB; svd, `--dtype fp16`, group size "
            f"{meta['group_size']}): relative weight-space error (lower is better) at each budget"
        )
        lines.append("")
        lines.append(
            "| budget | "
            + " | ".join(f"{q if q != 'none' else 'fp16'}" for q in SCHEMES)
            + " | auto chose | auto mean bits |"
        )
        lines.append("|---|" + "---|" * (len(SCHEMES) + 2))
        for b in sorted({r["budget"] for r in res["curve"]}):
            cells = []
            auto = None
            for q in SCHEMES:
                r = next((x for x in res["curve"] if x["budget"] == b and x["quant"] == q), None)
                if r is None or "bytes" not in r:
                    cells.append("–")
                    continue
                cells.append(f"{r['rel_error']:.4f} (r={r['ranks_total']})")
                if q == "auto":
                    auto = r
            chose = auto["chosen"] if auto else "–"
            mean_bits = f"{auto['mean_bits']:.2f}" if auto else "–"
            lines.append(f"| {b:g} | " + " | ".join(cells) + f" | {chose} | {mean_bits} |")
        lines.append("")
        autos = [r for r in res["curve"] if r["quant"] == "auto" and "by_position" in r]
        if autos:
            a = autos[len(autos) // 2]
            lines.append(
                f"auto at budget {a['budget']:g}: mean bits per rank position (kept modules) "
                + ", ".join(f"{p}: {mb:g} ({k})" for p, k, mb in a["by_position"])
            )
            lines.append("")
    lines.append(
        f"Throughput (all balanced svd factors of the Llama-7B-shaped adapter at rank 16, "
        f"{tp[0]['values'] / 1e6:.1f} M values; one CPU thread):"
    )
    lines.append("")
    lines.append("| bits | stored bits/value | quantise+pack (M values/s) | unpack+dequantise (M values/s) |")
    lines.append("|---|---|---|---|")
    for t in tp:
        lines.append(
            f"| {t['bits']} | {t['bits_per_value']:.3f} | {t['quantise_Mvalues_per_s']:.1f} | {t['dequantise_Mvalues_per_s']:.1f} |"
        )
    lines.append("")
    lines.append(f"_{meta['machine']}; {meta['date']}; `python bench/bench_quant.py --layers {meta['layers']}`._")
    return "\n".join(lines) + "\n"


def distil_markdown(res: list[dict]) -> str:
    lines = [
        "Distillation with quantised svd (small text model: Llama, hidden 256, 4 layers, r=16 LoRA; KL to the "
        "teacher per token on held-out text, every form measured as stored; seconds of distillation):",
        "",
        "| budget | case | bytes | KL | top-1 | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in res:
        for row in r["rows"]:
            lines.append(
                f"| {r['budget']:g} | {row['case']} | {row['bytes']} | {row['kl']:.5f} | {row['top1']:.4f} | "
                f"{row['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument(
        "--adapter", action="append", default=[], help="another PEFT LoRA to measure: DIR or LABEL=DIR (repeatable)"
    )
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    ap.add_argument(
        "--distil",
        action="store_true",
        help="run only the distillation experiment (PTQ, QAT) → bench/out/quant_distil.{json,md}",
    )
    ap.add_argument("--distil-budgets", default="0.04,0.1")
    ap.add_argument("--distil-steps", type=int, default=150)
    a = ap.parse_args()
    if a.distil:
        OUT.mkdir(parents=True, exist_ok=True)
        res = []
        for b in [float(x) for x in a.distil_budgets.split(",") if x]:
            work = Path(tempfile.mkdtemp(prefix="adaptzip-bench-qdistil-"))
            try:
                print(f"== distillation, budget {b:g}", flush=True)
                res.append(distil_experiment(work, budget=b, steps=a.distil_steps))
            finally:
                shutil.rmtree(work, ignore_errors=True)
        (OUT / "quant_distil.json").write_text(json.dumps(res, indent=1) + "\n")
        md = distil_markdown(res)
        (OUT / "quant_distil.md").write_text(md)
        print(md)
        return
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    budgets = [float(x) for x in a.budgets.split(",") if x]
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="adaptzip-bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    try:
        src = work / f"llama7b_L{a.layers}_r{a.rank}"
        if not (src / "adapter_model.safetensors").is_file():
            print(f"building the Llama-7B-shaped adapter ({a.layers} layers, r={a.rank}) in {src}", flush=True)
            build_llama7b_adapter(src, layers=a.layers, rank=a.rank, seed=0)
        adapters = {f"Llama-7B-shaped, {a.layers} layers, r={a.rank}": src}
        for spec in a.adapter:
            label, _, d = spec.rpartition("=")
            adapters[label or f"{Path(d).name} ({load_adapter(d).base_model})"] = Path(d)
        results = {}
        for name, d in adapters.items():
            print(f"== {name}", flush=True)
            results[name] = {
                "adapter": str(d),
                "source_bytes": load_adapter(d).bytes,
                "curve": curve(d, work, budgets, SCHEMES, a.group_size),
            }
        print("== throughput", flush=True)
        tp = throughput(src, a.group_size)
        meta = {
            "layers": a.layers,
            "rank": a.rank,
            "group_size": a.group_size,
            "budgets": budgets,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
            "date": time.strftime("%Y-%m-%d"),
        }
        (OUT / "quant.json").write_text(
            json.dumps({"meta": meta, "results": results, "throughput": tp}, indent=1) + "\n"
        )
        plot(results, OUT / "quant.png")
        md = markdown(results, tp, meta)
        if (OUT / "quant_distil.md").is_file():
            md += "\n" + (OUT / "quant_distil.md").read_text()
        (OUT / "quant.md").write_text(md)
        print(md)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
