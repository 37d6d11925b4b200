"""The Python API behind every CLI command (the CLI only parses and prints)."""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from . import container as ct
from . import export, fit, linalg
from .adapter import DTYPE_NAMES, TORCH_DTYPES, Adapter, load_adapter
from .errors import OptionError
from .fileio import check_output
from .forms import REGISTRY, FitContext, get_form, make_config
from .forms.base import Form, config_fields, config_to_json

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*$", re.I)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_budget(budget: str | float | int, source_bytes: int) -> int:
    """``0.25`` (a fraction ≤ 1 of the source's bytes) or a size: ``5MB``, ``300KiB``, ``123456``."""
    m = _SIZE_RE.match(str(budget))
    if not m:
        raise OptionError(None, f"--budget {budget!r}: expected a fraction like 0.25 or a size like 5MB")
    x, unit = float(m[1]), (m[2] or "").upper()
    if not unit and x <= 1.0:
        if x <= 0:
            raise OptionError(None, f"--budget {budget!r} must be > 0")
        return int(x * source_bytes)
    return int(x * _UNITS[unit or "B"])


def resolve_dtype(dtype: str | None, adapter: Adapter) -> torch.dtype:
    if dtype is None:
        return adapter.dtype if adapter.dtype in DTYPE_NAMES else torch.float32
    if dtype not in TORCH_DTYPES:
        raise OptionError(None, f"--dtype {dtype!r}: expected one of fp16, bf16, fp32")
    return TORCH_DTYPES[dtype]


def fit_to_budget(adapter: Adapter, form_cls: type[Form], config: Any, budget_bytes: int | None,
                  dtype: torch.dtype, ctx: FitContext, *, metrics_fn=None, command: str | None = None):
    """Fit a form (choosing its configuration for the budget when one is given) so that the whole
    container file, header and manifest (with the metrics ``metrics_fn(form, size)`` returns)
    included, fits the budget. Returns (form, tensors, manifest, size)."""
    fb = torch.empty(0, dtype=dtype).element_size()
    carried = sum(adapter.carried_tensor(c.key).numel() * adapter.carried_tensor(c.key).element_size() for c in adapter.carried)
    # header estimate: module table + source config (as in the manifest) + tensor entries; refined below
    table = json.dumps([m.to_json() for m in adapter.modules]) + json.dumps(adapter.config)
    overhead = carried + len(table) + 1024 + 96 * 2 * len(adapter.modules)
    best = None
    for _ in range(8):
        cfg = config
        if budget_bytes is not None:
            payload = budget_bytes - overhead
            if payload <= 0:
                raise OptionError(adapter.path, f"--budget of {budget_bytes} bytes is below the container's fixed overhead (~{overhead} bytes)")
            cfg = form_cls.config_for_budget(adapter, config, payload, fb, ctx)
        form = form_cls.fit(adapter, cfg, ctx)
        tensors, manifest = ct.build(form, adapter, dtype, command=command)
        size = ct.serialized_size(tensors, manifest)
        if metrics_fn is not None:
            tensors, manifest = ct.build(form, adapter, dtype, metrics=metrics_fn(form, size), command=command)
            size = ct.serialized_size(tensors, manifest)
        if budget_bytes is None:
            return form, tensors, manifest, size
        form_payload = sum(t.numel() * t.element_size() for n, t in tensors.items() if not n.startswith("carry."))
        measured = size - form_payload  # the real header + carried bytes of this configuration
        if size <= budget_bytes:
            if best is None or size > best[3]:
                best = (form, tensors, manifest, size)
            if overhead - measured <= 256:
                break  # the estimate was tight: nothing left to give back
            overhead = measured + 128  # second pass: give the unused header reserve back to the payload
        else:
            if best is not None:
                break  # the tighter pass overshot: keep the one that fits
            overhead = max(overhead + size - budget_bytes, measured) + 64
    if best is None:
        raise OptionError(adapter.path, f"could not fit form {form_cls.name} into {budget_bytes} bytes")
    return best


def svd_baseline(adapter: Adapter, budget_bytes: int, dtype: torch.dtype, ctx: FitContext) -> tuple[Form, int]:
    """The per-module SVD with global rank allocation whose container has the same bytes."""
    svd = get_form("svd")
    form, _, _, size = fit_to_budget(adapter, svd, svd.Config(), budget_bytes, dtype, ctx)
    return form, size


