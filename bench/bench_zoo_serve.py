"""Serving a jointly stored zoo: N adapters of one cluster on one base model, as adaptzip's live
``joint`` form (``expand --to peft-native``: the cluster's U, V held once, a core per adapter) and
as the plain PEFT LoRAs that ``expand`` writes from the same containers.

The base: a randomly initialised Llama built here (hidden 512, 8 layers, intermediate 1376, vocab
1024, 8 heads, 4 KV heads; fp32). The zoo: 64 synthetic r=16 LoRAs on every attention and MLP
projection whose updates share a planted basis, as ``tests/test_zoo_joint.py::joint_zoo`` builds
them for the tiny Llama: per module a common U0 (out×12) and V0 (12×in), each adapter a full
random 12×12 core plus 4 weak private directions. The zoo is stored with ``adaptzip batch
--shared-basis --budget 0.25`` (in this process: ``adaptzip.zoo.batch``, jobs=1); the bench checks
that the cluster was stored as a joint kind and says so when not.

For N = 1, 8, 64 adapters loaded on one base (``PeftModel.from_pretrained`` then ``load_adapter``;
the native model and the LoRA model share the base's weight tensors):

* resident adapter bytes: Σ numel·element_size of the adapters' parameters and buffers, each
  memory block once (native: ``base_model.adaptzip_forms`` + ``base_model.adaptzip_shared``; LoRA:
  every ``lora_A``/``lora_B``);
* tokens/s of one forward (``torch.no_grad()``, 1 torch thread, no KV cache) on a batch of
  ``--rows`` rows × ``--seq`` tokens: the *mixed* batch gives row j adapter j mod N
  (``model(input_ids, adapter_names=[...])``), the *single* batch gives every row the first adapter
  (``set_adapter``), and the base alone for reference; one warm-up, then ``--reps`` rounds that run
  every variant in turn (order reversed every other round); medians;
* the warm-up's logits of the native mixed batch against the LoRA's: max |Δ| relative to the
  LoRA's effect (max |LoRA − base|) and to max |LoRA logit|.

    python bench/bench_zoo_serve.py                    # the full run (a few minutes)
    python bench/bench_zoo_serve.py --work /tmp/zs     # keep and reuse the base, zoo and containers
    python bench/bench_zoo_serve.py --reps 2 --rows 16 # quick

Prints tables; writes bench/out/zoo_serve.json and bench/out/zoo_serve.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import common

sys.path.insert(0, str(common.HERE.parent / "tests"))

HIDDEN, LAYERS, INTER, VOCAB, HEADS, KV_HEADS = 512, 8, 1376, 1024, 8, 4
RANK, K0, ALPHA = 16, 12, 32
ADAPTERS = 64
COUNTS = (1, 8, 64)
THREADS = 1
TARGET_LOGITS = 1e-4
NAME = "zoo_serve"


# ----------------------------------------------------------------------------- the zoo
def module_shapes() -> dict[str, tuple[str, int, int]]:
    """projection -> (block, in, out) of the base built here."""
    from llama7b_adapter import module_shapes as llama_shapes

    return llama_shapes(KV_HEADS * (HIDDEN // HEADS), HIDDEN, INTER)


def build_base(work: Path) -> Path:
    from fixtures import make_base

    path = work / "base"
    if not (path / "config.json").is_file():
        make_base(path, layers=LAYERS, hidden=HIDDEN, inter=INTER, vocab=VOCAB, heads=HEADS, kv_heads=KV_HEADS)
    return path


def build_zoo(root: Path, n: int, seed: int = 0, core_scale: float = 0.1) -> Path:
    """n r=16 adapters with ΔW_a = U0 C_a V0 + weak private directions per module (see the
    module docstring); ``core_scale``: the cores' entry scale (‖ΔW‖ ≈ 12 × core_scale)."""
    import torch
    from fixtures import lora_key, write_adapter

    if root.is_dir() and len(list(root.glob("ad*/adapter_model.safetensors"))) == n:
        return root
    g = torch.Generator().manual_seed(seed)
    shapes = module_shapes()
    basis = {}
    for layer in range(LAYERS):
        for t, (_, n_in, n_out) in shapes.items():
            U0 = torch.linalg.qr(torch.randn(n_out, K0, generator=g))[0]
            V0 = torch.linalg.qr(torch.randn(n_in, K0, generator=g))[0].T
            basis[(layer, t)] = (U0, V0)
    scale = ALPHA / RANK
    private = RANK - K0
    for a in range(n):
        tensors = {}
        for (layer, t), (U0, V0) in basis.items():
            block, n_in, n_out = shapes[t]
            C = torch.randn(K0, K0, generator=g) * core_scale
            B = torch.cat([U0 @ C, 0.003 * torch.randn(n_out, private, generator=g)], 1)
            A = torch.cat([V0, torch.randn(private, n_in, generator=g) / n_in**0.5], 0)
            name = f"model.layers.{layer}.{block}.{t}"
            tensors[lora_key(name, "A")], tensors[lora_key(name, "B")] = A.contiguous(), (B / scale).contiguous()
        write_adapter(root / f"ad{a:02d}", tensors, {"r": RANK, "lora_alpha": ALPHA, "target_modules": list(shapes)})
    return root


