"""The compress pipeline: one adapter in, one container out.

    source LoRA ──▶ (calibration session: Σ, teacher caches)        distill.Calibration
                ──▶ fit within the budget (Σ-weighted)              budget.fit_to_budget / qsearch
                ──▶ measure + distil the form and its same-bytes    distill.Calibration.measure
                    svd baseline (weight errors without a teacher)
                ──▶ container, written atomically                   container.write
                ──▶ CompressResult

With a teacher, distillation runs once, after the budget is settled: the fit reserves header room
for every metric at its longest JSON length (:func:`metrics_template`), so the metrics measured
afterwards always fit. ``--to auto`` (:func:`auto_select`) fits every form, distils the most
promising few and keeps the lowest eval KL.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import container as ct
from . import fit, qsearch
from .adapter import DTYPE_NAMES, Adapter, load_adapter
from .budget import Built, FitRequest, fit_to_budget, parse_budget, resolve_dtype, svd_baseline
from .errors import AdaptzipError, OptionError
from .fileio import check_output, json_clean, removed_on_failure
from .forms import BASELINE, REGISTRY, FitContext, Form, get_form, is_baseline, lossless_form, make_config
from .forms.base import config_to_json
from .options import CalibrationOptions, CompressResult, FitOptions, QuantOptions, RunOptions
from .trainer import probe_rates

_PLACEHOLDER = -1.2345678901234567e-300  # the longest JSON float: reserves header room for metrics
MEASURE_KEYS = (
    "kl_before",
    "kl_after",
    "top1_agreement_before",
    "top1_agreement",
    "improvement_kept_before",
    "improvement_kept",
    "objective_before",
    "objective_after",
    "output_rel_error_before",
    "output_rel_error",
    "worst_module_output_rel_error",
    "worst_module",
    "distill_steps",
    "distill_lr",
    "distill_lr_final",
    "distill_lr_probe",
    "distill_stop",
    "distill_precision",
    "distill_best_step",
    "heldout_before",
    "heldout_after",
    "ppl_compressed_before",
    "ppl_compressed",
    "hidden_rel_mse_before",
    "hidden_rel_mse_after",
)
# Measured times: in the result (and --json), never in the container, whose bytes depend only on
# the inputs and --seed (formats/container.md §9).
TIMING_KEYS = ("distill_seconds", "distill_tokens_per_s")
REFERENCE_KEYS = (
    "task",
    "calib_tokens",
    "heldout_tokens",
    "eval_tokens",
    "eval_text",
    "weighted",
    "precision",
    "ppl_base",
    "ppl_source",
    "loss_base",
    "loss_source",
    "base_objective",
)
WEIGHT_KEYS = ("rel_error", "worst_module_rel_error", "svd_baseline_rel_error", "svd_baseline_bytes")
_AUTO_REASON_LEN = 300
_AUTO_BASELINE_KEYS = (
    "svd_baseline_kl_after",
    "svd_baseline_kl_before",
    "svd_baseline_top1_agreement",
    "svd_baseline_improvement_kept",
    "svd_baseline_bytes",
)
_ESSENTIAL = {
    "kl_before",
    "kl_after",
    "top1_agreement",
    "improvement_kept",
    "svd_baseline_kl_after",
    "rel_error",
    "worst_module_rel_error",
    "worst_module",
    "weighted",
}


def compress(
    lora_dir: str | Path,
    output: str | Path,
    *,
    to: str,
    budget: str | float | None,
    form_options: dict,
    fitting: FitOptions,
    calibration: CalibrationOptions | None,
    quant: QuantOptions,
    run: RunOptions,
) -> CompressResult:
    """See :func:`adaptzip.api.compress`."""
    t0 = time.perf_counter()
    if quant.scheme == "auto" and budget is None:
        raise OptionError(None, "--quant auto chooses bits for a size: give --budget too")
    teacher = calibration is not None and calibration.teacher
    if to == "auto" and (budget is None or not teacher):
        raise OptionError(
            None, "--to auto needs --budget and --base-model/--calib (forms are compared by their eval KL)"
        )
    adapter = load_adapter(lora_dir)
    output = Path(output)
    inputs = (
        []
        if calibration is None
        else [calibration.base_model, calibration.calib, calibration.eval_text, calibration.stats_file]
    )
    check_output(output, run.force, sources=(adapter.path, adapter.weights_file, *(Path(p) for p in inputs if p)))
    form_cls = None if to == "auto" else get_form(to)
    config = None if form_cls is None else make_config(form_cls, form_options)
    dt = resolve_dtype(fitting.dtype, adapter)
    budget_bytes = None if budget is None else parse_budget(budget, adapter.bytes)
    # the Σ file this run writes beside its output (by default) goes again if the command fails
    with removed_on_failure(stats_written_by(output, calibration, fitting)):
        cal, stats = calibration_session(adapter, output, calibration, fitting, run)
        torch.manual_seed(fitting.seed)
        ctx = FitContext(stats=stats, seed=fitting.seed, progress=run.progress, max_steps=fitting.steps)
        req = FitRequest(adapter, form_cls, config, budget_bytes, dt, ctx)
        fitb = (
            fit_to_budget
            if quant.scheme == "none"
            else functools.partial(qsearch.fit_quantised, quant=quant.scheme, group_size=quant.group_size)
        )
        auto_report: dict | None = None
        qauto: dict = {}
        if cal is not None:
            if quant.scheme == "auto" and form_cls is not None:
                fitb = functools.partial(fitb, auto_report=qauto)
            distil = Distillation(
                cal,
                fitb,
                calibration.steps,
                calibration.lr,
                run.command,
                Clock(calibration.seconds),
                most_steps=calibration.steps_most,
            )
        if form_cls is None:
            built, auto_report = auto_select(req, distil, n_distil=calibration.auto_distil)
        elif cal is not None:
            built = fit_and_distil(req, distil, baseline=fitting.baseline)
        else:
            metrics_fn = weight_metrics(req, quant, fitting.baseline, stats is not None)
            if quant.scheme == "auto":
                built, qauto = qsearch.quant_auto(req, quant.group_size, metrics_fn, run.command)
            else:
                built = fit_to_budget(
                    req, metrics_fn=metrics_fn, command=run.command, quant=quant.scheme, group_size=quant.group_size
                )
        form, tensors, manifest = built.form, built.tensors, built.manifest
        warnings = [] if budget_bytes is not None or form.lossless else size_warnings(req, built, form_options)
        if adapter.config_mismatch is not None:  # every tensor is converted; the source config misdescribes them
            warnings.insert(0, f"{adapter.path / 'adapter_config.json'}: {adapter.config_mismatch['message']}")
        written = ct.write(output, tensors, manifest)
    qinfo = qsearch.storage_summary(manifest) if "storage" in manifest else None
    if qinfo is not None and quant.scheme == "auto" and form_cls is not None:
        qinfo["auto"] = qauto
    return CompressResult(
        output=str(output),
        form=form.name,
        config=config_to_json(form.config),
        state=state_summary(form),
        dtype=DTYPE_NAMES[dt],
        source_bytes=adapter.bytes,
        bytes=written,
        stored_params=form.float_params(),
        source_params=adapter.n_params,
        metrics={**manifest["metrics"], **built.timings},
        quant=qinfo,
        auto=auto_report,
        sharing=form.sharing(form.modules_info, form.config, form.state_info, manifest["metrics"]),
        warnings=warnings,
        extras=calibration_extras(cal, form, adapter, ctx),
        seconds=time.perf_counter() - t0,
    )


def size_warnings(req: FitRequest, built: Built, form_options: dict) -> list[str]:
    """Without a budget no form may silently store more than the lossless repack of the same
    source in the same dtype (tensor bytes compared: headers differ by a few hundred bytes of
    metrics): with the form's defaults that is refused (the defaults did not suit this
    adapter); with options the user chose, it is said loudly."""
    lossless = lossless_form()
    ref = ct.build(lossless.fit(req.adapter, lossless.Config(), req.ctx), req.adapter, req.dtype)[0]
    limit, stored = payload_bytes(ref), payload_bytes(built.tensors)
    if stored <= limit:
        return []
    what = (
        f"the {built.form.name} container would store {stored} bytes of tensors, more than the lossless "
        f"{lossless.name} repack ({limit} bytes)"
    )
    if not any(v is not None for v in form_options.values()):
        raise OptionError(
            req.adapter.path, f"{what} with the form's default options; give --budget (e.g. --budget 0.25)"
        )
    return [f"{what}: give --budget to bound the size"]


def payload_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of a container's tensors (what a form stores; the header aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def weight_metrics(req: FitRequest, quant: QuantOptions, baseline: bool, weighted: bool):
    """``metrics_fn(form, size)`` of a fit without a teacher: the (Σ-weighted) weight errors and
    those of the same-bytes svd baseline."""
    adapter, ctx = req.adapter, req.ctx

    def metrics_fn(form: Form, size: int) -> dict:
        m: dict[str, Any] = {**fit.evaluate(form, adapter, ctx).to_json(), "weighted": weighted}
        if not baseline:
            return m
        if form.lossless:  # no same-bytes approximation to compare with
            m["svd_baseline_rel_error"], m["svd_baseline_bytes"] = None, None
        elif is_baseline(form) and req.budget is not None and quant.scheme == "none":
            # the budgeted baseline form is the baseline itself (same allocation at the same bytes)
            m["svd_baseline_rel_error"], m["svd_baseline_bytes"] = m["rel_error"], size
        else:
            base_form, base_size = svd_baseline(adapter, size, req.dtype, ctx)
            m["svd_baseline_rel_error"] = fit.evaluate(base_form, adapter, ctx).rel_error
            m["svd_baseline_bytes"] = base_size
        return m

    return metrics_fn


def state_summary(form: Form) -> dict:
    """The form's state for the result: per-module rank lists summarised (min, max, total, zero)."""
    s = dict(form.state_info)
    if isinstance(s.get("ranks"), list):
        r = s.pop("ranks")
        s["ranks"] = {
            "min": min(r, default=0),
            "max": max(r, default=0),
            "total": sum(r),
            "zero": sum(1 for x in r if x == 0),
        }
    return s


