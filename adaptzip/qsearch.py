"""Choosing bits: the rate–distortion search behind ``--quant auto`` and quantisation-aware fits.

The codec (formats/quantization.md) is :mod:`adaptzip.quant`; this module decides what to store
with it. Candidates, each fitted so that its real file fits the budget (:func:`adaptzip.budget.fit_within`):

* the fixed schemes none / int8 / int4, exactly as those options fit the budget;
* per-direction allocation (forms with :meth:`~adaptzip.forms.base.Form.directions`, e.g. the svd baseline): every
  singular direction, σ balanced into both factors, is dropped or stored at 2/3/4/8 bits or the
  container float width, greedily by marginal (Σ-weighted) error reduction per byte
  (:func:`allocate_levels` over :func:`direction_options`), plus the uniform 2- and 3-bit ones;
* per-tensor allocation (any form): each stored float tensor's width by its measured sensitivity
  (:func:`tensor_options`).

The lowest error as stored (dequantised) wins, so ``auto`` is never worse than a choice it
considered. :func:`fit_quantised` is the same under distillation: the form then carries its
storage and is seen through the straight-through fake quantiser.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from . import container as ct
from . import fit, linalg
from . import quant as qz
from .adapter import ModuleInfo
from .budget import Built, FitRequest, fit_to_budget, fit_within
from .errors import OptionError
from .forms import REGISTRY, Form
from .forms.base import Directions, config_from_json
from .runtime import single_thread

Tensor = torch.Tensor
_FLOAT_BITS = {"fp16": 16, "bf16": 16, "fp32": 32}


# ----------------------------------------------------------------------------- allocation
def _hull(opts: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the lower convex hull of options (cost, error), from option 0 on, each next
    one costlier and strictly better: the moves a greedy allocator takes in order."""
    path = [0]
    while True:
        c0, e0 = opts[path[-1]]
        best, best_slope = None, 0.0
        for j, (c, e) in enumerate(opts):
            if c > c0 and e < e0:
                slope = (e0 - e) / (c - c0)
                if slope > best_slope * (1 + 1e-12):
                    best, best_slope = j, slope
        if best is None:
            return path
        path.append(best)


def allocate_levels(
    options: Sequence[Sequence[Sequence[tuple[float, float]]]], budget: float, prefix: bool = True
) -> tuple[list[list[int]], float]:
    """Greedy rate–distortion allocation by marginal error reduction per byte.

    ``options[m][i][l] = (bytes, error)`` of item i of group m at level l; level 0 is the
    starting point (for svd: the direction dropped, 0 bytes). Items move along the lower convex
    hull of their options, best slope first, while the total stays within ``budget`` — one chain
    of moves per item for :func:`adaptzip.linalg.allocate`. With ``prefix``, item i of a group
    leaves level 0 only after item i−1 did (svd keeps a prefix of its singular directions).
    Returns (level per item, bytes spent beyond the level-0 costs)."""
    items = [(m, i) for m, g in enumerate(options) for i in range(len(g))]
    hulls = [_hull(options[m][i]) for m, i in items]
    gains, costs = [], []
    for (m, i), h in zip(items, hulls):
        o = options[m][i]
        gains.append([o[h[p]][1] - o[h[p + 1]][1] for p in range(len(h) - 1)])
        costs.append([o[h[p + 1]][0] - o[h[p]][0] for p in range(len(h) - 1)])
    after = [j - 1 if prefix and i > 0 else None for j, (_, i) in enumerate(items)]
    taken = linalg.allocate(gains, costs, budget, after=after)
    levels = [[0] * len(g) for g in options]
    spent = 0.0
    for j, ((m, i), h) in enumerate(zip(items, hulls)):
        levels[m][i] = h[taken[j]]
        spent += sum(costs[j][: taken[j]])
    return levels, spent


