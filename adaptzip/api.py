"""The Python API behind every CLI command (the CLI only parses and prints)."""
from __future__ import annotations

import functools
import json
import math
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from . import container as ct
from . import export, export_vblora, fit, linalg
from . import quant as qz
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
                  dtype: torch.dtype, ctx: FitContext, *, metrics_fn=None, command: str | None = None,
                  quant: str = "none", group_size: int = qz.DEFAULT_GROUP):
    """Fit a form (choosing its configuration for the budget when one is given) so that the whole
    container file, header and manifest (with the metrics ``metrics_fn(form, size)`` returns)
    included, fits the budget. ``quant``: a fixed storage scheme (none, int8, int4, int4-asym)
    for the form's float tensors; the configuration is then chosen at its bytes per value, and
    ``metrics_fn`` sees the form as stored (dequantised). Returns (form, tensors, manifest, size)."""
    fb = qz.bytes_per_value(quant, group_size, dtype)
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
            if best is not None and cfg == best[0].config:
                break  # the header reserve given back buys this form nothing: keep the fit we have
        form = form_cls.fit(adapter, cfg, ctx)
        storage = ct.storage_plan(form, quant, group_size, dtype)
        tensors, manifest = ct.build(form, adapter, dtype, command=command, storage=storage)
        size = ct.serialized_size(tensors, manifest)
        if metrics_fn is not None:
            stored = ct.decoded_form(form, tensors, manifest)  # measure what is stored (dtype cast, quantised)
            tensors, manifest = ct.build(form, adapter, dtype, metrics=metrics_fn(stored, size), command=command,
                                         storage=storage)
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
             baseline: bool = True, base_model: str | Path | None = None, calib: str | Path | None = None,
             calib_tokens: int = 50000, calib_steps: int = 300, eval_text: str | Path | None = None,
             stats_file: str | Path | None = None, device: str = "auto", lr: float | None = None,
             seq_len: int = 128, batch_size: int = 4, auto_distil: int = 3, fit_steps: int | None = None, quant: str = "none",
             group_size: int = qz.DEFAULT_GROUP, **form_options: Any) -> dict:
    """Fit ``lora_dir`` into form ``to`` and write one container to ``output``.

    ``budget``: a fraction of the source's bytes (``0.25``) or a size (``"5MB"``): the whole
    container file fits it. Form hyperparameters (see ``adaptzip forms``) come as keyword
    arguments (``rank=4``) or as the dict ``options`` (the CLI's way).
    ``stats``: Σ per module name for activation-weighted fitting. Returns the summary printed by
    ``adaptzip compress --json``.

    Calibration (:mod:`adaptzip.distill`): with ``base_model`` (a model dir or ``.gguf`` file) and
    ``calib`` (text or JSONL), Σ is computed on ``calib_tokens`` tokens of base + source LoRA (saved
    to ``stats_file``, default ``<output>.stats.safetensors``; an existing ``stats_file`` is reused),
    the fit is Σ-weighted, the form is distilled ``calib_steps`` steps (0: none; ``lr`` default by
    the start's quality) and its KL / top-1 / improvement kept before and after (and those of the
    same-bytes svd baseline) go into the metrics. ``stats_file`` alone gives a Σ-weighted fit.
    ``to='auto'`` (needs ``budget`` and ``base_model``) tries every form and keeps the best by eval
    KL, distilling ``auto_distil`` of them. ``fit_steps`` bounds the optimiser steps of iterative
    weight-space fits (``FitContext.max_steps``).

    ``quant``: storage of the form's float tensors — ``none`` (the container dtype), ``int8``,
    ``int4``, ``int4-asym`` (groups of ``group_size`` values with fp16 scales), or ``auto`` (needs
    ``budget``: bits, and for svd ranks, chosen to minimise the error; formats/quantization.md)."""
    t0 = time.perf_counter()
    if quant not in qz.SCHEMES:
        raise OptionError(None, f"--quant {quant!r}: expected one of {', '.join(qz.SCHEMES)}")
    if group_size < 1:
        raise OptionError(None, f"--group-size must be ≥ 1, got {group_size}")
    if quant == "auto" and budget is None:
        raise OptionError(None, "--quant auto chooses bits for a size: give --budget too")
    adapter = load_adapter(lora_dir)
    output = Path(output)
    check_output(output, force, sources=(adapter.path, adapter.weights_file))
    if to == "auto" and (budget is None or base_model is None):
        raise OptionError(None, "--to auto needs --budget and --base-model/--calib (forms are compared by their eval KL)")
    cal = None
    if base_model is not None or stats_file is not None:
        from . import distill
        cal, stats = distill.setup(adapter, output, base_model=base_model, calib=calib, calib_tokens=calib_tokens,
                                   eval_text=eval_text, stats=stats, stats_file=stats_file, device=device, force=force,
                                   progress=progress, seed=seed, seq_len=seq_len, batch_size=batch_size)
    elif calib is not None or eval_text is not None:
        raise OptionError(None, "--calib/--eval need --base-model (the teacher runs on the base model)")
    if to == "auto":
        return _compress_auto(adapter, output, cal, budget, dtype, seed, progress, command, stats, calib_steps, lr,
                              auto_distil, t0, fit_steps, quant, group_size)
    form_cls = get_form(to)
    config = make_config(form_cls, {**(options or {}), **form_options})
    dt = resolve_dtype(dtype, adapter)
    budget_bytes = None if budget is None else parse_budget(budget, adapter.bytes)
    torch.manual_seed(seed)
    ctx = FitContext(stats=stats, seed=seed, progress=progress, max_steps=fit_steps)

    def metrics_fn(form: Form, size: int) -> dict:
        m: dict[str, Any] = {**fit.evaluate(form, adapter, ctx).to_json(), "weighted": stats is not None}
        if not baseline:
            return m
        if form.name == "lora":  # a lossless repack: no same-bytes approximation to compare with
            m["svd_baseline_rel_error"], m["svd_baseline_bytes"] = None, None
        elif form.name == "svd" and budget_bytes is not None and quant == "none" and form.config.rank is None:
            # a budgeted svd is the baseline itself (same allocation at the same bytes)
            m["svd_baseline_rel_error"], m["svd_baseline_bytes"] = m["rel_error"], size
        else:
            base_form, base_size = svd_baseline(adapter, size, dt, ctx)
            m["svd_baseline_rel_error"] = fit.evaluate(base_form, adapter, ctx).rel_error
            m["svd_baseline_bytes"] = base_size
        return m

    auto_report: dict = {}
    if cal is not None:  # distillation runs once, after the budget is settled (see distill.fit_and_distil)
        fitb = (fit_to_budget if quant == "none"
                else functools.partial(_fit_qat, quant=quant, group_size=group_size, auto_report=auto_report))
        form, tensors, manifest, size = distill.fit_and_distil(
            adapter, form_cls, config, budget_bytes, dt, ctx, cal, fit_to_budget=fitb,
            svd_baseline=svd_baseline if baseline else None, steps=calib_steps, lr=lr, command=command)
    elif quant == "auto":
        form, tensors, manifest, size, auto_report = _quant_auto(adapter, form_cls, config, budget_bytes, dt, ctx,
                                                                 group_size, metrics_fn, command)
    else:
        form, tensors, manifest, size = fit_to_budget(adapter, form_cls, config, budget_bytes, dt, ctx,
                                                      metrics_fn=metrics_fn, command=command, quant=quant,
                                                      group_size=group_size)
    written = ct.write(output, tensors, manifest)
    qinfo = {"quant": _quant_summary(manifest)} if "storage" in manifest else {}
    if quant == "auto":
        qinfo["quant"]["auto"] = auto_report
    return {
        "output": str(output), "form": form.name, "config": config_to_json(form.config), "state": _state_summary(form),
        "dtype": DTYPE_NAMES[dt], "source_bytes": adapter.bytes, "bytes": written, "ratio": written / adapter.bytes,
        "stored_params": form.float_params(), "source_params": adapter.n_params,
        **manifest["metrics"], **qinfo, **_calibration_extras(cal, form, adapter, ctx),
        "seconds": time.perf_counter() - t0,
    }