# ------------------------------------------------------------------ calibration
def default_stats_path(output: Path) -> Path:
    """``out.safetensors`` → ``out.stats.safetensors`` (next to the container)."""
    output = Path(output)
    stem = output.name[: -len(".safetensors")] if output.name.endswith(".safetensors") else output.name
    return output.with_name(stem + ".stats.safetensors")


def stats_written_by(output: Path, opts: CalibrationOptions | None, fitting: FitOptions) -> Path | None:
    """The Σ statistics file that :func:`calibration_session` will write (None when it writes none)."""
    if opts is None or not opts.teacher or fitting.stats is not None:
        return None
    if opts.stats_file is None:
        return default_stats_path(output)
    return None if Path(opts.stats_file).is_file() else Path(opts.stats_file)


def calibration_session(
    adapter: Adapter, output: Path, opts: CalibrationOptions | None, fitting: FitOptions, run: RunOptions
):
    """The calibration session (None without a base model) and the Σ to fit with.

    Without a base model, ``opts.stats_file`` alone gives a Σ-weighted fit (no distillation). With
    one, Σ comes from ``fitting.stats`` / an existing stats file or is computed and saved to the
    stats file: the exact Σ to ``--stats FILE``, else a sketch (:mod:`adaptzip.sigma`) to
    ``<output>.stats.safetensors``."""
    from . import calibrate as cb

    stats = fitting.stats
    if opts is None or (not opts.teacher and opts.stats_file is None):
        return None, stats
    if not opts.teacher:
        if stats is None:
            stats, _ = cb.load_stats(opts.stats_file, adapter)
        return None, stats
    from . import distill
    from .sigma import SKETCH_RANK

    save_to = stats_written_by(output, opts, fitting)
    if save_to is not None and opts.stats_file is None:
        check_output(save_to, run.force)
    cal = distill.prepare(
        adapter,
        opts.base_model,
        opts.calib,
        calib_tokens=opts.tokens,
        eval_text=opts.eval_text,
        stats=stats,
        stats_file=opts.stats_file,
        save_stats_to=save_to,
        device=opts.device,
        seq_len=opts.seq_len,
        batch_size=opts.batch_size,
        progress=run.progress,
        seed=fitting.seed,
        precision=opts.precision,
        sketch_rank=None if opts.stats_file is not None else SKETCH_RANK,  # --stats FILE: the exact Σ
    )
    return cal, cal.stats


