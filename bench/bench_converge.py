"""Does distillation converge at its defaults? On SmolLM2-135M-Instruct with its real r=16 LoRA
(examples/real_smollm2.py's), one form per budget — svd at 25%, bslora-ke at 5%, vblora at 1% of
the LoRA's bytes — is distilled with the defaults (``Calibration.distil``: learning rate probed,
plateau schedule, convergence stop, a cap of ``--steps`` steps that grows to 3× while the run still
improves), then the same run goes on for twice as many steps as the defaults took (3× their run
in all) from the rate the probe chose (a warm-up, then the plateau schedule), with a fixed cap and
the convergence stop off (going on at the rate the defaults ended with would be a weaker comparator:
a converged run has lowered its rate twice). Goal: the defaults' eval KL within
10% of the best the 3× longer run finds.

    python bench/bench_converge.py [--cases 0.01:vblora,0.05:bslora-ke,0.25:svd] [--steps 300] [--threads 2]
    python bench/bench_converge.py --table-only   # re-render the markdown from the record

Keeps its rows in bench/results/converge.json (committed: rows measured in earlier sittings, on
other machines, stay in the table) and writes bench/out/converge.{json,md} (block ``converge``).
Each case appends to the record as it finishes, so a long run can be cut and resumed (finished
cases are kept unless ``--redo`` names them again: ``--redo`` measures the cases of ``--cases``
anew, dropping their rows and banked states at once, and keeps the other rows). A case is banked halfway too: when its
defaults' run ends, the form's state and what that run measured go to bench/out/converge_state/; a
run cut during the 3× run resumes from there (the same start is fitted again and the state loaded;
its eval KL is checked against the banked one), so the two phases — up to ~1 h each on 2 cores — can
run in different sittings.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import torch
from bench_calibrate import _fit, _smollm2
from common import HERE, OUT, check_targets, machine_info, markdown_doc, write_outputs

RECORD = HERE / "results" / "converge.json"  # committed: the rows of every sitting


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="0.01:vblora,0.05:bslora-ke,0.25:svd")
    ap.add_argument("--steps", type=int, default=300, help="the default step cap (--calib-steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--calib-tokens", type=int, default=24000, help="calibration tokens (the example's calibration text has ~25k)"
    )
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument(
        "--redo",
        action="store_true",
        help="measure the cases of --cases anew: their rows and banked states are dropped (other rows are kept)",
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--table-only", action="store_true", help="re-render converge.md from the record and stop")
    args = ap.parse_args()
    if args.table_only:
        _render(args.out, json.loads(RECORD.read_text()))
        return
    torch.set_num_threads(args.threads)
    from adaptzip import distill

    done = {} if not RECORD.is_file() else {r["case"]: r for r in json.loads(RECORD.read_text())["rows"]}
    banks = args.out / "converge_state"
    if args.redo:
        done = {c: r for c, r in done.items() if c not in args.cases.split(",")}
        for c in args.cases.split(","):
            _bank(banks, c).unlink(missing_ok=True)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=OUT.parent.parent)
    rev = rev.stdout.strip() or "not recorded"  # the code each row was measured with (rows are kept across runs)
    ad, gguf, calib, evaltext = _smollm2()
    cal = distill.prepare(
        ad, gguf, calib, calib_tokens=args.calib_tokens, eval_text=evaltext, eval_tokens=args.eval_tokens
    )
    if args.redo:  # the rows measured anew leave the JSON at once: a cut run then resumes without --redo
        _write(args, done, cal)
    for spec in args.cases.split(","):
        frac, name = spec.split(":")
        if spec in done:
            continue
        form = _fit(ad, name, float(frac), cal.stats)
        kl0 = cal.evaluate(form.to(cal.base.device))["kl"]
        bank = _bank(banks, spec)
        if bank.is_file():  # the defaults' run of this case ended in an earlier sitting
            saved = torch.load(bank, weights_only=True)
            form.load_state_dict(saved["form"])
            a, kl1, default_seconds, rev_a = saved["a"], saved["kl_default"], saved["seconds"], saved["rev"]
            again = cal.evaluate(form)["kl"]
            if abs(again - kl1) > 1e-4 * kl1:
                raise SystemExit(f"{bank}: banked eval KL {kl1:.6g}, the loaded state gives {again:.6g}; use --redo")
            print(f"{spec}: the defaults' run resumed from {bank}", flush=True)
        else:
            t1 = time.perf_counter()
            a = cal.distil(form, steps=args.steps, most_steps=3 * args.steps)
            kl1 = cal.evaluate(form)["kl"]
            default_seconds, rev_a = time.perf_counter() - t1, rev
            bank.parent.mkdir(parents=True, exist_ok=True)
            tmp = bank.with_suffix(".tmp")
            torch.save(
                {"form": form.state_dict(), "a": a, "kl_default": kl1, "seconds": default_seconds, "rev": rev}, tmp
            )
            tmp.replace(bank)
        t2 = time.perf_counter()
        more_lr = a["distill_lr"] or a["distill_lr_final"]
        b = cal.distil(form, steps=2 * a["distill_steps"], lr=more_lr, reductions=10**6)
        kl3 = cal.evaluate(form)["kl"]
        done[spec] = {
            "case": spec,
            "budget": float(frac),
            "form": name,
            "kl_start": kl0,
            "kl_default": kl1,
            "kl_3x": min(kl1, kl3),
            "ratio": kl1 / min(kl1, kl3),
            "default_steps": a["distill_steps"],
            "default_stop": a["distill_stop"],
            "default_lr": a["distill_lr"],
            "default_probe": a["distill_lr_probe"],
            "default_seconds": default_seconds,
            "more_steps": b["distill_steps"],
            "more_lr": more_lr,
            "more_best_step": b["distill_best_step"],
            "more_seconds": time.perf_counter() - t2,
            "precision": cal.precision,
            "rev": rev if rev_a == rev else f"{rev_a}+{rev}",  # the defaults' run + the 3× run
        }
        print(json.dumps(done[spec]), flush=True)
        _write(args, done, cal)
        bank.unlink()
    _write(args, done, cal)


def _bank(banks: Path, spec: str) -> Path:
    """Where a case's form is banked between its defaults' run and its 3× run."""
    return banks / f"{spec.replace(':', '_')}.pt"


def _write(args, done: dict, cal) -> None:
    """Write converge.json (the rows measured so far, their targets, the set-up) and converge.md."""
    rows = sorted(done.values(), key=lambda r: -r["budget"])
    targets = [
        {
            "name": f"default KL / best KL of the 3× run ({r['form']} at {r['budget']:.0%})",
            "measured": r["ratio"],
            "limit": 1.10,
        }
        for r in rows
    ]
    check_targets(targets)
    res = {
        "machine": machine_info(),
        "threads": args.threads,
        "steps_cap": args.steps,
        "calib_tokens": args.calib_tokens,
        "eval_tokens": cal.eval.tokens,
        "rows": rows,
        "targets": targets,
    }
    RECORD.parent.mkdir(parents=True, exist_ok=True)
    tmp = RECORD.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    tmp.replace(RECORD)
    _render(args.out, res)


def _render(out: Path, res: dict) -> None:
    """Write RES as converge.json and its table as converge.md in ``out``."""
    cols = [
        "budget",
        "form",
        "KL start",
        "KL defaults",
        "steps (stop)",
        "lr probed",
        "3× run lr",
        "KL 3× run",
        "defaults / 3×",
        "minutes",
        "revision",
    ]
    rows = res["rows"]
    trs = [
        [
            f"{r['budget']:.0%}",
            r["form"],
            f"{r['kl_start']:.4f}",
            f"{r['kl_default']:.4f}",
            f"{r['default_steps']} ({r['default_stop']})",
            f"{r['default_lr']:.3g}",
            f"{r['more_lr']:.3g}",
            f"{r['kl_3x']:.4f}",
            f"{r['ratio']:.3f}",
            f"{(r['default_seconds'] + r['more_seconds']) / 60:.0f}",
            r["rev"],
        ]
        for r in rows
    ]
    steps = res["steps_cap"]
    precision = "/".join(sorted({r["precision"] for r in rows}))
    intro = (
        f"Convergence at the defaults on SmolLM2-135M-Instruct (its real r=16 LoRA; {res['calib_tokens']} calibration "
        f"tokens, eval on {res['eval_tokens']} held-out news tokens, KL in fp32; training steps in {precision}; "
        f"{res['threads']} threads). Defaults: learning rate probed, plateau schedule, convergence stop, a cap of "
        f"{steps} steps that grows up to {3 * steps} while the held-out KL still falls by more than 2% per {steps // 3} "
        "steps. The 3× run continues the same form for twice the steps the defaults took, from the rate the probe chose "
        "(`3× run lr`), with the plateau schedule and no convergence stop. `revision`: the commit each row was measured "
        "at (rows of earlier runs are kept; a+b: the defaults' run at a, the 3× run, resumed later, at b)."
    )
    write_outputs(out, "converge", res, markdown_doc(intro, cols, trs, res["targets"]))


if __name__ == "__main__":
    main()