def _calibration_extras(cal, form: Form, adapter: Adapter, ctx: FitContext) -> dict:
    """Result-only facts of a calibrated compress (not in the manifest: per-module output
    errors ‖(ΔW−ΔŴ)X‖/‖ΔW X‖, Σ file, timings)."""
    if cal is None:
        return {}
    rep = fit.evaluate(form, adapter, ctx)
    return {"module_output_rel_errors": dict(zip((m.name for m in adapter.modules), rep.module_rel_errors)),
            "stats_file": cal.stats_info.get("saved_to"), "timings": cal.timings}


def _compress_auto(adapter: Adapter, output: Path, cal, budget, dtype, seed, progress, command, stats, calib_steps, lr,
                   auto_distil, t0, fit_steps=None, quant: str = "none", group_size: int = qz.DEFAULT_GROUP) -> dict:
    """``--to auto``: see :func:`adaptzip.distill.auto_select`; with ``quant``, every candidate is
    fitted and distilled as stored under that scheme (:func:`_fit_qat`)."""
    from . import distill
    dt = resolve_dtype(dtype, adapter)
    budget_bytes = parse_budget(budget, adapter.bytes)
    torch.manual_seed(seed)
    ctx = FitContext(stats=stats, seed=seed, progress=progress, max_steps=fit_steps)
    fitb = fit_to_budget if quant == "none" else functools.partial(_fit_qat, quant=quant, group_size=group_size)
    form, tensors, manifest, size, report = distill.auto_select(
        adapter, budget_bytes, dt, ctx, cal, fit_to_budget=fitb, steps=calib_steps, lr=lr,
        n_distil=auto_distil, command=command)
    written = ct.write(output, tensors, manifest)
    qinfo = {"quant": _quant_summary(manifest)} if "storage" in manifest else {}
    return {
        "output": str(output), "form": form.name, "config": config_to_json(form.config), "state": _state_summary(form),
        "dtype": DTYPE_NAMES[dt], "source_bytes": adapter.bytes, "bytes": written, "ratio": written / adapter.bytes,
        "stored_params": form.float_params(), "source_params": adapter.n_params,
        **manifest["metrics"], **qinfo, "auto": report, **_calibration_extras(cal, form, adapter, ctx),
        "seconds": time.perf_counter() - t0,
    }