# ----------------------------------------------------------------------------- measuring
def resident(tensors) -> int:
    """Σ numel·element_size of ``tensors``, each memory block (address, size) once."""
    seen, total = set(), 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if (t.data_ptr(), n) not in seen:
            seen.add((t.data_ptr(), n))
            total += n
    return total


def native_tensors(pm) -> list:
    tuner = pm.base_model
    mods = [*tuner.adaptzip_forms.values(), *getattr(tuner, "adaptzip_shared", {}).values()]
    return [t for m in mods for t in (*m.parameters(), *m.buffers())]


def lora_tensors(pm) -> list:
    return [p for n, p in pm.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def load_to(pm, base, dirs: list[Path], names: list[str], upto: int):
    """The PeftModel (created on a copy of ``base`` sharing its weights when ``pm`` is None) with the
    first ``upto`` adapters loaded."""
    from peft import PeftModel

    if pm is None:
        shared = {id(p): p for p in base.parameters()}
        model = copy.deepcopy(base, dict(shared))
        if any(p is not q for p, q in zip(model.parameters(), base.parameters())):
            raise RuntimeError("a variant does not share the base's weights")
        pm = common.peft_quietly(PeftModel.from_pretrained, model, dirs[0], adapter_name=names[0]).eval()
    have = len(pm.peft_config)
    for j in range(have, upto):
        common.peft_quietly(pm.load_adapter, dirs[j], adapter_name=names[j])
    pm.eval()
    return pm


def timed(fn, reps_out: list[float]) -> None:
    t = time.perf_counter()
    fn()
    reps_out.append(time.perf_counter() - t)


def _earlier_batch(out: Path, budget: str) -> dict | None:
    """The summary of a complete ``--shared-basis`` batch of this zoo left in ``--work`` by an
    earlier run (the sharing fit is the slow part and is not resumable), else None."""
    import json

    f = out / "batch.json"
    if not f.is_file():
        return None
    s = json.loads(f.read_text())
    ok = (
        s["options"].get("budget") == str(budget)
        and s["totals"]["adapters"] == ADAPTERS
        and not s["interrupted"]
        and s.get("sharing")
        and all((out / r["output"]).is_file() for r in s["adapters"])
    )
    return s if ok else None


def serve(work: Path, a: argparse.Namespace) -> dict:
    import torch

    import adaptzip
    from adaptzip import container as ct
    from adaptzip import zoo

    torch.set_num_threads(THREADS)
    load_start = common.loadavg()
    base_dir = build_base(work)
    src = build_zoo(work / "zoo", ADAPTERS)
    out = work / "out"
    summary = _earlier_batch(out, a.budget) if not a.rebatch else None
    reused = summary is not None
    if summary is None:
        print(f"… adaptzip batch --shared-basis of {ADAPTERS} adapters", file=sys.stderr, flush=True)
        summary = zoo.batch(src, out, budget=a.budget, jobs=1, shared_basis=True)
    batch_s = summary["seconds"]
    groups = summary["sharing"]["groups"]
    if len(groups) != 1:
        print(f"note: the zoo split into {len(groups)} candidate groups", file=sys.stderr)
    g = groups[0]
    kind = (g.get("shared") or {}).get("kind")
    joint = g["decision"] == "shared" and bool(kind) and kind.startswith("joint-basis")
    if not joint:
        print(f"WARNING: the cluster was not stored as a joint kind: {g['decision']}: {g['reason']}", file=sys.stderr)
    names = [f"z{j:02d}" for j in range(ADAPTERS)]
    native_dirs, lora_dirs, container_bytes = [], [], []
    print("… expand: peft-native and PEFT LoRA", file=sys.stderr, flush=True)
    for j in range(ADAPTERS):
        c = out / f"ad{j:02d}.safetensors"
        native_dirs.append(work / "native" / f"ad{j:02d}")
        lora_dirs.append(work / "lora" / f"ad{j:02d}")
        adaptzip.expand(c, native_dirs[-1], to="peft-native", force=True)
        ex = adaptzip.expand(c, lora_dirs[-1], dtype="fp32", force=True)
        container_bytes.append(c.stat().st_size)
    c0 = ct.open_container(out / "ad00.safetensors")
    shared_file = c0.shared_path.stat().st_size if c0.manifest.get("shared") else 0
    ranks = [int(k) for k in c0.manifest["state"]["ranks"]] if c0.form_name == "joint" else []
    lora_ranks = list(ex["ranks"].values()) if ex.get("ranks") else [ex.get("r")]

    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (a.rows, a.seq), generator=gen)
    tokens = a.rows * a.seq
    native = lora = None
    per_n = []
    for n in COUNTS:
        print(f"… N = {n}: load, check, time", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        native = load_to(native, base, native_dirs, names, n)
        native_load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        lora = load_to(lora, base, lora_dirs, names, n)
        lora_load_s = time.perf_counter() - t0
        tuner = native.base_model
        row_names = [names[j % n] for j in range(a.rows)]
        nb, lb = resident(native_tensors(native)), resident(lora_tensors(lora))
        variants = {
            "base": lambda: base(input_ids=ids, use_cache=False).logits,
            "native mixed": lambda m=native, rn=row_names: m(input_ids=ids, use_cache=False, adapter_names=rn).logits,
            "LoRA mixed": lambda m=lora, rn=row_names: m(input_ids=ids, use_cache=False, adapter_names=rn).logits,
            "native single": lambda m=native: m(input_ids=ids, use_cache=False).logits,
            "LoRA single": lambda m=lora: m(input_ids=ids, use_cache=False).logits,
        }
        native.set_adapter(names[0])
        lora.set_adapter(names[0])
        times: dict[str, list[float]] = {k: [] for k in variants}
        with torch.no_grad():
            ref = variants["base"]()
            lo, na = variants["LoRA mixed"](), variants["native mixed"]()
            ls, ns = variants["LoRA single"](), variants["native single"]()
            effect = float((lo - ref).abs().max())
            diff = float((na - lo).abs().max())
            diff_single = float((ns - ls).abs().max())
            # row j of the mixed batch against adapter j alone (the single batch gives every row adapter 0)
            row0 = float((lo[0] - ls[0]).abs().max())
            del ref, lo, na, ls, ns
            order = list(variants)
            for rep in range(a.reps):
                for key in order if rep % 2 == 0 else order[::-1]:
                    timed(variants[key], times[key])
        med = {k: statistics.median(v) for k, v in times.items()}
        per_n.append(
            {
                "adapters": n,
                "native_bytes": nb,
                "native_shared_bytes": resident(
                    [t for m in getattr(tuner, "adaptzip_shared", {}).values() for t in m.parameters()]
                ),
                "native_bases_held": len(getattr(tuner, "adaptzip_shared", {})),
                "lora_bytes": lb,
                "stored_bytes": sum(container_bytes[:n]) + shared_file,
                "lora_file_bytes": sum((d / "adapter_model.safetensors").stat().st_size for d in lora_dirs[:n]),
                "native_load_s": native_load_s,
                "lora_load_s": lora_load_s,
                "seconds": med,
                "runs_s": times,
                "tokens_per_s": {k: tokens / v for k, v in med.items()},
                "logits_max_abs_diff": diff,
                "logits_rel_diff": diff / max(effect, 1e-30),
                "logits_single_max_abs_diff": diff_single,
                "lora_effect": effect,
                "lora_mixed_row0_vs_single": row0,
            }
        )
    return {
        "benchmark": NAME,
        "base": {
            "hidden": HIDDEN,
            "layers": LAYERS,
            "intermediate": INTER,
            "vocab": VOCAB,
            "heads": HEADS,
            "kv_heads": KV_HEADS,
            "params": sum(p.numel() for p in base.parameters()),
        },
        "zoo": {"adapters": ADAPTERS, "rank": RANK, "planted_basis": K0, "budget": a.budget},
        "batch_s": batch_s,
        "batch_reused": reused,
        "conversion_s": sum(r.get("seconds") or 0.0 for r in summary["adapters"]),
        "sharing": {
            k: g.get(k) for k in ("group", "adapters", "decision", "reason", "separate", "shared", "candidates")
        },
        "joint_kind_chosen": joint,
        "source_bytes": summary["totals"]["source_bytes"],
        "zoo_bytes": summary["totals"]["zoo_bytes"],
        "shared_file_bytes": shared_file,
        "joint_ranks": {"total": sum(ranks), "min": min(ranks), "max": max(ranks), "mean": sum(ranks) / len(ranks)}
        if ranks
        else None,
        "lora_mean_rank": sum(lora_ranks) / len(lora_ranks),
        "rows": a.rows,
        "seq": a.seq,
        "reps": a.reps,
        "threads": THREADS,
        "by_n": per_n,
        "machine": common.machine_info() | {"cpus": os.cpu_count()},
        "loadavg_start": load_start,
        "loadavg_end": common.loadavg(),
    }


# ----------------------------------------------------------------------------- tables
COLUMNS = (
    "N",
    "stored MB",
    "native MB",
    "LoRA MB",
    "native / LoRA bytes",
    "base tok/s",
    "native mixed tok/s",
    "LoRA mixed tok/s",
    "native / LoRA mixed",
    "(native − base) / (LoRA − base)",
    "native single tok/s",
    "LoRA single tok/s",
    "Δ logits / LoRA effect",
)


def rows_of(r: dict) -> list[list[str]]:
    out = []
    for x in r["by_n"]:
        tps, sec = x["tokens_per_s"], x["seconds"]
        extra_l = sec["LoRA mixed"] - sec["base"]
        extra_n = sec["native mixed"] - sec["base"]
        out.append(
            [
                str(x["adapters"]),
                f"{x['stored_bytes'] / 1e6:.3f}",
                f"{x['native_bytes'] / 1e6:.3f}",
                f"{x['lora_bytes'] / 1e6:.3f}",
                f"{x['native_bytes'] / x['lora_bytes']:.3f}",
                f"{tps['base']:.0f}",
                f"{tps['native mixed']:.0f}",
                f"{tps['LoRA mixed']:.0f}",
                f"{tps['native mixed'] / tps['LoRA mixed']:.2f}",
                f"{extra_n / extra_l:.2f}" if extra_l > 0.02 * sec["base"] else "–",
                f"{tps['native single']:.0f}",
                f"{tps['LoRA single']:.0f}",
                f"{x['logits_rel_diff']:.1e}",
            ]
        )
    return out


def markdown(r: dict) -> str:
    g, s = r["sharing"], r["sharing"]["shared"] or {}
    b, m = r["base"], r["machine"]
    jr = r["joint_ranks"]
    stored = (
        f"stored as **{s['kind']}** ({g['adapters']} adapters: {s['bytes']} bytes at group error {s['rel_error']:.4f}, "
        f"against {g['separate']['bytes']} bytes at {g['separate']['rel_error']:.4f} separately)"
        if r["joint_kind_chosen"]
        else f"**not stored as a joint kind** ({g['decision']}: {g['reason']})"
    )
    ranks = f"; joint rank per module {jr['min']}–{jr['max']} (mean {jr['mean']:.1f})" if jr else ""
    intro = (
        f"A zoo of {r['zoo']['adapters']} synthetic r={r['zoo']['rank']} LoRAs whose updates share a planted "
        f"{r['zoo']['planted_basis']}-dimensional basis per module (every attention and MLP projection), "
        f"`adaptzip batch --shared-basis --budget {r['zoo']['budget']}` ({r['batch_s']:.0f} s with jobs 1, "
        f"{r['conversion_s']:.0f} s of it the separate conversions"
        f"{', an earlier run' if r['batch_reused'] else ''}): {stored}{ranks}; the expanded PEFT LoRAs "
        f"have rank {r['lora_mean_rank']:.1f} per module. Base: a random Llama (hidden {b['hidden']}, {b['layers']} layers, "
        f"intermediate {b['intermediate']}, vocab {b['vocab']}, {b['params'] / 1e6:.1f} M parameters, fp32). "
        f"N adapters loaded on one base, natively (`expand --to peft-native`: U, V once per base, "
        f"{r['by_n'][-1]['native_bases_held']} basis held at N = {r['by_n'][-1]['adapters']}) and as PEFT LoRAs "
        f"(`expand`). `stored MB`: the N containers plus the shared file; `native MB` / `LoRA MB`: resident adapter "
        f"bytes (Σ numel·element_size of the adapters' tensors, each block once). Throughput: one forward of "
        f"{r['rows']} rows × {r['seq']} tokens (`torch.no_grad()`, no KV cache, {r['threads']} torch thread on "
        f"{m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}), median of {r['reps']} after a warm-up; `mixed`: row j uses "
        f"adapter j mod N (`adapter_names`), `single`: every row the first adapter. `(native − base) / (LoRA − base)`: "
        f"the adapters' own cost, live against expanded (– when the LoRA adds under 2% to the base). "
        f"`Δ logits / LoRA effect`: max |native − LoRA| over the mixed batch's logits relative to max |LoRA − base|. "
        f"1-min load average {r['loadavg_start']:.1f} at the start, {r['loadavg_end']:.1f} at the end."
    )
    last = r["by_n"][-1]
    notes = [
        f"At N = {last['adapters']}: native / LoRA resident bytes "
        f"**{last['native_bytes'] / last['lora_bytes']:.3f}**, native / LoRA mixed-batch tokens/s "
        f"**{last['tokens_per_s']['native mixed'] / last['tokens_per_s']['LoRA mixed']:.2f}×** (both measured in this run)."
    ]
    return common.markdown_doc(intro, COLUMNS, rows_of(r), targets(r), notes)


def targets(r: dict) -> list[dict]:
    """Sanity targets: the live form computes what the LoRA computes, and holds fewer bytes."""
    last = r["by_n"][-1]
    return common.check_targets(
        [
            {
                "name": "Δ logits / LoRA effect, native against LoRA mixed batch (worst N)",
                "measured": max(x["logits_rel_diff"] for x in r["by_n"]),
                "limit": TARGET_LOGITS,
            },
            {
                "name": f"native / LoRA resident bytes at N = {last['adapters']}",
                "measured": last["native_bytes"] / last["lora_bytes"],
                "limit": 1.0,
            },
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", default="0.25", help="per-adapter budget of the batch")
    ap.add_argument("--rows", type=int, default=64, help="rows of the timed batch")
    ap.add_argument("--seq", type=int, default=64, help="tokens per row")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds after the warm-up")
    ap.add_argument("--work", type=Path, default=None, help="work folder, kept (default: a temporary one)")
    ap.add_argument("--rebatch", action="store_true", help="redo the batch even when --work holds one")
    ap.add_argument("--out", type=Path, default=common.OUT, help=f"where {NAME}.json / {NAME}.md go")
    a = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with common.scratch(a.work, "adaptzip-bench-zoo-serve-", keep=False) as work:
        result = serve(work, a)
    md = markdown(result)
    common.write_outputs(a.out, NAME, result, md)
    print(common.table(COLUMNS, rows_of(result)))
    print()
    print(md)


if __name__ == "__main__":
    main()