def calibration_extras(cal, form: Form, adapter: Adapter, ctx: FitContext) -> dict:
    """Result-only facts of a calibrated compress (not in the manifest: per-module output
    errors ‖(ΔW−ΔŴ)X‖/‖ΔW X‖, Σ file, timings)."""
    if cal is None:
        return {}
    rep = fit.evaluate(form, adapter, ctx)
    return {
        "module_output_rel_errors": dict(zip((m.name for m in adapter.modules), json_clean(rep.module_rel_errors))),
        "stats_file": cal.stats_info.get("saved_to"),
        "timings": {**cal.timings, "threads": torch.get_num_threads()},
        "precision": {"used": cal.precision, "why": cal.precision_reason},
    }


def metrics_template(adapter: Adapter, baseline: bool, auto: bool = False) -> dict:
    """Metrics with every value at its longest JSON length: the header room to reserve."""
    longest = max((m.name for m in adapter.modules), key=len)
    strings = {  # the longest value of the metrics that are not one float
        "worst_module": longest,
        "distill_lr_probe": {f"{lr:.3g}": _PLACEHOLDER for lr in probe_rates()},
        "distill_stop": "converged",
        "distill_precision": "fp32",
    }
    t: dict[str, Any] = dict.fromkeys(REFERENCE_KEYS + MEASURE_KEYS + WEIGHT_KEYS, _PLACEHOLDER)
    if baseline:
        t.update(dict.fromkeys(("svd_baseline_" + k for k in MEASURE_KEYS), _PLACEHOLDER))
        t.update({"svd_baseline_" + k: v for k, v in strings.items()})
    t.update(strings)
    t.update({"task": "hidden", "eval_text": "calib", "weighted": False, "precision": "fp32"})
    if auto:
        t.update(dict.fromkeys(_AUTO_BASELINE_KEYS, _PLACEHOLDER))
        t["auto_candidates"] = dict.fromkeys((n for n, c in REGISTRY.items() if c.auto_candidate), _PLACEHOLDER)
        t["auto_reason"] = "x" * _AUTO_REASON_LEN
    return t


