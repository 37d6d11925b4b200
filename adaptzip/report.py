"""Size and accuracy reports of containers: tables, matplotlib charts, ``report.md`` + ``report.json``.

For each container: bytes and ratios (vs the source weights file, and vs an fp16 LoRA of the
source's ranks: Σ_m r_m (in_m + out_m) · 2 bytes of factors), stored parameters, the per-module
relative error table (worst first), accuracy metrics when calibration ran, and the bit allocation
when the manifest has a ``storage`` section. Errors come from the manifest (``metrics``), or,
with ``against`` (the source LoRA folder), are recomputed from the source for every module:
``fit.evaluate(container.form(), adapter, ctx)`` — so a container's claims can be checked.

Charts (PNG, Agg backend, no pyplot state): error per layer and module type; error vs bytes with
the svd baseline of the same bytes (all containers of one source on one chart, with their Pareto
front); singular-value spectra of source vs compressed for the worst modules (needs ``against``).
Slightly over ~500 lines: the tables, the three charts and the writer belong to one command.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import budget, fit, linalg
from . import container as ct
from .adapter import Adapter, load_adapter
from .errors import OptionError
from .fileio import atomic_dir, atomic_file, check_output, json_clean
from .forms import FitContext, get_form
from .forms.base import config_from_json

ACCURACY_KEYS = (
    "kl_before",
    "kl_after",
    "top1_agreement",
    "top1_before",
    "top1_after",
    "improvement_kept",
    "svd_baseline_kl_after",
    "svd_baseline_top1_agreement",
    "eval_loss_before",
    "eval_loss_after",
)
_ACCURACY_RE = re.compile(r"^(kl_|top1|.*_kl_|.*agreement|improvement|eval_loss|nll)")


def fp16_lora_bytes(modules) -> int:
    """Bytes of the source's LoRA factors stored in fp16: Σ_m r_m (in_m + out_m) · 2."""
    return sum(m.rank * (m.in_features + m.out_features) for m in modules) * 2


def _params(c: ct.Container) -> dict:
    cls = get_form(c.form_name)
    config = config_from_json(cls, c.manifest["config"])
    specs = cls.tensor_specs(c.modules, config, c.manifest["state"])
    shared = c.shared_names

    def n(s) -> int:
        return math.prod(int(d) for d in s)

    return {
        "stored": sum(n(s) for k, (s, dt) in specs.items() if dt is None and k not in shared),
        "shared": sum(n(s) for k, (s, dt) in specs.items() if dt is None and k in shared),
        "index_bytes": sum(
            n(s) * torch.empty(0, dtype=dt).element_size() for s, dt in specs.values() if dt is not None
        ),
        "source": sum(m.rank * (m.in_features + m.out_features) for m in c.modules),
    }


def _storage(st: Any, c: ct.Container | None = None) -> dict | None:
    """A summary of the quantisation ``storage`` section (formats/quantization.md): the scheme, and
    how many tensors / rows / values are stored at each bit width (a per-row ``bits`` list counts
    rows; values need the logical shapes, taken from the form's tensor specs)."""
    if not isinstance(st, dict):
        return None
    shapes: dict[str, tuple] = {}
    if c is not None:
        cls = get_form(c.form_name)
        shapes = {
            k: tuple(s)
            for k, (s, _) in cls.tensor_specs(
                c.modules, config_from_json(cls, c.manifest["config"]), c.manifest["state"]
            ).items()
        }
    tensors: Counter = Counter()
    rows: Counter = Counter()
    values: Counter = Counter()
    for name, t in (st.get("tensors") or {}).items():
        if not isinstance(t, dict):
            continue
        bits = t.get("bits")
        shape = shapes.get(name)
        numel = math.prod(shape) if shape else 0
        if isinstance(bits, list):
            tensors["per-row"] += 1
            per_row = numel // len(bits) if bits and numel else 0
            for b in bits:
                rows[str(b)] += 1
                values[str(b)] += per_row
        else:
            tensors[str(bits)] += 1
            values[str(bits)] += numel
    total = sum(values.values())
    mean = sum(int(b) * v for b, v in values.items()) / total if total else None
    return {
        "scheme": st.get("scheme"),
        "group_size": st.get("group_size"),
        "tensors": sum(tensors.values()),
        "tensors_by_bits": dict(tensors),
        "rows_by_bits": dict(rows),
        "values_by_bits": dict(values),
        "mean_bits": mean,
        "allocation": st.get("allocation"),
    }