def _fit_qat(adapter: Adapter, form_cls: type[Form], config: Any, budget_bytes: int | None, dtype: torch.dtype,
             ctx: FitContext, *, quant: str, group_size: int, metrics_fn=None, command: str | None = None,
             auto_report: dict | None = None):
    """``fit_to_budget`` under ``--quant`` for distillation: the form carries its storage
    (``form.quant_storage``, so every later ``container.build`` stores it quantised) and is seen
    through the straight-through fake quantiser (:func:`adaptzip.quant.attach_fake_quant`), so
    distillation trains the latent floats for what will be stored (quantisation-aware) and every
    metric measured on it describes the stored container. ``quant='auto'``: the bits (and svd
    ranks) are first chosen by the rate–distortion allocation of :func:`_quant_auto` on the
    (Σ-weighted, when statistics exist) weight-space error; its report goes into ``auto_report``."""
    if quant == "auto":  # compress has checked that a budget is given
        def weighed(f: Form, size: int) -> dict:  # the header reservation of metrics_fn, with the real error
            return {**(metrics_fn(f, size) if metrics_fn is not None else {}), "rel_error": fit.evaluate(f, adapter, ctx).rel_error}
        form, tensors, manifest, size, rep = _quant_auto(adapter, form_cls, config, budget_bytes, dtype, ctx, group_size,
                                                         weighed, command)
        if auto_report is not None:
            auto_report.clear()
            auto_report.update(rep)
    else:
        form, tensors, manifest, size = fit_to_budget(adapter, form_cls, config, budget_bytes, dtype, ctx, quant=quant,
                                                      group_size=group_size, metrics_fn=metrics_fn, command=command)
    storage = qz.Storage.from_json(manifest.get("storage"))
    if storage is not None:
        form.quant_storage = storage
        qz.attach_fake_quant(form, storage, dtype)
        form.eval()
    return form, tensors, manifest, size


