"""adaptzip end to end on a tiny local model (no model hub, ~1 minute on 2 CPU cores).

1. build a tiny Llama (hidden 128, 4 layers) and save it,
2. train a PEFT LoRA (r=16 on every linear layer) on a learnable pattern: every odd token is
   (7 · previous token + 3) mod vocab,
3. compress it: ``lora`` (lossless repack) and ``svd --budget 0.25`` (a quarter of the bytes),
4. verify each container, expand it to a PEFT LoRA directory, load that with
   ``PeftModel.from_pretrained`` and compare with the source adapter: weight error (from PEFT's own
   ``get_delta_weight``), max |logit difference|, and accuracy on the pattern,
5. expand the svd container to a merged model and load it with ``AutoModelForCausalLM``,
6. compress to ``bslora-ke`` at the same budget, ``expand --to peft-native`` and run it live in
   PEFT (``PeftModel.from_pretrained``, generate): same logits as its expanded LoRA, with the
   shared parts held once instead of replicated per module.

Artefacts go to examples/out/ (replaced on every run).

    python examples/demo.py [--steps 60] [--budget 0.25]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as adaptzip's CLI: no spinning OpenMP threads on shared cores
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import adaptzip  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
VOCAB = 256
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """Token sequences whose odd positions follow from the even ones: x[2k+1] = (7·x[2k] + 3) mod V."""
    ids = torch.randint(3, VOCAB, (n, length), generator=g)
    ids[:, 1::2] = (ids[:, ::2] * 7 + 3) % VOCAB
    return ids


def build_base(path: Path, seed: int = 0) -> Path:
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def load_base(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def train_lora(base: Path, out: Path, steps: int, seed: int = 0) -> tuple[Path, list[float]]:
    model = load_base(base)
    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(seed + 1)
    losses = []
    pm.train()
    for _ in range(steps):
        ids = batch(16, 32, g)
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    pm.save_pretrained(out)
    return out, losses


def delta_weights(pm: PeftModel) -> dict[str, torch.Tensor]:
    """ΔW per adapted module as PEFT itself computes it (scale included)."""
    out = {}
    for name, mod in pm.named_modules():
        if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {}):
            out[name.removeprefix("base_model.model.")] = mod.get_delta_weight("default").detach().float()
    return out


def rel_error(src: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    num = sum(float((src[k] - got.get(k, torch.zeros_like(src[k]))).double().pow(2).sum()) for k in src)
    den = sum(float(src[k].double().pow(2).sum()) for k in src)
    return (num / den) ** 0.5


@torch.no_grad()
def evaluate(model, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Logits and accuracy on the predictable (odd) positions."""
    logits = model(input_ids=ids).logits.float()
    pred = logits[:, :-1].argmax(-1)  # prediction of token t+1 from position t
    target = ids[:, 1:]
    odd = torch.zeros_like(target, dtype=torch.bool)
    odd[:, ::2] = True  # target positions 1, 3, 5, … of the sequence
    return logits, float((pred == target)[odd].float().mean())