@single_thread()
def direction_options(
    B: Tensor,
    A: Tensor,
    Sigma: linalg.SigmaLike | None,
    levels: Sequence[int],
    group_size: int,
    float_dtype: torch.dtype,
    zero: bool = False,
) -> tuple[list[float], Tensor]:
    """Per singular direction i of balanced factors B (out×k), A (k×in): the bytes and the
    (Σ-weighted) squared error of storing it at each level. Levels: 0 (dropped), then each of
    ``levels`` (code bits, or the container float width). Returns (bytes per level (L+1),
    errors (k×(L+1)) float64). The error of direction i at b bits is ‖b̂ âᵀ − b aᵀ‖²_Σ with b, a
    column i of B and row i of A quantised in their own groups (exactly as stored)."""
    B = B.detach().float()
    A = A.detach().float()
    out, k = B.shape
    n_in = A.shape[1]
    fb = qz.float_bits(float_dtype)
    ngA, ngB = max(1, math.ceil(n_in / group_size)), max(1, math.ceil(out / group_size))
    Bd, Ad = B.double(), A.double()
    AS = linalg.weigh(Ad, Sigma)
    nb2 = (Bd * Bd).sum(0)
    costs = [0.0]
    errs = [nb2 * (AS * Ad).sum(1)]  # dropped: ‖b‖² a Σ aᵀ (= σ_i² for balanced SVD factors)
    for b in levels:
        if b == fb or b not in qz.CODE_BITS:
            Bh, Ah = B.to(float_dtype).double(), A.to(float_dtype).double()
            costs.append((out + n_in) * fb / 8 + 6)
        else:
            z = zero and b < 8
            cb = qz.quantize_rows(B.T.contiguous(), b, group_size, z)
            ca = qz.quantize_rows(A, b, group_size, z)
            Bh = qz.dequantize_rows(cb.codes, cb.scale, cb.zero, b, group_size).T.double()
            Ah = qz.dequantize_rows(ca.codes, ca.scale, ca.zero, b, group_size).double()
            costs.append((out + n_in) * b / 8 + (4 if z else 2) * (ngA + ngB) + 4)
        dB, dA = Bh - Bd, Ah - Ad
        dAS = linalg.weigh(dA, Sigma)
        AhS = linalg.weigh(Ah, Sigma)
        # ‖δb âᵀ + b δaᵀ‖²_Σ = ‖δb‖² âΣâᵀ + ‖b‖² δaΣδaᵀ + 2 (δb·b)(âΣδaᵀ)
        e = (dB * dB).sum(0) * (AhS * Ah).sum(1) + nb2 * (dAS * dA).sum(1) + 2 * (dB * Bd).sum(0) * (AhS * dA).sum(1)
        errs.append(e.clamp_min(0))
    return costs, torch.stack(errs, 1)


def allocation_summary(type_keys: Sequence[str], bits: Sequence[Sequence[int]], max_rank: int) -> dict:
    """Bit allocation per module type and per rank position: kept directions, mean bits of the
    kept ones and a histogram of widths (0 = dropped)."""

    def hist(vals: Iterable[int]) -> dict:
        h: dict[str, int] = {}
        for v in vals:
            h[str(v)] = h.get(str(v), 0) + 1
        return dict(sorted(h.items(), key=lambda kv: int(kv[0])))

    by_type: dict[str, dict] = {}
    for t in sorted(set(type_keys)):
        vals = [b for tk, row in zip(type_keys, bits) if tk == t for b in row]
        kept = [b for b in vals if b > 0]
        by_type[t] = {
            "directions": len(vals),
            "kept": len(kept),
            "mean_bits": (sum(kept) / len(kept)) if kept else 0.0,
            "bits": hist(vals),
        }
    by_pos = []
    for p in range(max_rank):
        vals = [row[p] if p < len(row) else 0 for row in bits]
        kept = [b for b in vals if b > 0]
        by_pos.append(
            {
                "position": p,
                "kept": len(kept),
                "mean_bits": (sum(kept) / len(kept)) if kept else 0.0,
                "bits": hist(vals),
            }
        )
    allv = [b for row in bits for b in row]
    kept = [b for b in allv if b > 0]
    return {
        "directions": len(allv),
        "kept": len(kept),
        "mean_bits": (sum(kept) / len(kept)) if kept else 0.0,
        "bits": hist(allv),
        "by_type": by_type,
        "by_position": by_pos,
    }