# ----------------------------------------------------------------------------- --quant auto
def _quant_summary(manifest: dict) -> dict:
    """The compress JSON's ``quant`` entry: scheme, group size, a histogram of the stored float
    tensors' row bits and the bit allocation (per tensor; per module type and rank position for
    svd/lora: :func:`adaptzip.quant.describe_storage`)."""
    st = manifest["storage"]
    hist: dict[str, int] = {}
    for t in st["tensors"].values():
        for b in ([t["bits"]] if isinstance(t["bits"], int) else t["bits"]):
            hist[str(b)] = hist.get(str(b), 0) + 1
    out = {"scheme": st["scheme"], "group_size": st["group_size"], "quantised_tensors": len(st["tensors"]),
           "row_bits": dict(sorted(hist.items(), key=lambda kv: int(kv[0])))}
    out["bits"] = qz.describe_storage(manifest)
    return out


def _auto_svd_candidates(adapter: Adapter, config: Any, target: int, dt: torch.dtype, ctx: FitContext,
                         group_size: int, command: str | None, only: str | None = None
                         ) -> list[tuple[str, Form, qz.Storage, dict, dict, int]]:
    """svd under ``--quant auto``: every singular direction (σ balanced into both factors) is
    dropped or stored at 2/3/4/8 bits or the container float width, chosen by greedy marginal
    (Σ-weighted) error reduction per byte (:func:`adaptzip.quant.allocate_levels`); also the
    uniform 2- and 3-bit allocations. Each is fitted so that its real file fits ``target``."""
    from .forms.svd import spectra
    svd = get_form("svd")
    fbits = qz.float_bits(dt)
    levels = list(qz.AUTO_LEVELS) + [fbits]
    key = ("quant-auto-options", id(adapter), group_size, fbits)
    if key not in ctx.cache:
        tabs = []
        for s, m in zip(spectra(adapter, ctx), adapter.modules):
            B, A = s.truncate(len(s.S))
            tabs.append(qz.direction_options(B, A, ctx.sigma(m), levels, group_size, dt))
        ctx.cache[key] = tabs
    tabs = ctx.cache[key]
    cap = config.rank
    out = []
    for label, allowed in (("mixed", levels), ("2-bit", [2]), ("3-bit", [3])):
        if only is not None and only != label:
            continue
        cols = [0] + [1 + levels.index(b) for b in allowed]
        opts = []
        for (costs, errs), m in zip(tabs, adapter.modules):
            k = errs.shape[0] if cap is None else min(cap, errs.shape[0])
            opts.append([[(costs[c], float(errs[i, c])) for c in cols] for i in range(k)])
        overhead = ct.serialized_size(*ct.build(svd.fit(adapter, svd.Config(ranks=(0,) * len(adapter.modules)), ctx),
                                                adapter, dt, command=command)) + 220 * len(adapter.modules)
        best = None
        for _ in range(8):
            payload = target - overhead
            if payload <= 0:
                break
            lv, spent = qz.allocate_levels(opts, payload, prefix=True)
            bits = [[levels[cols[l] - 1] for l in row if l > 0] for row in lv]
            form = svd.fit(adapter, svd.Config(rank=cap, ranks=tuple(len(b) for b in bits)), ctx)
            plan = {}
            for i, b in enumerate(bits):
                if not b or all(x == fbits for x in b):
                    continue
                bb: int | tuple[int, ...] = b[0] if len(set(b)) == 1 else tuple(b)
                plan[f"A.{i}"] = qz.TensorQuant(bb, 1, group_size)
                plan[f"B.{i}"] = qz.TensorQuant(bb, 0, group_size)
            storage = qz.Storage("auto", group_size, plan)
            tensors, manifest = ct.build(form, adapter, dt, command=command, storage=storage)
            size = ct.serialized_size(tensors, manifest)
            if size <= target:
                if best is None or size > best[5]:
                    best = (label, form, storage, tensors, manifest, size)
                if target - size <= 64:
                    break
                overhead = size - spent + 16  # give the unused reserve back
            else:
                overhead += size - target + 32
        if best is not None:
            out.append(best)
    return out