def compress(lora_dir: str | Path, output: str | Path, *, to: str = "svd", budget: str | float | None = None,
             dtype: str | None = None, seed: int = 0, options: dict[str, Any] | None = None, force: bool = False,
             progress: bool = False, command: str | None = None, stats: dict[str, torch.Tensor] | None = None,
             baseline: bool = True, **form_options: Any) -> dict:
    """Fit ``lora_dir`` into form ``to`` and write one container to ``output``.

    ``budget``: a fraction of the source's bytes (``0.25``) or a size (``"5MB"``): the whole
    container file fits it. Form hyperparameters (see ``adaptzip forms``) come as keyword
    arguments (``rank=4``) or as the dict ``options`` (the CLI's way).
    ``stats``: Σ per module name for activation-weighted fitting. Returns the summary printed by
    ``adaptzip compress --json``."""
    t0 = time.perf_counter()
    adapter = load_adapter(lora_dir)
    output = Path(output)
    check_output(output, force, sources=(adapter.path, adapter.weights_file))
    form_cls = get_form(to)
    config = make_config(form_cls, {**(options or {}), **form_options})
    dt = resolve_dtype(dtype, adapter)
    budget_bytes = None if budget is None else parse_budget(budget, adapter.bytes)
    torch.manual_seed(seed)
    ctx = FitContext(stats=stats, seed=seed, progress=progress)

    def metrics_fn(form: Form, size: int) -> dict:
        m: dict[str, Any] = {**fit.evaluate(form, adapter, ctx).to_json(), "weighted": stats is not None}
        if baseline:
            base_form, base_size = svd_baseline(adapter, size, dt, ctx)
            m["svd_baseline_rel_error"] = fit.evaluate(base_form, adapter, ctx).rel_error
            m["svd_baseline_bytes"] = base_size
        return m

    form, tensors, manifest, size = fit_to_budget(adapter, form_cls, config, budget_bytes, dt, ctx,
                                                  metrics_fn=metrics_fn, command=command)
    written = ct.write(output, tensors, manifest)
    return {
        "output": str(output), "form": form.name, "config": config_to_json(form.config), "state": _state_summary(form),
        "dtype": DTYPE_NAMES[dt], "source_bytes": adapter.bytes, "bytes": written, "ratio": written / adapter.bytes,
        "stored_params": form.float_params(), "source_params": adapter.n_params,
        **manifest["metrics"], "seconds": time.perf_counter() - t0,
    }


def _state_summary(form: Form) -> dict:
    s = dict(form.state_info)
    if isinstance(s.get("ranks"), list):
        r = s.pop("ranks")
        s["ranks"] = {"min": min(r, default=0), "max": max(r, default=0), "total": sum(r), "zero": sum(1 for x in r if x == 0)}
    return s


def expand(container: str | Path, output: str | Path, *, to: str = "peft", target: str = "peft",
           max_lora_rank: int | None = None, base_model: str | Path | None = None, dtype: str | None = None,
           force: bool = False) -> dict:
    """Restore a container as a PEFT LoRA directory (``to='peft'``; ``target='vllm'`` for vLLM's
    loader), a dense ΔW file (``to='dense'``) or a merged model (``to='merged'``, needs
    ``base_model``)."""
    c = ct.open_container(container)
    output = Path(output)
    srcs = (c.path,) + ((Path(base_model),) if base_model else ())
    check_output(output, force, sources=srcs)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise OptionError(None, f"--dtype {dtype!r}: expected one of fp16, bf16, fp32")
    if target not in ("peft", "vllm"):
        raise OptionError(None, f"--target {target!r}: expected peft or vllm")
    if to == "peft":
        return export.to_peft(c, output, target=target, max_lora_rank=max_lora_rank, dtype=dtype)
    if target != "peft":
        raise OptionError(None, "--target applies to --to peft only")
    if to == "dense":
        return export.to_dense(c, output, dtype=dtype or "fp32")
    if to == "merged":
        if base_model is None:
            raise OptionError(None, "--to merged needs --base-model DIR")
        return export.to_merged(c, Path(base_model), output)
    raise OptionError(None, f"--to {to!r}: expected peft, dense or merged")


def verify(container: str | Path) -> dict:
    """Check a container's schema, shapes and payload hash; raises ContainerError on the first problem."""
    return ct.open_container(container).verify()


def inspect(lora_dir: str | Path, *, top_k: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Facts about a PEFT LoRA adapter and a per-module spectrum summary (from the factors)."""
    ad = load_adapter(lora_dir)
    by_type = Counter(m.type_key for m in ad.modules)
    by_layer = Counter("none" if m.layer is None else f"{m.stack}.{m.layer}" for m in ad.modules)
    mods = []
    with torch.no_grad():
        for m, B, A in ad.iter_factors():
            s = linalg.factored_svd(B, A)
            mods.append({
                "name": m.name, "layer": m.layer, "type": m.type, "kind": m.kind, "in": m.in_features,
                "out": m.out_features, "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
                "norm": float(s.S.double().pow(2).sum().sqrt()), "effective_rank": linalg.effective_rank(s.S),
                "energy_top": {str(k): linalg.energy_top(s.S, k) for k in top_k if k <= m.rank},
            })
    return {
        **ad.summary(),
        "modules_per_type": dict(sorted(by_type.items())), "modules_per_layer": dict(by_layer),
        "ranks": dict(Counter(str(m.rank) for m in ad.modules)),
        "alphas": dict(Counter(str(m.alpha) for m in ad.modules)),
        "scales": dict(Counter(f"{m.scale:.6g}" for m in ad.modules)),
        "modules": mods,
    }


def list_forms() -> list[dict]:
    """Every registered form with its options and defaults."""
    return [{"name": n, "summary": c.summary, "options": config_fields(c.Config)} for n, c in sorted(REGISTRY.items())]