def direction_bits(manifest: dict) -> list[list[int]] | None:
    """Bits of every rank direction of every module (0: not stored) for forms whose ``A.{i}``
    rows are module i's rank directions (``Form.direction_rows``); else None."""
    cls = REGISTRY.get(manifest["form"])
    if cls is None or not cls.direction_rows:
        return None
    fb = _FLOAT_BITS[manifest["dtype"]]
    st = qz.Storage.from_json(manifest.get("storage"))
    mods = [ModuleInfo.from_json(m) for m in manifest["modules"]]
    ranks = cls.stored_ranks(mods, config_from_json(cls, manifest["config"]), manifest["state"])
    out = []
    for m, k in zip(mods, ranks):
        tq = st.tensors.get(f"A.{len(out)}") if st is not None else None
        bits = tq.row_bits(k) if tq is not None else [fb] * k
        out.append(bits + [0] * max(0, m.rank - k))
    return out


def describe_storage(manifest: dict) -> dict:
    """The bit allocation a container's manifest records, for reports: per stored tensor (bits,
    or a histogram of its rows' bits) and, for svd/lora, per module type and per rank position
    (:func:`allocation_summary`; 0 = a direction not stored)."""
    fb = _FLOAT_BITS[manifest["dtype"]]
    st = qz.Storage.from_json(manifest.get("storage"))
    per_tensor: dict[str, object] = {}
    for n, tq in sorted((st.tensors if st is not None else {}).items()):
        if isinstance(tq.bits, int):
            per_tensor[n] = tq.bits
        else:
            h: dict[str, int] = {}
            for b in tq.bits:
                h[str(b)] = h.get(str(b), 0) + 1
            per_tensor[n] = h
    out: dict = {"float_bits": fb, "tensors": per_tensor}
    db = direction_bits(manifest)
    if db is not None:
        keys = [f"{m['stack']}.*.{m['type']}" if m.get("stack") is not None else m["type"] for m in manifest["modules"]]
        out.update(allocation_summary(keys, db, max((int(m["rank"]) for m in manifest["modules"]), default=0)))
    return out


@torch.no_grad()
def tensor_options(
    form: nn.Module,
    names: Sequence[str],
    levels: Sequence[int],
    group_size: int,
    float_dtype: torch.dtype,
    module_errors: Callable[[nn.Module, list[int]], Tensor],
    n_modules: int,
    rebuild: Callable[[dict[str, Tensor]], nn.Module] | None = None,
    axes: Callable[[str, tuple[int, ...]], int | None] | None = None,
) -> dict[str, list[tuple[int, float, float]]]:
    """Measured sensitivity of each stored float tensor: for each level (code bits or the float
    width), (bits, bytes, increase of the total squared error) when that tensor alone is stored at
    that level, the others kept in float. ``module_errors(form, idx)`` returns the squared errors
    of modules ``idx``. A tensor that is a view of a form parameter is perturbed in place and only
    the modules whose factors depend on it (found by autograd) are re-evaluated; any other tensor
    (computed by ``form.tensors()``, e.g. a scaled bank) through ``rebuild(tensors)`` — the form
    rebuilt from its stored tensors with that one replaced — and every module. Without
    ``rebuild`` such tensors are skipped."""
    pmap = qz.parameter_map(form)
    stored = {n: t.detach().clone() for n, t in form.tensors().items()}  # type: ignore[operator]
    base = module_errors(form, list(range(n_modules))).double()
    deps: dict[int, list[int]] = {}
    plist = [p for _, _, p in pmap.values() if p.requires_grad]
    if plist:
        with torch.enable_grad():
            for i in range(n_modules):
                B, A = form.factors(i)  # type: ignore[operator]
                if not (B.requires_grad or A.requires_grad):
                    continue
                gs = torch.autograd.grad(B.sum() + A.sum(), plist, allow_unused=True)
                for p, g in zip(plist, gs):
                    if g is not None:
                        deps.setdefault(id(p), []).append(i)
    fb = qz.float_bits(float_dtype)
    every = list(range(n_modules))
    out: dict[str, list[tuple[int, float, float]]] = {}
    for name in names:
        if name not in stored or (name not in pmap and rebuild is None):
            continue
        keep = stored[name]
        shape = tuple(keep.shape)
        ax = axes(name, shape) if axes else None
        ax = qz.group_axis(shape) if ax is None else ax
        opts = []
        for b in levels:
            tq = None if b == fb else qz.TensorQuant(b, ax, group_size)
            xq = keep.to(float_dtype).float() if tq is None else qz.roundtrip(keep, tq, float_dtype)
            if name in pmap:
                p = pmap[name][2]
                orig = p.detach().clone()
                p.copy_(xq.to(p.dtype))
                idx = deps.get(id(p), every)
                e = float(module_errors(form, idx).double().sum() - base[idx].sum())
                p.copy_(orig)
            else:
                probe = rebuild({**stored, name: xq})  # type: ignore[misc]
                e = float(module_errors(probe, every).double().sum() - base.sum())
            opts.append((b, float(qz.stored_bytes(shape, tq, float_dtype) + qz.header_cost(name, tq)), max(e, 0.0)))
        out[name] = opts
    return out