def _accuracy(metrics: dict) -> dict:
    return {
        k: v
        for k, v in metrics.items()
        if isinstance(v, (int, float))
        and not isinstance(v, bool)
        and (k in ACCURACY_KEYS or _ACCURACY_RE.match(k))
        and not k.startswith("svd_baseline_rel")
    }


def _stored_ranks(c: ct.Container) -> list[int | None]:
    r = c.manifest.get("state", {}).get("ranks")
    return list(r) if isinstance(r, list) and len(r) == len(c.modules) else [None] * len(c.modules)


def container_report(c: ct.Container, adapter: Adapter | None = None, ctx: FitContext | None = None) -> dict:
    """Facts and errors of one container (recomputed from ``adapter`` when given). The container
    is verified first (every invariant of formats/container.md, tensors included): a corrupted
    or edited container is refused, never reported on."""
    c.verify()
    try:
        return _container_report(c, adapter, ctx)
    finally:
        c.release()  # a report of many containers holds one container's tensors at a time


def _container_report(c: ct.Container, adapter: Adapter | None, ctx: FitContext | None) -> dict:
    man = c.manifest
    met = man.get("metrics") or {}
    src_bytes = man["source"]["bytes"]
    zoo = met.get("zoo") or {}
    shared = None
    share = 0.0
    if man.get("shared"):
        try:
            sp = c.shared_path
            shared = {
                "file": man["shared"]["file"],
                "sha256": man["shared"]["sha256"],
                "bytes": sp.stat().st_size,
                "path": str(sp),
            }
        except ct.ContainerError as e:
            shared = {"file": man["shared"]["file"], "sha256": man["shared"]["sha256"], "bytes": None, "error": e.cause}
        share = zoo.get("shared_share_bytes") or (shared["bytes"] or 0)
    bytes_ = c.bytes
    eff = bytes_ + share  # this container's bytes plus its share of the shared file
    res: dict[str, Any] = {
        "path": str(c.path),
        "form": c.form_name,
        "config": man["config"],
        "dtype": man["dtype"],
        "source": {
            "name": man["source"]["name"],
            "sha256": man["source"]["sha256"],
            "bytes": src_bytes,
            "base_model": man["source"].get("base_model"),
        },
        "bytes": bytes_,
        "effective_bytes": eff,
        "ratio_source": eff / src_bytes if src_bytes else None,
        "fp16_lora_bytes": fp16_lora_bytes(c.modules),
        "ratio_fp16_lora": eff / fp16_lora_bytes(c.modules),
        "params": _params(c),
        "shared": shared,
        "accuracy": _accuracy(met),
        "storage": _storage(man.get("storage"), c),
        "metrics": met,
    }
    ranks = _stored_ranks(c)
    if adapter is not None:
        ctx = ctx or FitContext()
        form = c.form()
        rep = fit.evaluate(form, adapter, ctx)
        errs: list[float | None] = list(rep.module_rel_errors)
        res.update(rel_error=rep.rel_error, errors_from="recomputed from " + str(adapter.path))
        res["_form"] = form
    else:
        me = met.get("module_rel_errors")
        errs = list(me) if isinstance(me, list) and len(me) == len(c.modules) else [None] * len(c.modules)
        res.update(rel_error=met.get("rel_error"), errors_from="manifest")
    res["svd_baseline_rel_error"] = met.get("svd_baseline_rel_error")
    res["svd_baseline_bytes"] = met.get("svd_baseline_bytes")
    mods = [
        {
            "index": i,
            "name": m.name,
            "layer": m.layer,
            "type": m.type,
            "type_key": m.type_key,
            "rank": ranks[i],
            "source_rank": m.rank,
            "rel_error": errs[i],
        }
        for i, m in enumerate(c.modules)
    ]
    res["modules"] = sorted(mods, key=lambda d: (d["rel_error"] is None, -(d["rel_error"] or 0.0)))
    if all(e is None for e in errs):
        res["modules_note"] = (
            f"no per-module errors in the manifest (worst: {met.get('worst_module')} "
            f"{met.get('worst_module_rel_error')}); use --against LORA_DIR to recompute them"
        )
    return res


