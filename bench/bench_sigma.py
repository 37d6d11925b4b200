"""Σ statistics at scale: what the default Σ sketch costs a fit, and what it saves.

Three cases, each in its own process (so that its peak RSS is its own):

* ``accuracy`` — a tiny real Llama (hidden 256, MLP 512, 2 layers, built like
  tests/calib_fixtures.py) with a LoRA trained on text: one calibration pass collects the exact Σ
  and sketches of several ranks side by side (``SigmaHooks``), then every form is fitted at each
  budget with each Σ and its Σ-weighted output error is measured under the **exact** Σ
  (``fit.evaluate``). The ratio sketch/exact is the error the sketch costs. The ranks are chosen
  so that rank/in spans the ratios of real models at the default rank (Llama-7B: 128/4096).
* ``memory`` — the Llama-7B shape (hidden 4096, MLP 11008, 32 layers; r=16 LoRA on q,k,v,o,
  gate,up,down: 224 modules, bench/llama7b_adapter.py's shapes): synthetic correlated
  activations (x = z Mᵀ·s + noise, a fixed low-rank M per slot and a few outlier features) are fed
  through ``SigmaHooks.observe`` — the code the forward hooks run — then the sketches are built
  and saved. Peak RSS of the whole pass and the stats file's bytes, against the bytes the exact Σ
  would take (computed from the shapes: it does not fit in this machine's memory).
* ``speed`` — tokens/s of the accumulation on one 4096-wide slot shared by three modules
  (q/k/v): the sketch against the exact Σ.

    python bench/bench_sigma.py                                  # every case (~5-10 min on 2 cores)
    python bench/bench_sigma.py --cases memory --layers 4        # quick memory check

Prints the tables; writes bench/out/sigma.json and bench/out/sigma.md.
Targets: peak RSS of the 7B-shaped Σ pass ≤ 2 GB; its stats file ≤ 2 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import common
from common import HERE

ROOT = HERE.parent
CASES = ("accuracy", "memory", "speed")
FORMS = ("svd", "bslora-ss", "bslora-gt", "bslora-ke", "masa", "vblora")
# Form options that let the defaults fit the tiny model (as tests/test_calibrate.py's TINY_OPTIONS).
TINY_OPTIONS = {"vblora": {"vector_len": 32, "bank": 64}}
TARGET_RSS_MB = 2048.0
TARGET_FILE_MB = 2048.0
SMOLLM2 = {"layers": 30, "hidden": 576, "inter": 1536, "kv": 192, "rank": 16}  # SmolLM2-135M, r=16 on all 7


# ----------------------------------------------------------------------------- shapes → bytes
def slot_shapes(hidden: int, inter: int, kv: int, rank: int) -> list[tuple[int, int]]:
    """(in, exact rows p) of the four input slots of a Llama layer with a rank-``rank`` LoRA on
    q,k,v,o,gate,up,down: q/k/v share one input, gate/up another."""
    sys.path.insert(0, str(HERE))
    from llama7b_adapter import module_shapes

    shapes = module_shapes(kv, hidden, inter)
    slots = {
        "qkv": ("q_proj", "k_proj", "v_proj"),
        "o": ("o_proj",),
        "gu": ("gate_proj", "up_proj"),
        "down": ("down_proj",),
    }
    return [(shapes[ts[0]][1], rank * len(ts)) for ts in slots.values()]


def stats_bytes(layers: int, hidden: int, inter: int, kv: int, rank: int, sketch: int | None) -> int:
    """Tensor bytes of a stats file (fp32; the header is a few kB more) at the default sketch rank
    or for the exact Σ (``sketch`` None)."""
    from adaptzip.sigma import stored_values

    return 4 * layers * sum(stored_values(n, p, sketch) for n, p in slot_shapes(hidden, inter, kv, rank))


# ----------------------------------------------------------------------------- child: accuracy
SLOT_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu", "up_proj": "gu"}
SLOT_OF["down_proj"] = "down"


def _slot(m) -> tuple:
    """(layer, input slot) of a Llama module: q/k/v share one input, gate/up another."""
    return (m.layer, SLOT_OF[m.type.rsplit(".", 1)[-1]])


def _model_stats(ad, base, ids, other_ids, ranks: list[int]) -> dict:
    """Σ of the tiny Llama's own activations: the exact Σ (key None) and a sketch per rank from one
    pass over ``ids``, and the exact Σ of ``other_ids`` (key "other")."""
    import torch

    from adaptzip import calibrate as cb

    def run(rows, hooks: dict) -> dict:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for h in hooks.values():
                stack.enter_context(h)
            for s in range(0, rows.shape[0], 8):
                for h in hooks.values():
                    h.new_batch(None)
                base.model(input_ids=rows[s : s + 8])
        return {k: h.result()[0] for k, h in hooks.items()}

    hooks = {None: cb.SigmaHooks(base, ad.modules, None)}
    hooks.update({k: cb.SigmaHooks(base, ad.modules, k) for k in ranks})
    return {**run(ids, hooks), **run(other_ids, {"other": cb.SigmaHooks(base, ad.modules, None)})}


def _synthetic_stats(ad, tokens: int, ranks: list[int]) -> dict:
    """Σ of synthetic activations with a heavy-tailed spectrum, fed through ``SigmaHooks.observe``
    with the adapter's A rows: per slot x = z diag(√λ) Qᵀ, λ_i = 1/i, Q a random rotation, four
    outlier features ×10 (the modules of a slot see one tensor, as in the model)."""
    import torch

    from adaptzip import calibrate as cb

    rows = [A for _, _, A in ad.iter_factors()]
    hooks = {None: cb.SigmaHooks(None, ad.modules, None, rows=rows)}
    hooks.update({k: cb.SigmaHooks(None, ad.modules, k, rows=rows) for k in ranks})
    other = cb.SigmaHooks(None, ad.modules, None)  # the exact Σ of other draws
    g = torch.Generator().manual_seed(1)
    mixers: dict[tuple, torch.Tensor] = {}
    for m in ad.modules:
        key = _slot(m)
        if key not in mixers:
            n = m.in_features
            Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
            M = Q * torch.arange(1, n + 1).pow(-0.5)[None, :]  # x = z Mᵀ: Σ = Q diag(1/i) Qᵀ
            M[torch.randperm(n, generator=g)[:4]] *= 10
            mixers[key] = M
    for _ in range(tokens // 512):
        for h in (*hooks.values(), other):
            h.new_batch(None)
        xs: dict[tuple, tuple[torch.Tensor, ...]] = {}
        for j, m in enumerate(ad.modules):
            key = _slot(m)
            if key not in xs:
                M = mixers[key]
                xs[key] = tuple(torch.randn(512, M.shape[1], generator=g) @ M.T for _ in range(2))
            for h in hooks.values():
                h.observe(j, xs[key][0])
            other.observe(j, xs[key][1])
    return {**{k: h.result()[0] for k, h in hooks.items()}, "other": other.result()[0]}


def _compare(ad, stats: dict, budgets: list[float], steps: int) -> tuple[list[dict], list[dict]]:
    """Every form at every budget fitted with each Σ of ``stats`` — the exact Σ (key None), the
    sketches (int keys), the exact Σ of other tokens ("other": what another calibration sample of
    the same size costs) — and with the exact Σ at seed 1 (the run-to-run scale of the iterative
    fits); its error measured under the exact Σ."""
    import torch

    from adaptzip import fit
    from adaptzip.budget import FitRequest, fit_to_budget
    from adaptzip.errors import AdaptzipError
    from adaptzip.forms import FitContext, get_form
    from adaptzip.sigma import SigmaSketch

    exact = stats[None]

    def nbytes(st) -> int:
        uniq = {id(v): v for v in st.values()}
        return sum(v.nbytes if isinstance(v, SigmaSketch) else v.numel() * v.element_size() for v in uniq.values())

    def missed(st) -> float:
        """Share of tr Σ the low-rank part L Lᵀ leaves to the diagonal term, over modules."""
        tot = sum(float(exact[m.name].trace()) for m in ad.modules)
        low = sum(float((st[m.name].L.double() ** 2).sum()) for m in ad.modules)
        return 1 - low / tot

    ranks = [k for k in stats if isinstance(k, int)]
    sigmas = [
        {"rank": k, "bytes": nbytes(stats[k]), "trace_missed": None if k is None else missed(stats[k])}
        for k in [None, *ranks]
    ]
    runs = [("exact", exact, 0), *((str(k), stats[k], 0) for k in ranks), ("other tokens", stats["other"], 0)]
    runs.append(("seed 1", exact, 1))
    rows = []
    for name in FORMS:
        cls = get_form(name)
        for b in budgets:
            row = {"form": name, "budget": b, "errors": {}, "ratios": {}, "seconds": {}}
            ev = FitContext(stats=exact)
            for label, st, seed in runs:
                ctx = FitContext(stats=st, seed=seed, max_steps=steps)
                t1 = time.perf_counter()
                try:
                    cfg = cls.Config(**TINY_OPTIONS.get(name, {}))
                    form = fit_to_budget(FitRequest(ad, cls, cfg, int(b * ad.bytes), torch.float32, ctx)).form
                except AdaptzipError as e:
                    row["skipped"] = str(e)
                    break
                row["errors"][label] = fit.evaluate(form, ad, ev).rel_error
                row["seconds"][label] = time.perf_counter() - t1
            if "skipped" not in row:
                e0 = row["errors"]["exact"]
                row["ratios"] = {k: v / e0 for k, v in row["errors"].items() if k != "exact"}
            rows.append(row)
            print(f"  {name} {b}: {row['ratios'] or row.get('skipped')}", file=sys.stderr, flush=True)
    return sigmas, rows


def accuracy_case(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT / "tests"))
    from calib_fixtures import base_with_tokenizer, make_text, train_text_lora
    from fixtures import make_base

    from adaptzip import calibrate as cb
    from adaptzip import load_adapter

    ranks = [int(r) for r in a.ranks.split(",")]
    budgets = [float(b) for b in a.budgets.split(",")]
    d = Path(tempfile.mkdtemp(dir=a.work))  # in the scratch folder: removed by the parent
    text = make_text(3000, seed=0)
    (d / "calib.txt").write_text(text)
    b0 = make_base(d / "b0", layers=2, hidden=256, inter=512, heads=4, kv_heads=2)
    base_dir = base_with_tokenizer(b0, d / "base", text)
    ad = load_adapter(train_text_lora(base_dir, d / "lora", text, steps=30, r=8))
    base = cb.load_base(base_dir, ad, "cpu")
    ids = cb.pack(cb.tokenize_stream(base.tokenizer, cb.read_texts(d / "calib.txt")), 64, 2 * a.tokens, None, "text")
    half = ids.shape[0] // 2
    sources = {}
    for label, make in (
        ("tiny Llama activations", lambda: _model_stats(ad, base, ids[:half], ids[half:], ranks)),
        ("synthetic, eigenvalues ∝ 1/i", lambda: _synthetic_stats(ad, a.tokens, ranks)),
    ):
        print(f"  Σ: {label}", file=sys.stderr, flush=True)
        sigmas, rows = _compare(ad, make(), budgets, a.steps)
        sources[label] = {"sigmas": sigmas, "rows": rows}
    return {
        "model": "tiny Llama (2 layers, hidden 256, MLP 512, k/v 128, vocab 128) with a LoRA r=8 trained on text "
        "on all 7 linear kinds (14 modules)",
        "in_features": sorted({m.in_features for m in ad.modules}),
        "tokens": int(ids[:half].numel()),
        "fit_max_steps": a.steps,
        "sources": sources,
    }


# ----------------------------------------------------------------------------- child: memory
def _modules(layers: int, hidden: int, inter: int, kv: int, rank: int):
    """ModuleInfo of the Llama-7B-shaped adapter (bench/llama7b_adapter.py's names and shapes)."""
    from adaptzip.adapter import ModuleInfo

    sys.path.insert(0, str(HERE))
    from llama7b_adapter import module_shapes

    out = []
    for i in range(layers):
        for t, (sub, n_in, n_out) in module_shapes(kv, hidden, inter).items():
            out.append(
                ModuleInfo(f"model.layers.{i}.{sub}.{t}", "model.layers", i, t, n_in, n_out, rank, 2.0 * rank, 2.0)
            )
    return out


class _Activations:
    """Synthetic correlated inputs of one slot type: x = (z Mᵀ + 0.05·noise) ∘ s, M (in×64) a fixed
    random basis with a decaying spectrum, s a per-feature scale with four outlier features ×20
    (as LLM activations have). Seeded."""

    def __init__(self, n: int, seed: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        self.M = torch.randn(n, 64, generator=g) * torch.arange(1, 65).pow(-0.7)
        self.s = torch.ones(n)
        self.s[torch.randperm(n, generator=g)[:4]] = 20.0
        self.g = g

    def __call__(self, tokens: int):
        import torch

        z = torch.randn(tokens, 64, generator=self.g)
        return (z @ self.M.T + 0.05 * torch.randn(tokens, self.M.shape[0], generator=self.g)) * self.s


def memory_case(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import adaptzip  # noqa: F401  (sets the OpenMP policy before heavy work, as the CLI does)
    from adaptzip import calibrate as cb

    rss_import = common.peak_rss_mb()
    mods = _modules(a.layers, 4096, 11008, 1024, 16)
    g = torch.Generator().manual_seed(0)
    rows = [(torch.rand(16, m.in_features, generator=g) * 2 - 1) / math.sqrt(m.in_features) for m in mods]
    gens: dict[str, _Activations] = {}  # one per slot type: a layer's inputs differ by their draws
    hooks = cb.SigmaHooks(None, mods, rows=rows, seed=0)
    del rows  # the hooks drop each module's rows once its slot holds their basis
    rss_setup = common.peak_rss_mb()
    t0 = time.perf_counter()
    batches = max(1, a.mem_tokens // a.batch_tokens)
    for _ in range(batches):
        hooks.new_batch(None)
        xs: dict[tuple[int, str], object] = {}
        for j, m in enumerate(mods):
            key = _slot(m)
            if key[1] not in gens:
                gens[key[1]] = _Activations(m.in_features, len(gens))
            if key not in xs:  # the modules of one slot see one tensor, as in the model
                xs = {key: gens[key[1]](a.batch_tokens)}
            hooks.observe(j, xs[key])
        del xs
    hooks.new_batch(None)
    acc_s = time.perf_counter() - t0
    rss_acc = common.peak_rss_mb()
    gens.clear()
    t1 = time.perf_counter()
    stats, info = hooks.result()
    build_s = time.perf_counter() - t1
    rss_result = common.peak_rss_mb()
    with tempfile.TemporaryDirectory(dir=a.work) as td:
        path = Path(td) / "stats.safetensors"
        t2 = time.perf_counter()
        cb.save_stats(path, stats, info)
        save_s = time.perf_counter() - t2
        file_bytes = path.stat().st_size
    kinds = sorted({type(v).__name__ for v in stats.values()})
    return {
        "layers": a.layers,
        "modules": len(mods),
        "slots": len({id(v) for v in stats.values()}),
        "kinds": kinds,
        "sketch_rank": info["sketch"],
        "tokens": batches * a.batch_tokens,
        "batch_tokens": a.batch_tokens,
        "threads": a.threads,
        "accumulate_seconds": acc_s,
        "build_seconds": build_s,
        "save_seconds": save_s,
        "file_bytes": file_bytes,
        "full_sigma_bytes": stats_bytes(a.layers, 4096, 11008, 1024, 16, None),
        "rss_after_import_mb": rss_import,
        "rss_after_setup_mb": rss_setup,
        "rss_after_accumulate_mb": rss_acc,
        "rss_after_result_mb": rss_result,
        "peak_rss_mb": common.peak_rss_mb(),
    }


# ----------------------------------------------------------------------------- child: speed
def speed_case(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from adaptzip import calibrate as cb
    from adaptzip.sigma import SKETCH_RANK

    n, T = 4096, a.batch_tokens
    mods = _modules(1, n, 11008, 1024, 16)[:3]  # q, k, v: one shared slot, p = 48
    g = torch.Generator().manual_seed(0)
    rows = [(torch.rand(16, n, generator=g) * 2 - 1) / math.sqrt(n) for _ in mods]
    act = _Activations(n, 7)
    out = {"in_features": n, "modules": 3, "batch_tokens": T, "threads": a.threads}
    for label, sketch in (("sketch", SKETCH_RANK), ("exact", None)):
        hooks = cb.SigmaHooks(None, mods, sketch, rows=rows, seed=0)
        xs = [act(T) for _ in range(a.speed_batches + 1)]
        for i, x in enumerate(xs):
            if i == 1:
                t0 = time.perf_counter()  # the first batch (slot creation) is not timed
            hooks.new_batch(None)
            for j in range(3):
                hooks.observe(j, x)
        hooks.new_batch(None)
        out[f"{label}_tokens_per_s"] = a.speed_batches * T / (time.perf_counter() - t0)
    out["speedup"] = out["sketch_tokens_per_s"] / out["exact_tokens_per_s"]
    return out


# ----------------------------------------------------------------------------- parent
def _size(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"


def markdown(res: dict) -> str:
    lines = []
    acc = res.get("accuracy")
    if acc:
        first = next(iter(acc["sources"].values()))
        ranks = [x["rank"] for x in first["sigmas"] if x["rank"] is not None]
        ins = acc["in_features"]
        lines += [
            f"**What the sketch costs.** A {acc['model']}. Every form is fitted within the budget with the exact Σ "
            f"and with sketches of rank k (k/in from {min(ranks) / max(ins):.3g} to {max(ranks) / min(ins):.3g}; "
            f"Llama-7B at the default rank {res['default_rank']}: {res['default_rank'] / 4096:.3g} for hidden-size "
            f"inputs, {res['default_rank'] / 11008:.3g} for down_proj), then its Σ-weighted output error "
            "‖(ΔW−ΔŴ)X‖/‖ΔW X‖ is measured under the exact Σ. Ratio = that error for a fit with the sketch / for "
            "the fit with the exact Σ (1: no cost). Two yardsticks: *other tokens* fits with the exact Σ of as many "
            "other tokens (what another calibration sample costs), *seed 1* with the exact Σ and another seed "
            "(the run-to-run scale of the iterative fits). The svd form (and bslora-gt, an svd in disguise) needs only A Σ Aᵀ, "
            f"which the sketch holds exactly. Σ from {acc['tokens']:,} tokens, ≤ {acc['fit_max_steps']} "
            "optimiser steps per fit.",
        ]
        for label, src in acc["sources"].items():
            cols = ["form", "budget", "error (exact Σ)"] + [f"ratio k={k}" for k in ranks]
            cols += ["ratio other tokens", "ratio seed 1"]
            body = []
            for r in src["rows"]:
                if "skipped" in r:
                    body.append([r["form"], f"{r['budget']:.0%}", "does not fit"] + ["–"] * (len(ranks) + 2))
                    continue
                body.append(
                    [r["form"], f"{r['budget']:.0%}", f"{r['errors']['exact']:.4f}"]
                    + [f"{r['ratios'][str(k)]:.3f}" for k in ranks]
                    + [f"{r['ratios']['other tokens']:.3f}", f"{r['ratios']['seed 1']:.3f}"]
                )
            sig = {x["rank"]: x for x in src["sigmas"]}
            lines += ["", f"Σ: {label}.", "", *common.markdown_table(cols, body), ""]
            lines.append(
                f"Stats: exact Σ {sig[None]['bytes'] / 1e3:,.0f} kB; "
                + "; ".join(
                    f"k={k}: {sig[k]['bytes'] / 1e3:,.0f} kB, L Lᵀ leaves {sig[k]['trace_missed']:.2%} of tr Σ to the diagonal term"
                    for k in ranks
                )
                + "."
            )
    mem = res.get("memory")
    spd = res.get("speed")
    if mem or spd:
        lines += ["", f"**What it saves** (default rank {res['default_rank']}; {res['machine']})."]
        cols = ["case", "stats file", "exact Σ would take", "peak RSS of the Σ pass", "seconds"]
        body = []
        if mem:
            body.append(
                [
                    f"Llama-7B shape, {mem['layers']} layers, {mem['modules']} modules ({mem['slots']} slots), "
                    f"{mem['tokens']:,} synthetic tokens",
                    _size(mem["file_bytes"]),
                    _size(mem["full_sigma_bytes"]),
                    f"{mem['peak_rss_mb']:,.0f} MB",
                    f"{mem['accumulate_seconds']:.0f} + {mem['build_seconds']:.0f} + {mem['save_seconds']:.0f}",
                ]
            )
        for name, sh in res["shapes"].items():
            body.append(
                [
                    f"{name} (from shapes)",
                    _size(sh["sketch_bytes"]),
                    _size(sh["full_bytes"]),
                    "–",
                    "–",
                ]
            )
        lines += ["", *common.markdown_table(cols, body)]
        if mem:
            lines += [
                "",
                "Seconds: accumulation + building the sketches + writing the file. "
                "Peak RSS includes Python and torch (after import: "
                f"{mem['rss_after_import_mb']:,.0f} MB).",
            ]
        if spd:
            lines += [
                "",
                f"Accumulation speed on one {spd['in_features']}-wide slot shared by q/k/v ({spd['batch_tokens']} tokens "
                f"per batch, {spd['threads']} threads): sketch {spd['sketch_tokens_per_s']:,.0f} tokens/s, exact Σ "
                f"{spd['exact_tokens_per_s']:,.0f} tokens/s ({spd['speedup']:.1f}×).",
            ]
    lines += common.targets_markdown(res["targets"]) if res["targets"] else []
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_args(ap, "sigma", CASES, timeout=3600)
    ap.add_argument("--ranks", default="0,8,32", help="sketch ranks of the accuracy case")
    ap.add_argument("--budgets", default="0.25,0.05", help="budgets of the accuracy case (fractions of the source)")
    ap.add_argument(
        "--tokens", type=int, default=8192, help="calibration tokens of the accuracy case (and as many other ones)"
    )
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps per fit at most (accuracy case)")
    ap.add_argument("--mem-tokens", type=int, default=2048, help="synthetic tokens of the memory case")
    ap.add_argument("--batch-tokens", type=int, default=512, help="tokens per batch (memory and speed cases)")
    ap.add_argument("--speed-batches", type=int, default=4, help="timed batches of the speed case")
    ap.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="torch threads")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.case:  # child mode
        fn = {"accuracy": accuracy_case, "memory": memory_case, "speed": speed_case}[a.case]
        print(json.dumps(fn(a)))
        return 0
    cases = common.parse_cases(ap, a.cases, CASES)
    from adaptzip.sigma import SKETCH_RANK

    res: dict = {
        "benchmark": "sigma",
        "default_rank": SKETCH_RANK,
        "machine": f"{os.cpu_count()} CPUs",
        **common.machine_info(),
    }
    with common.scratch(a.work, "adaptzip-sigma-", a.keep) as work:
        passthrough = [
            "--ranks", a.ranks, "--budgets", a.budgets, "--tokens", a.tokens, "--steps", a.steps,
            "--mem-tokens", a.mem_tokens, "--batch-tokens", a.batch_tokens, "--speed-batches", a.speed_batches,
            "--threads", a.threads, "--layers", a.layers, "--work", work,
        ]  # fmt: skip
        for case in cases:
            print(f"… {case}", file=sys.stderr, flush=True)
            res[case] = common.run_child(__file__, ["--case", case, *passthrough], a.timeout, name=case)
    res["shapes"] = {
        f"{name}, r=16 on all 7 linear kinds": {
            "sketch_bytes": stats_bytes(sh["layers"], sh["hidden"], sh["inter"], sh["kv"], sh["rank"], SKETCH_RANK),
            "full_bytes": stats_bytes(sh["layers"], sh["hidden"], sh["inter"], sh["kv"], sh["rank"], None),
        }
        for name, sh in (
            ("SmolLM2-135M", SMOLLM2),
            ("Llama-7B", {"layers": 32, "hidden": 4096, "inter": 11008, "kv": 1024, "rank": 16}),
        )
    }
    targets = []
    if "memory" in res:
        targets = common.check_targets(
            [
                {
                    "name": "peak RSS of the 7B-shaped Σ pass (MB)",
                    "measured": res["memory"]["peak_rss_mb"],
                    "limit": TARGET_RSS_MB,
                },
                {
                    "name": "its stats file (MB)",
                    "measured": res["memory"]["file_bytes"] / 2**20,
                    "limit": TARGET_FILE_MB,
                },
            ]
        )
    res["targets"] = targets
    md = markdown(res)
    common.write_outputs(a.out, "sigma", res, md)
    print(md)
    return 0 if all(t["ok"] for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