# ----------------------------------------------------------------------------- the search
def fit_quantised(
    req: FitRequest,
    *,
    quant: str,
    group_size: int,
    metrics_fn: Callable[[Form, int], dict] | None = None,
    command: str | None = None,
    auto_report: dict | None = None,
) -> Built:
    """``fit_to_budget`` under ``--quant`` for distillation: the form carries its storage
    (``form.quant_storage``, so every later ``container.build`` stores it quantised) and is seen
    through the straight-through fake quantiser (:func:`adaptzip.quant.attach_fake_quant`), so
    distillation trains the latent floats for what will be stored (quantisation-aware) and every
    metric measured on it describes the stored container. ``quant='auto'``: the bits (and ranks)
    are first chosen by :func:`quant_auto` on the (Σ-weighted, when statistics exist)
    weight-space error; its report goes into ``auto_report``."""
    if quant == "auto":  # compress has checked that a budget is given

        def weighed(f: Form, size: int) -> dict:  # the header reservation of metrics_fn, with the real error
            rel = fit.evaluate(f, req.adapter, req.ctx).rel_error
            return {**(metrics_fn(f, size) if metrics_fn is not None else {}), "rel_error": rel}

        built, rep = quant_auto(req, group_size, weighed, command)
        if auto_report is not None:
            auto_report.clear()
            auto_report.update(rep)
    else:
        built = fit_to_budget(req, quant=quant, group_size=group_size, metrics_fn=metrics_fn, command=command)
    storage = qz.Storage.from_json(built.manifest.get("storage"))
    if storage is not None:
        built.form.quant_storage = storage
        qz.attach_fake_quant(built.form, storage, req.dtype)
        built.form.eval()
    return built


def storage_summary(manifest: dict) -> dict:
    """The compress result's ``quant`` entry: scheme, group size, a histogram of the stored float
    tensors' row bits and the bit allocation (:func:`describe_storage`)."""
    st = manifest["storage"]
    hist: dict[str, int] = {}
    for t in st["tensors"].values():
        for b in [t["bits"]] if isinstance(t["bits"], int) else t["bits"]:
            hist[str(b)] = hist.get(str(b), 0) + 1
    return {
        "scheme": st["scheme"],
        "group_size": st["group_size"],
        "quantised_tensors": len(st["tensors"]),
        "row_bits": dict(sorted(hist.items(), key=lambda kv: int(kv[0]))),
        "bits": describe_storage(manifest),
    }


def _build(req: FitRequest, form: Form, storage: qz.Storage, command: str | None, metrics: dict | None = None) -> Built:
    tensors, manifest = ct.build(form, req.adapter, req.dtype, metrics=metrics, command=command, storage=storage)
    return Built(form, tensors, manifest, ct.serialized_size(tensors, manifest))