def _svd_curve(adapter: Adapter, points: list[int], dtype: torch.dtype, ctx: FitContext) -> list[dict]:
    """The svd baseline (global rank allocation) at several container sizes."""
    out = []
    for b in sorted(set(points)):
        try:
            form, size = budget.svd_baseline(adapter, b, dtype, ctx)
        except OptionError:
            continue  # below the container's fixed overhead
        out.append({"budget": b, "bytes": size, "rel_error": fit.evaluate(form, adapter, ctx).rel_error})
    return out


def report(
    containers: Sequence[str | Path],
    *,
    against: str | Path | None = None,
    out: str | Path | None = None,
    force: bool = False,
    max_spectra: int = 4,
    curve_points: int = 8,
) -> dict:
    """Report on containers; with ``out`` also write the folder ``out`` (``report.md``,
    ``report.json``, PNG charts), atomically: it must not exist unless ``force`` (then it is
    replaced whole). Every container is verified first (tensors included): a corrupted one is
    refused before anything is written.

    ``against``: the source LoRA folder of every container: errors, the same-bytes svd baseline,
    an svd error-vs-bytes curve and spectra are recomputed from it."""
    if not containers:
        raise OptionError(None, "report: give at least one container")
    cs = [ct.open_container(p) for p in containers]
    out_p = Path(out) if out is not None else None
    if out_p is not None:
        # the output is a folder, replaced whole: it must not exist (without --force) nor hold an input
        check_output(
            out_p, force, sources=tuple(c.path for c in cs) + ((Path(against),) if against else ()), folder=True
        )
    ad = None
    ctx = FitContext()
    if against is not None:
        ad = load_adapter(against)
        for c in cs:
            if c.manifest["source"]["sha256"] != ad.sha256:
                raise OptionError(
                    against,
                    f"is not the source of {c.path} (its weights sha256 {ad.sha256[:12]}… ≠ the container's source {c.manifest['source']['sha256'][:12]}…)",
                )
    reps = [container_report(c, ad, ctx) for c in cs]
    sources: dict[str, dict] = {}
    for r in reps:
        s = sources.setdefault(
            r["source"]["sha256"], {"name": r["source"]["name"], "bytes": r["source"]["bytes"], "containers": []}
        )
        s["containers"].append(r["path"])
    if ad is not None:
        for r, c in zip(reps, cs):
            form, size = budget.svd_baseline(ad, max(1, int(r["effective_bytes"])), c.dtype, ctx)
            r["svd_baseline_rel_error"] = fit.evaluate(form, ad, ctx).rel_error
            r["svd_baseline_bytes"] = size
        lo = min(r["effective_bytes"] for r in reps) / 2
        hi = ad.bytes
        pts = [int(lo * (hi / lo) ** (j / max(1, curve_points - 1))) for j in range(curve_points)] + [
            int(r["effective_bytes"]) for r in reps
        ]
        sources[ad.sha256]["svd_curve"] = _svd_curve(ad, pts, cs[0].dtype, ctx)
        for r in reps:
            r["spectra"] = _spectra(r, ad, max_spectra)
    result: dict[str, Any] = {
        "containers": reps,
        "sources": sources,
        "against": None if against is None else str(against),
    }
    if out_p is not None:
        result["files"] = _write(out_p, result)
    for r in reps:
        r.pop("_form", None)
    return result


def _spectra(r: dict, ad: Adapter, k: int) -> list[dict]:
    """σ of source and compressed updates (from the factors) for the k modules with the largest
    source updates ‖ΔW‖ — where most of the adapter's change, and of the error, lies."""
    form = r["_form"]
    out = []
    with torch.no_grad():
        norms = sorted(
            ((float(linalg.sq_norm(B, A)), i) for i, (_, B, A) in enumerate(ad.iter_factors())), reverse=True
        )
        for _, i in norms[:k]:
            B, A = ad.factors(ad.modules[i])
            Bc, Ac = form.factors(i)
            s_src = linalg.factored_svd(B, A).S if A.shape[0] else torch.zeros(0)
            s_c = linalg.factored_svd(Bc.detach(), Ac.detach()).S if Ac.shape[0] else torch.zeros(0)
            out.append(
                {
                    "module": ad.modules[i].name,
                    "source": [float(x) for x in s_src],
                    "compressed": [float(x) for x in s_c],
                }
            )
    return out