def _auto_tensor_candidate(adapter: Adapter, form: Form, target: int, dt: torch.dtype, ctx: FitContext,
                           group_size: int, command: str | None) -> tuple[str, Form, qz.Storage, dict, dict, int] | None:
    """Any form under ``--quant auto``: bits per stored float tensor (2/3/4/8 or the container
    width) by measured sensitivity (error increase when that tensor alone is quantised), greedy
    by error reduction per byte from the all-2-bit start, within ``target``."""
    fbits = qz.float_bits(dt)
    levels = list(qz.AUTO_LEVELS) + [fbits]
    specs = form.tensor_specs(form.modules_info, form.config, form.state_info)
    names = sorted(n for n, (shape, d) in specs.items() if d is None and math.prod(shape) > 0)
    tg = fit.targets(adapter, ctx)

    def module_errors(f: Form, idx: list[int]) -> torch.Tensor:
        errs = [linalg.sq_error(tg[i].B, tg[i].A, *f.factors(i), tg[i].Sigma) for i in idx]
        return torch.stack(errs) if errs else torch.zeros(0)

    def rebuild(tensors: dict[str, torch.Tensor]) -> Form:
        return type(form).from_tensors(form.modules_info, form.config, form.state_info, tensors)

    form.train()  # forms that keep source tensors verbatim switch to their parameters
    hook = getattr(form, "quant_axis", None)
    own = form.tensors()
    axis_of = {}
    for n in names:
        ax = hook(n, tuple(specs[n][0])) if hook is not None else None
        axis_of[n] = qz.choose_axis(own[n], 4, group_size, False, dt) if ax is None else ax
    sens = qz.tensor_options(form, names, levels, group_size, dt, module_errors, len(tg), rebuild,
                             lambda n, _shape: axis_of[n])
    form.eval()
    if not sens:
        return None
    order = sorted(sens)
    items = [sorted(((c, e, b) for b, c, e in sens[n]), key=lambda t: (t[0], t[1])) for n in order]
    opts = [[[(c - it[0][0], e) for c, e, _ in it] for it in items]]  # one group, no prefix; costs above the cheapest
    base = sum(it[0][0] for it in items)

    def plan_for(levels: list[int]) -> qz.Storage:
        plan = {}
        for n, it, l in zip(order, items, levels):
            b = it[l][2]
            if b != fbits:
                plan[n] = qz.TensorQuant(b, axis_of[n], group_size)
        return qz.Storage("auto", group_size, plan)

    tensors, manifest = ct.build(form, adapter, dt, command=command, storage=plan_for([0] * len(order)))
    unmodelled = ct.serialized_size(tensors, manifest) - base  # header and carried bytes beyond the estimates
    best = None
    for _ in range(6):
        extra = target - unmodelled - base
        if extra < 0:
            return best
        lv, spent = qz.allocate_levels(opts, extra, prefix=False)
        storage = plan_for(lv[0])
        tensors, manifest = ct.build(form, adapter, dt, command=command, storage=storage)
        size = ct.serialized_size(tensors, manifest)
        if size <= target:
            if best is None or size > best[5]:
                best = ("per-tensor", form, storage, tensors, manifest, size)
            if target - size <= 64:
                break
            unmodelled = size - base - spent + 16
        else:
            unmodelled += size - target + 32
    return best