def direction_candidates(
    req: FitRequest, dirs: Directions, target: int, group_size: int, command: str | None, only: str | None = None
) -> list[tuple[str, qz.Storage, Built]]:
    """A form with rank directions (``dirs``) under ``--quant auto``: every direction is dropped or stored at 2/3/4/8 bits or the
    container float width (``mixed``), or all kept directions at 2 or 3 bits; each fitted so that
    its real file fits ``target``. Returns (label, storage, built) per candidate that fits."""
    adapter, cls, config, ctx, dt = req.adapter, req.form_cls, req.config, req.ctx, req.dtype
    fbits = qz.float_bits(dt)
    levels = list(qz.AUTO_LEVELS) + [fbits]
    key = ("quant-auto-options", cls.name, id(adapter), repr(config), group_size, fbits)
    if key not in ctx.cache:
        ctx.cache[key] = [
            direction_options(B, A, ctx.sigma(m), levels, group_size, dt)
            for (B, A), m in zip(dirs.table, adapter.modules)
        ]
    tabs = ctx.cache[key]
    empty = cls.fit(adapter, dirs.with_ranks([0] * len(adapter.modules)), ctx)
    overhead = _build(req, empty, None, command).size + 220 * len(adapter.modules)
    out = []
    for label, allowed in (("mixed", levels), ("2-bit", [2]), ("3-bit", [3])):
        if only is not None and only != label:
            continue
        cols = [0] + [1 + levels.index(b) for b in allowed]
        opts = [[[(costs[c], float(errs[i, c])) for c in cols] for i in range(errs.shape[0])] for costs, errs in tabs]

        def attempt(payload: int, cols=cols, opts=opts, label=label):
            lv, spent = allocate_levels(opts, payload, prefix=True)
            bits = [[levels[cols[j] - 1] for j in row if j > 0] for row in lv]
            form = cls.fit(adapter, dirs.with_ranks([len(b) for b in bits]), ctx)
            plan = {}
            for i, b in enumerate(bits):
                if not b or all(x == fbits for x in b):
                    continue
                bb: int | tuple[int, ...] = b[0] if len(set(b)) == 1 else tuple(b)
                plan[f"A.{i}"] = qz.TensorQuant(bb, 1, group_size)
                plan[f"B.{i}"] = qz.TensorQuant(bb, 0, group_size)
            storage = qz.Storage("auto", group_size, plan)
            built = _build(req, form, storage, command)
            return (label, storage, built), built.size, int(spent)

        best = fit_within(target, overhead, attempt)
        if best is not None:
            out.append(best)
    return out


def tensor_candidate(
    req: FitRequest, form: Form, target: int, group_size: int, command: str | None
) -> tuple[str, qz.Storage, Built] | None:
    """Any form under ``--quant auto``: bits per stored float tensor (2/3/4/8 or the container
    width) by measured sensitivity (error increase when that tensor alone is quantised), greedy
    by error reduction per byte from the all-2-bit start, within ``target``."""
    dt = req.dtype
    fbits = qz.float_bits(dt)
    levels = list(qz.AUTO_LEVELS) + [fbits]
    specs = form.tensor_specs(form.modules_info, form.config, form.state_info)
    names = sorted(n for n, (shape, d) in specs.items() if d is None and math.prod(shape) > 0)
    tg = fit.targets(req.adapter, req.ctx)

    def module_errors(f: Form, idx: list[int]) -> torch.Tensor:
        errs = [linalg.sq_error(tg[i].B, tg[i].A, *f.factors(i), tg[i].Sigma) for i in idx]
        return torch.stack(errs) if errs else torch.zeros(0)

    def rebuild(tensors: dict[str, torch.Tensor]) -> Form:
        return type(form).from_tensors(form.modules_info, form.config, form.state_info, tensors)

    form.train()  # forms that keep source tensors verbatim switch to their parameters
    own = form.tensors()
    axis_of = {}
    for n in names:
        ax = form.quant_axis(n, tuple(specs[n][0]))
        axis_of[n] = qz.choose_axis(own[n], 4, group_size, False, dt) if ax is None else ax
    sens = tensor_options(
        form, names, levels, group_size, dt, module_errors, len(tg), rebuild, lambda n, _shape: axis_of[n]
    )
    form.eval()
    if not sens:
        return None
    order = sorted(sens)
    items = [sorted(((c, e, b) for b, c, e in sens[n]), key=lambda t: (t[0], t[1])) for n in order]
    opts = [[[(c - it[0][0], e) for c, e, _ in it] for it in items]]  # one group, no prefix; costs above the cheapest
    base = sum(it[0][0] for it in items)

    def plan_for(chosen: list[int]) -> qz.Storage:
        plan = {}
        for n, it, j in zip(order, items, chosen):
            b = it[j][2]
            if b != fbits:
                plan[n] = qz.TensorQuant(b, axis_of[n], group_size)
        return qz.Storage("auto", group_size, plan)

    overhead = _build(req, form, plan_for([0] * len(order)), command).size - base  # beyond the estimates

    def attempt(extra: int):
        lv, spent = allocate_levels(opts, extra, prefix=False)
        storage = plan_for(lv[0])
        built = _build(req, form, storage, command)
        return ("per-tensor", storage, built), built.size, int(base + spent)

    # the allowance is what lies beyond the all-2-bit start: fit_within sees that start as overhead
    return fit_within(target, overhead + base, attempt, tries=6)