# ------------------------------------------------------------------ charts and files
def _fig(w: float = 7.0, h: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)[:60] or "x"


def _chart_errors(r: dict, path: Path) -> bool:
    mods = [m for m in r["modules"] if m["rel_error"] is not None]
    if not mods:
        return False
    fig = _fig()
    ax = fig.add_subplot(111)
    by_type: dict[str, list[tuple[int, float]]] = {}
    for m in mods:
        by_type.setdefault(m["type"], []).append((-1 if m["layer"] is None else m["layer"], m["rel_error"]))
    for t, pts in sorted(by_type.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (-1: no layer)")
    ax.set_ylabel("relative error ‖ΔW−ΔŴ‖/‖ΔW‖")
    ax.set_title(f"{Path(r['path']).name} ({r['form']}): error per layer and module type", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, path)
    return True


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    front, best = [], math.inf
    for b, e in sorted(points):
        if e < best:
            front.append((b, e))
            best = e
    return front


def _chart_pareto(src: dict, reps: list[dict], path: Path) -> bool:
    pts = [(r["effective_bytes"], r["rel_error"], r) for r in reps if r["rel_error"] is not None]
    if not pts:
        return False
    fig = _fig()
    ax = fig.add_subplot(111)
    curve = src.get("svd_curve")
    if curve:
        ax.plot(
            [p["bytes"] for p in curve],
            [p["rel_error"] for p in curve],
            "-",
            color="gray",
            label="svd baseline (recomputed)",
        )
    base = [
        (r["svd_baseline_bytes"], r["svd_baseline_rel_error"])
        for r in reps
        if r.get("svd_baseline_rel_error") is not None and r.get("svd_baseline_bytes")
    ]
    if base:
        ax.scatter([b for b, _ in base], [e for _, e in base], marker="x", color="gray", label="svd at the same bytes")
    for b, e, r in pts:
        ax.scatter([b], [e], s=40, label=f"{r['form']}: {Path(r['path']).name}")
    front = _pareto([(b, e) for b, e, _ in pts])
    if len(front) > 1:
        ax.plot([b for b, _ in front], [e for _, e in front], "--", color="black", lw=0.8, label="Pareto front")
    ax.axvline(src["bytes"], color="red", lw=0.6, ls=":", label="source file")
    ax.set_xscale("log")
    ax.set_xlabel("bytes (container + share of a shared file)")
    ax.set_ylabel("relative error")
    ax.set_title(f"error vs bytes: {src['name']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6)
    _save(fig, path)
    return True


def _chart_spectra(r: dict, path: Path) -> bool:
    sp = r.get("spectra") or []
    if not sp:
        return False
    fig = _fig(3.2 * len(sp), 3.0)
    fig.subplots_adjust(wspace=0.45)
    for j, s in enumerate(sp):
        ax = fig.add_subplot(1, len(sp), j + 1)
        ax.semilogy(range(1, len(s["source"]) + 1), [max(x, 1e-12) for x in s["source"]], "o-", label="source")
        if s["compressed"]:
            ax.semilogy(
                range(1, len(s["compressed"]) + 1), [max(x, 1e-12) for x in s["compressed"]], "s--", label="compressed"
            )
        else:
            ax.text(0.5, 0.5, "compressed: rank 0", transform=ax.transAxes, ha="center", fontsize=7)
        ax.set_title(s["module"], fontsize=7)
        ax.set_xlabel("i")
        if j == 0:
            ax.set_ylabel("σ_i")
            ax.legend(fontsize=6)
    _save(fig, path)
    return True


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|")


def _write(out: Path, result: dict) -> dict:
    """``report.md``, ``report.json`` and the charts, written into a new folder that replaces
    ``out`` whole once complete (never a partial report, never old charts left beside new ones).
    Returns the paths written."""
    with atomic_dir(out) as tmp:
        return _write_into(tmp, out, result)


def _write_into(out: Path, final: Path, result: dict) -> dict:
    reps = result["containers"]
    images: dict[str, list[str]] = {}
    for j, r in enumerate(reps):
        stem = f"{j}_{_slug(Path(r['path']).stem)}"
        imgs = []
        if _chart_errors(r, out / f"errors_{stem}.png"):
            imgs.append(f"errors_{stem}.png")
        if _chart_spectra(r, out / f"spectrum_{stem}.png"):
            imgs.append(f"spectrum_{stem}.png")
        images[r["path"]] = imgs
    pareto = []
    for k, (sha, src) in enumerate(result["sources"].items()):
        name = f"pareto_{k}_{_slug(src['name'])}.png"
        if _chart_pareto(src, [r for r in reps if r["source"]["sha256"] == sha], out / name):
            pareto.append(name)
    lines = [
        "# adaptzip report",
        "",
        "| container | form | bytes | ratio vs source | ratio vs fp16 LoRA | stored params | rel. error | svd at same bytes | errors from |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reps:
        lines.append(
            f"| {_fmt(Path(r['path']).name)} | {r['form']} | {r['bytes']}"
            + (f" (+{r['effective_bytes'] - r['bytes']:.0f} shared)" if r["shared"] else "")
            + f" | {_fmt(r['ratio_source'])} | {_fmt(r['ratio_fp16_lora'])} | {r['params']['stored']} | {_fmt(r['rel_error'])} | "
            f"{_fmt(r['svd_baseline_rel_error'])} | {_fmt(r['errors_from'])} |"
        )
    lines.append("")
    for name in pareto:
        lines += [f"![error vs bytes]({name})", ""]
    for r in reps:
        lines += [
            f"## {_fmt(Path(r['path']).name)}",
            "",
            f"- form `{r['form']}`, dtype {r['dtype']}, source `{_fmt(r['source']['name'])}` ({r['source']['bytes']} bytes)",
            (
                f"- bytes {r['bytes']}, ratio {_fmt(r['ratio_source'])} of the source file, {_fmt(r['ratio_fp16_lora'])} of an fp16 LoRA "
                f"({r['fp16_lora_bytes']} bytes)"
            ),
            f"- parameters: {r['params']['stored']} stored (+{r['params']['shared']} in the shared file) of {r['params']['source']} in the source",
        ]
        if r["shared"]:
            lines.append(
                f"- shared file `{r['shared']['file']}`: "
                + (
                    f"{r['shared']['bytes']} bytes"
                    if r["shared"]["bytes"] is not None
                    else f"**{_fmt(r['shared'].get('error'))}**"
                )
            )
        if r["accuracy"]:
            lines += ["", "| accuracy metric | value |", "|---|---|"] + [
                f"| {k} | {_fmt(v)} |" for k, v in r["accuracy"].items()
            ]
        if r["storage"]:
            st = r["storage"]
            lines += [
                "",
                (
                    f"Bit allocation (`{st['scheme']}`, group size {st['group_size']}): {st['tensors']} quantised tensors; "
                    f"tensors by bits {st['tensors_by_bits']}; rows by bits {st['rows_by_bits']}; values by bits {st['values_by_bits']}; "
                    f"mean {_fmt(st['mean_bits'])} bits per quantised value"
                ),
            ]
        lines += ["", "| module | layer | type | stored rank | rel. error |", "|---|---|---|---|---|"]
        for m in r["modules"][:30]:
            lines.append(
                f"| {_fmt(m['name'])} | {_fmt(m['layer'])} | {_fmt(m['type'])} | {_fmt(m['rank'])} | {_fmt(m['rel_error'])} |"
            )
        if len(r["modules"]) > 30:
            lines.append(f"| … {len(r['modules']) - 30} more in report.json | | | | |")
        if r.get("modules_note"):
            lines += ["", f"_{r['modules_note']}_"]
        lines.append("")
        for img in images[r["path"]]:
            lines += [f"![{img}]({img})", ""]
    files = {
        "report_md": str(final / "report.md"),
        "report_json": str(final / "report.json"),
        "images": [i for v in images.values() for i in v] + pareto,
    }
    with atomic_file(out / "report.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    with atomic_file(out / "report.json") as tmp:
        public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in reps]  # not "_form": live objects
        tmp.write_text(
            json.dumps(json_clean({**result, "containers": public, "files": files}), indent=1, allow_nan=False) + "\n"
        )
    return files