def _quant_auto(adapter: Adapter, form_cls: type[Form], config: Any, budget_bytes: int, dt: torch.dtype,
                ctx: FitContext, group_size: int, metrics_fn, command: str | None):
    """``--quant auto``: candidates — the fixed schemes none/int8/int4, exactly as those options
    fit this budget, and the rate–distortion allocations (svd: per singular direction; other
    forms: per stored tensor), each fitted so that its final file fits — are measured as stored
    (dequantised); the lowest error wins, so auto is never worse than a choice it considered.
    The manifest records the chosen bits as its ``storage`` entries (scheme ``auto``); the
    candidates and a summary of the bits go in the result (``quant``)."""

    def relabel(f: Form, man: dict) -> tuple[qz.Storage, dict, dict, int]:
        st = qz.Storage.from_json(man.get("storage"))
        storage = qz.Storage("auto", group_size, dict(st.tensors) if st is not None else {})
        t, m = ct.build(f, adapter, dt, metrics=man["metrics"], command=command, storage=storage)
        return storage, t, m, ct.serialized_size(t, m)

    cands: list[tuple[float, int, str, Form, dict, dict]] = []  # (rel_error, bytes, label, form, tensors, manifest)
    fixed: list[tuple[str, Form]] = []
    metrics_len = 0
    for scheme in ("none", "int8", "int4"):
        # "none" has no storage section of its own: leave room for the one auto adds
        b = budget_bytes - (96 if scheme == "none" else 0)
        try:
            f, _, man, _ = fit_to_budget(adapter, form_cls, config, b, dt, ctx, metrics_fn=metrics_fn,
                                         command=command, quant=scheme, group_size=group_size)
        except OptionError:
            continue
        _, t, m, sz = relabel(f, man)  # int8/int4 → auto: the same length, the same bytes
        fixed.append((scheme, f))
        metrics_len = max(metrics_len, len(json.dumps(m["metrics"], separators=(",", ":"))))
        if sz <= budget_bytes:
            cands.append((float(m["metrics"]["rel_error"]), sz, scheme, f, t, m))

    if not fixed and form_cls.name != "svd":
        # a form that cannot choose its configuration for a size (e.g. lora): fit it as configured;
        # its bits per tensor are then what makes it fit
        fixed.append(("configured", form_cls.fit(adapter, config, ctx)))

    def finish(label: str, f: Form, storage: qz.Storage) -> tuple[dict, dict, int]:
        t, m = ct.build(f, adapter, dt, command=command, storage=storage)
        size = ct.serialized_size(t, m)
        t, m = ct.build(f, adapter, dt, metrics=metrics_fn(ct.decoded_form(f, t, m), size), command=command,
                        storage=storage)
        return t, m, ct.serialized_size(t, m)

    labels = ["mixed", "2-bit", "3-bit"] if form_cls.name == "svd" else [f"per-tensor({s})" for s, _ in fixed]
    for label in labels:
        target = budget_bytes - metrics_len - 64
        for _ in range(4):
            if form_cls.name == "svd":
                got = _auto_svd_candidates(adapter, config, target, dt, ctx, group_size, command, label)
                c = got[0] if got else None
            else:
                f0 = dict(fixed)[label[len("per-tensor("):-1]]
                c = _auto_tensor_candidate(adapter, f0, target, dt, ctx, group_size, command)
            if c is None:
                break
            _, f, storage, _, _, _ = c
            t, m, sz = finish(label, f, storage)
            if sz <= budget_bytes:
                cands.append((float(m["metrics"]["rel_error"]), sz, label, f, t, m))
                break
            target -= sz - budget_bytes + 32
    if not cands:
        raise OptionError(adapter.path, f"--quant auto: form {form_cls.name} does not fit {budget_bytes} bytes")
    order = sorted(range(len(cands)), key=lambda j: (cands[j][0], cands[j][1], j))
    err, size, label, form, tensors, manifest = cands[order[0]]
    report = {"chosen": label, "considered": [{"candidate": cands[j][2], "bytes": cands[j][1], "rel_error": cands[j][0]}
                                              for j in order]}
    return form, tensors, manifest, size, report


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
    if to == "peft-vblora":
        return export_vblora.to_peft_vblora(c, output, dtype=dtype)
    raise OptionError(None, f"--to {to!r}: expected peft, dense, merged or peft-vblora")


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