class Clock:
    """``--calib-time``: one wall-clock budget for every distillation of a compress (fits and
    measurements are not counted). Each run gets an equal share of what is left (:meth:`share`),
    so time a run did not need (it converged) goes to the runs after it. ``seconds`` None: no
    budget."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.spent = 0.0

    def share(self, runs_left: int) -> float | None:
        """Seconds for the next of ``runs_left`` distillations (None without a budget)."""
        if self.seconds is None:
            return None
        return max(0.0, self.seconds - self.spent) / max(runs_left, 1)

    def spend(self, metrics: dict, prefix: str = "") -> None:
        """Count the distillation seconds a measurement reports."""
        self.spent += float(metrics.get(prefix + "distill_seconds") or 0.0)


@dataclass(frozen=True)
class Distillation:
    """How forms are distilled in this run: the calibration session, the fit to use (plain or
    quantisation-aware), the step cap and learning rate (None: probed), the recorded command
    line and the wall-clock budget shared by every distillation of the run."""

    cal: Any  # distill.Calibration (imported lazily: torch-heavy)
    fit: Callable[..., Built]
    steps: int
    lr: float | None
    command: str | None
    clock: Clock = dataclasses.field(default_factory=lambda: Clock(None))
    most_steps: int | None = None  # how far the step cap may grow while the run still improves


def fit_and_distil(
    req: FitRequest, distil: Distillation, *, baseline: bool = True, auto: bool = False, runs_left: int = 1
) -> Built:
    """Fit to the budget with header room reserved for the metrics, then measure + distil the
    form (and the same-bytes svd baseline) and build the container. ``runs_left``: distillations
    still to come in this compress, this one included (the form's own baseline aside), for the
    share of ``--calib-time``."""
    cal, adapter, ctx, dtype = distil.cal, req.adapter, req.ctx, req.dtype
    template = metrics_template(adapter, baseline and not auto, auto)
    built = distil.fit(req, metrics_fn=lambda f, s: template, command=distil.command)
    form, size = built.form, built.size
    with_baseline = baseline and not auto and not is_baseline(form)
    m: dict[str, Any] = {
        **cal.reference_metrics(),
        **cal.measure(
            form,
            ctx,
            dtype,
            steps=distil.steps,
            most_steps=distil.most_steps,
            lr=distil.lr,
            seconds=distil.clock.share(runs_left + with_baseline),
        ),
    }
    distil.clock.spend(m)
    m["rel_error"] = m["output_rel_error"] if cal.stats is not None else fit.evaluate(form, adapter, ctx).rel_error
    m["worst_module_rel_error"] = m["worst_module_output_rel_error"]
    if baseline and not auto:
        if is_baseline(form):  # the form is its own same-bytes baseline
            m.update({"svd_baseline_" + k: m[k] for k in MEASURE_KEYS + TIMING_KEYS if k in m})
            m["svd_baseline_bytes"] = size
        else:
            b, bsize = svd_baseline(adapter, size, dtype, ctx)
            m.update(
                cal.measure(
                    b,
                    ctx,
                    dtype,
                    steps=distil.steps,
                    most_steps=distil.most_steps,
                    lr=distil.lr,
                    seconds=distil.clock.share(runs_left),
                    prefix="svd_baseline_",
                )
            )
            distil.clock.spend(m, "svd_baseline_")
            m["svd_baseline_bytes"] = bsize
        m["svd_baseline_rel_error"] = m["svd_baseline_output_rel_error"]
    return build_within(req, form, m, distil.command)


def build_within(req: FitRequest, form: Form, metrics: dict, command: str | None) -> Built:
    """Build the container; if (unexpectedly) over the budget, drop the least essential metrics.
    Measured times (:data:`TIMING_KEYS`, with any prefix) go to ``Built.timings``, not the manifest."""
    metrics = dict(metrics)
    timings = {k: metrics.pop(k) for k in list(metrics) if k.endswith(TIMING_KEYS)}
    while True:
        tensors, manifest = ct.build(form, req.adapter, req.dtype, metrics=metrics, command=command)
        size = ct.serialized_size(tensors, manifest)
        droppable = [k for k in metrics if k not in _ESSENTIAL]
        if req.budget is None or size <= req.budget or not droppable:
            return Built(form, tensors, manifest, size, timings)
        metrics.pop(droppable[-1])


def auto_select(
    req: FitRequest, distil: Distillation, *, n_distil: int = 3, forms: list[str] | None = None
) -> tuple[Built, dict]:
    """``--to auto``: every registered form (or ``forms``) is fitted to the budget (Σ-weighted) and
    measured on the eval split — weight-space output error and eval divergence, cheap; the
    ``n_distil`` most promising (the svd baseline always among them, then the lowest eval KL) are
    distilled; the form with the lowest final eval KL (objective, for encoders) wins: distilled
    candidates count with their after-distillation value, the others with their start value, so
    the choice is never worse than another tried form on its own eval KL. Returns (built, report)
    with report = {chosen, reason, candidates: [...]}."""
    from .distill import round_to

    adapter, ctx, dtype, cal = req.adapter, req.ctx, req.dtype, distil.cal
    names = sorted(n for n, c in REGISTRY.items() if c.auto_candidate) if forms is None else list(forms)
    rows: list[dict] = []
    template = metrics_template(adapter, False, auto=True)  # the same header reservation as the final container
    for name in names:
        cls = REGISTRY[name]
        row: dict[str, Any] = {"form": name}
        try:
            built = distil.fit(
                req.but(form_cls=cls, config=cls.Config()), metrics_fn=lambda f, s: template, command=distil.command
            )
        except AdaptzipError as e:
            row["skipped"] = e.cause
            rows.append(row)
            continue
        form = built.form
        round_to(form, dtype)
        rep = fit.evaluate(form, adapter, ctx)
        form.to(cal.base.device)
        ev = cal.evaluate(form)
        form.cpu()
        row.update(
            bytes=built.size,
            output_rel_error=rep.rel_error,
            kl_before=ev.get("kl"),
            top1_before=ev.get("top1"),
            score_before=ev["objective"],
            distilled=False,
        )
        rows.append(row)
    fitted = [r for r in rows if "skipped" not in r]
    if not fitted:
        why = "; ".join(f"{r['form']}: {r['skipped']}" for r in rows)
        raise OptionError(adapter.path, f"--to auto: no form fits {req.budget} bytes ({why})")
    order = sorted(fitted, key=lambda r: (r["form"] != BASELINE, r["score_before"]))
    shortlist = order[: max(1, n_distil)]
    best: tuple[dict, Built] | None = None
    for j, r in enumerate(shortlist):
        cls = REGISTRY[r["form"]]
        built = fit_and_distil(
            req.but(form_cls=cls, config=cls.Config()), distil, auto=True, runs_left=len(shortlist) - j
        )
        mt = built.manifest["metrics"]
        r.update(
            distilled=True,
            bytes=built.size,
            kl_after=mt.get("kl_after"),
            top1_after=mt.get("top1_agreement"),
            improvement_kept=mt.get("improvement_kept"),
            score_after=mt["objective_after"],
        )
        if best is None or r["score_after"] < best[0]["score_after"]:
            best = (r, built)
    for r in fitted:
        r["score"] = r["score_after"] if r["distilled"] else r["score_before"]
    win = min(fitted, key=lambda r: r["score"])
    if not win["distilled"]:  # a start beat every distilled candidate: take it as fitted
        cls = REGISTRY[win["form"]]
        chosen = fit_and_distil(
            req.but(form_cls=cls, config=cls.Config()), dataclasses.replace(distil, steps=0), auto=True
        )
    else:
        chosen = best[1]
    base_row = next((r for r in fitted if r["form"] == BASELINE), None)
    metric = "KL" if cal.task in ("lm", "cls") else "divergence"
    reason = (
        f"lowest eval {metric} ({win['score']:.4g}) among {len(fitted)} forms that fit {req.budget} bytes; "
        f"{len(shortlist)} distilled ({', '.join(r['form'] for r in shortlist)})"
    )
    if base_row is not None and win["form"] != BASELINE:
        reason += f"; {BASELINE} at the same budget: {base_row['score']:.4g}"
    report = {"chosen": win["form"], "reason": reason, "candidates": rows}
    metrics = dict(chosen.manifest["metrics"])
    if base_row is not None and base_row.get("distilled"):
        metrics.update(
            svd_baseline_kl_after=base_row.get("kl_after"),
            svd_baseline_kl_before=base_row.get("kl_before"),
            svd_baseline_top1_agreement=base_row.get("top1_after"),
            svd_baseline_improvement_kept=base_row.get("improvement_kept"),
            svd_baseline_bytes=base_row["bytes"],
        )
    metrics["auto_candidates"] = json_clean({r["form"]: r["score"] for r in fitted})
    metrics["auto_reason"] = reason[:_AUTO_REASON_LEN]
    return build_within(req.but(form_cls=type(chosen.form)), chosen.form, metrics, distil.command), report