def fmt_bytes(n: int) -> str:
    return f"{n / 1e3:,.1f} kB" if n < 1e6 else f"{n / 1e6:,.2f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="LoRA training steps")
    ap.add_argument("--budget", default="0.25", help="svd container size: a fraction of the source's bytes or a size")
    ap.add_argument("--out", type=Path, default=OUT, help="artefact directory (replaced)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()

    out = a.out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(f"adaptzip {adaptzip.__version__} demo → {out}")

    base = build_base(out / "base")
    lora, losses = train_lora(base, out / "lora", a.steps)
    print(
        f"1. tiny Llama saved; PEFT LoRA r=16 on {len(TARGETS)} module types × 4 layers trained {a.steps} steps: "
        f"loss {losses[0]:.3f} → {losses[-1]:.3f}"
    )

    ids = batch(8, 32, torch.Generator().manual_seed(1234))  # held-out sequences
    base_model = load_base(base)
    _, base_acc = evaluate(base_model, ids)
    src = PeftModel.from_pretrained(load_base(base), lora).eval()
    src_logits, src_acc = evaluate(src, ids)
    src_delta = delta_weights(src)
    src_bytes = (lora / "adapter_model.safetensors").stat().st_size

    rows = [
        {
            "what": "source PEFT LoRA",
            "bytes": src_bytes,
            "ratio": 1.0,
            "fit_err": 0.0,
            "peft_err": 0.0,
            "logit": 0.0,
            "acc": src_acc,
        }
    ]
    cases = [("lora", dict(to="lora")), ("svd", dict(to="svd", budget=a.budget))]
    for name, kw in cases:
        cont = out / f"{name}.safetensors"
        s = adaptzip.compress(lora, cont, **kw)
        adaptzip.verify(cont)
        exp = out / f"{name}_peft"
        adaptzip.expand(cont, exp)
        pm = PeftModel.from_pretrained(load_base(base), exp).eval()
        logits, acc = evaluate(pm, ids)
        label = "lora (lossless repack)" if name == "lora" else f"svd --budget {a.budget}"
        rows.append(
            {
                "what": label,
                "bytes": s.bytes,
                "ratio": s.bytes / src_bytes,
                "fit_err": s.rel_error,
                "peft_err": rel_error(src_delta, delta_weights(pm)),
                "logit": float((logits - src_logits).abs().max()),
                "acc": acc,
            }
        )
        print(
            f"2. compressed → {cont.name} ({fmt_bytes(s.bytes)}), verified, expanded → {exp.name}/, "
            f"loaded with PeftModel.from_pretrained"
        )

    merged = out / "svd_merged"
    adaptzip.expand(out / "svd.safetensors", merged, to="merged", base_model=base)
    pm_svd = PeftModel.from_pretrained(load_base(base), out / "svd_peft").eval()
    m_logits, m_acc = evaluate(load_base(merged), ids)
    p_logits, _ = evaluate(pm_svd, ids)
    merged_diff = float((m_logits - p_logits).abs().max())
    print(
        f"3. svd container merged into the base → {merged.name}/ (AutoModelForCausalLM): "
        f"max |logit diff| vs the expanded PEFT adapter {merged_diff:.2e}, pattern accuracy {m_acc:.3f}"
    )

    ke = out / "bslora_ke.safetensors"
    adaptzip.compress(lora, ke, to="bslora-ke", budget=a.budget)
    adaptzip.expand(ke, out / "bslora_ke_native", to="peft-native")
    adaptzip.expand(ke, out / "bslora_ke_peft", dtype="fp32")
    live = PeftModel.from_pretrained(load_base(base), out / "bslora_ke_native").eval()
    flat = PeftModel.from_pretrained(load_base(base), out / "bslora_ke_peft").eval()
    live_logits, live_acc = evaluate(live, ids)
    flat_logits, _ = evaluate(flat, ids)
    live_diff = float((live_logits - flat_logits).abs().max())
    held = sum(p.numel() for p in live.base_model.adaptzip_forms.parameters())
    replicated = sum(p.numel() for n, p in flat.named_parameters() if "lora_" in n)
    with torch.no_grad():
        gen = live.generate(input_ids=ids[:2, :8], max_new_tokens=8, do_sample=False)
    print(
        f"4. bslora-ke container ({fmt_bytes(ke.stat().st_size)}) → expand --to peft-native → "
        f"PeftModel.from_pretrained: {held} adapter values held (its expanded LoRA holds {replicated}), "
        f"max |logit diff| vs that LoRA {live_diff:.2e}, pattern accuracy {live_acc:.3f}, generated {tuple(gen.shape)}"
    )

    print()
    head = f"{'':26} {'bytes':>10} {'ratio':>6} {'weight rel.err':>15} {'(via PEFT)':>11} {'max|Δlogit|':>12} {'pattern acc':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['what']:26} {fmt_bytes(r['bytes']):>10} {r['ratio']:>6.3f} {r['fit_err']:>15.4f} {r['peft_err']:>11.4f} "
            f"{r['logit']:>12.2e} {r['acc']:>12.3f}"
        )
    print(f"{'base model (no adapter)':26} {'':>10} {'':>6} {'':>15} {'':>11} {'':>12} {base_acc:>12.3f}")
    print(
        f"\nweight rel.err = ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F over all modules (from the container's manifest; "
        f"'via PEFT' recomputed from the loaded adapters); max|Δlogit| vs the source PeftModel on held-out sequences; "
        f"pattern acc = next-token accuracy on the predictable positions. {time.perf_counter() - t0:.0f} s."
    )

    lossless = rows[1]["peft_err"] < 1e-6 and rows[1]["logit"] < 1e-4
    try:  # a fraction: the whole svd file must fit it
        fits = float(a.budget) > 1 or rows[2]["ratio"] <= float(a.budget)
    except ValueError:  # a size such as 5MB: checked by compress itself
        fits = True
    ok = lossless and fits and merged_diff < 1e-3 and live_diff < 1e-4 and held < replicated
    if not ok:
        print(
            f"demo check failed: lossless={lossless} svd fits budget={fits} merged diff={merged_diff:.2e} "
            f"live diff={live_diff:.2e} live values={held} vs expanded {replicated}",
            file=sys.stderr,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