def quant_auto(
    req: FitRequest, group_size: int, metrics_fn: Callable[[Form, int], dict], command: str | None
) -> tuple[Built, dict]:
    """``--quant auto``: every candidate of the module docstring is measured as stored
    (dequantised); the lowest error wins. The manifest records the chosen bits as its
    ``storage`` entries (scheme ``auto``); the candidates go in the report. Returns (built,
    report)."""
    budget = req.budget

    def relabel(b: Built) -> Built:  # int8/int4 → auto: the same length, the same bytes
        st = qz.Storage.from_json(b.manifest.get("storage"))
        storage = qz.Storage("auto", group_size, dict(st.tensors) if st is not None else {})
        return _build(req, b.form, storage, command, metrics=b.manifest["metrics"])

    cands: list[tuple[float, str, Built]] = []  # (rel_error, label, built)
    fixed: list[tuple[str, Form]] = []
    metrics_len = 0
    for scheme in ("none", "int8", "int4"):
        # "none" has no storage section of its own: leave room for the one auto adds
        sub = req.but(budget=budget - (96 if scheme == "none" else 0))
        try:
            b = relabel(fit_to_budget(sub, metrics_fn=metrics_fn, command=command, quant=scheme, group_size=group_size))
        except OptionError:
            continue
        fixed.append((scheme, b.form))
        metrics_len = max(metrics_len, len(json.dumps(b.manifest["metrics"], separators=(",", ":"))))
        if b.size <= budget:
            cands.append((float(b.manifest["metrics"]["rel_error"]), scheme, b))

    dirs = req.form_cls.directions(req.adapter, req.config, req.ctx)
    if not fixed and dirs is None:
        # a form that cannot choose its configuration for a size (e.g. a lossless repack): fit it
        # as configured; its bits per tensor are then what makes it fit
        fixed.append(("configured", req.form_cls.fit(req.adapter, req.config, req.ctx)))

    def finish(f: Form, storage: qz.Storage) -> Built:
        first = _build(req, f, storage, command)
        return _build(
            req, f, storage, command, metrics=metrics_fn(ct.decoded_form(f, first.tensors, first.manifest), first.size)
        )

    labels = ["mixed", "2-bit", "3-bit"] if dirs is not None else [f"per-tensor({s})" for s, _ in fixed]
    for label in labels:

        def attempt(target: int, label=label):
            if dirs is not None:
                got = direction_candidates(req, dirs, target, group_size, command, label)
                c = got[0] if got else None
            else:
                c = tensor_candidate(req, dict(fixed)[label[len("per-tensor(") : -1]], target, group_size, command)
            if c is None:
                return None
            b = finish(c[2].form, c[1])
            return b, b.size, target

        got = fit_within(budget, metrics_len + 64, attempt, tries=4, margin=32, give_back=False)
        if got is not None:
            cands.append((float(got.manifest["metrics"]["rel_error"]), label, got))
    if not cands:
        raise OptionError(req.adapter.path, f"--quant auto: form {req.form_cls.name} does not fit {budget} bytes")
    order = sorted(range(len(cands)), key=lambda j: (cands[j][0], cands[j][2].size, j))
    report = {
        "chosen": cands[order[0]][1],
        "considered": [{"candidate": cands[j][1], "bytes": cands[j][2].size, "rel_error": cands[j][0]} for j in order],
    }
    return cands[order[0]][2], report
