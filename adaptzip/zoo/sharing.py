"""Zoo-level sharing (``--shared-basis``): after the separate conversion, adapters of one shape
group (same base model, dtype and module table) are split into clusters whose A row spaces
overlap; for each candidate of ≥ 2 adapters the stacked updates of each module give ONE shared
``A`` (the top-k right singular subspace V, :func:`adaptzip.linalg.module_basis`), each adapter
keeping ``B = argmin ‖ΔW − B V‖``: an ``svd`` container whose ``A.{i}`` live in the content-addressed
file ``OUT_DIR/_shared/<sha256>.safetensors``. The ranks k are allocated greedily (energy per
stored byte) as the smallest that match the group error of the separate containers; a candidate
is shared only when that is fewer total bytes (shared file included) at equal or lower error.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from .. import container as ct
from .. import fit, linalg
from ..adapter import DTYPE_NAMES, Adapter, load_adapter
from ..budget import resolve_dtype
from ..fileio import atomic_file, file_sha256
from ..forms import FitContext, baseline_form
from .discovery import SHARED_DIR, Found
from .run import OK_STATUSES, convert

SHARED_META_KEY = "adaptzip_shared"


def _shared_blob(
    bases: list[linalg.ModuleBasis], ks: list[int], modules, dt: torch.dtype, n: int, gkey: str
) -> tuple[dict, bytes, str]:
    """The shared file's tensors (``A.{i}``: the top-k_i rows of V_i in the container dtype), its
    exact bytes and their sha256 (its name)."""
    from safetensors.torch import save

    tensors = {f"A.{i}": b.V[:k].to(dt).contiguous() for i, (b, k) in enumerate(zip(bases, ks))}
    meta = {
        "format": "adaptzip-shared",
        "format_version": 1,
        "kind": "row-basis",
        "dtype": DTYPE_NAMES[dt],
        "group": gkey,
        "adapters": n,
        "tensors": {
            f"A.{i}": {"module": m.name, "in": m.in_features, "rank": k} for i, (m, k) in enumerate(zip(modules, ks))
        },
    }
    blob = save(tensors, metadata={SHARED_META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})
    return tensors, blob, hashlib.sha256(blob).hexdigest()


def _ref(sha: str, n_modules: int) -> dict:
    return {"file": f"{SHARED_DIR}/{sha}.safetensors", "sha256": sha, "tensors": [f"A.{i}" for i in range(n_modules)]}


def _shared_container(
    ad: Adapter, shared_tensors: dict, ks: list[int], dt: torch.dtype, sha: str, metrics: dict, command: str
) -> tuple[dict, dict, fit.FitReport]:
    """One adapter's ``svd`` container whose ``A.{i}`` live in the shared file:
    B_i = argmin ‖ΔW_i − B V_i‖ (least squares against V_i as stored), rounded as stored."""
    svd_cls = baseline_form()
    facs = []
    for i, (m, B, A) in enumerate(ad.iter_factors()):
        V = shared_tensors[f"A.{i}"].float()  # k×in
        Bn = (
            B.new_zeros(m.out_features, 0)
            if V.shape[0] == 0
            else linalg.lstsq_B(B.double(), A.double(), V.double()).float()
        )
        facs.append((Bn.to(dt).float(), V))  # out×k
    form = svd_cls(ad.modules, svd_cls.Config(ranks=tuple(ks)), facs)
    rep = fit.evaluate(form, ad, FitContext())
    met = {**rep.to_json(), "module_rel_errors": rep.module_rel_errors, "weighted": False, **metrics}
    tensors, manifest = ct.build(form, ad, dt, metrics=met, command=command, shared=_ref(sha, len(ks)))
    return tensors, manifest, rep


def share_zoo(rows: list[dict], out: Path, *, command: str, log=print, job_of=None) -> dict:
    """Phase 2 of ``--shared-basis``. Adapters with the same base model, dtype and module table
    form a shape group; :func:`cluster_by_overlap` splits it into clusters whose A row spaces
    overlap (e.g. one training seed each), and the adapters left alone form one more candidate.
    For each candidate of ≥ 2 adapters: measure the overlap, fit the shared basis that matches the
    separate containers' error with the fewest bytes, and replace its containers when that saves
    bytes. Updates ``rows`` in place; returns the sharing report."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] in OK_STATUSES and r.get("group"):
            groups.setdefault(r["group"], []).append(r)
    report = []
    for gkey, grp in sorted(groups.items()):
        if len(grp) < 2:
            continue
        grp.sort(key=lambda r: r["adapter"])
        clusters = cluster_by_overlap([load_adapter(r["source"]) for r in grp])
        alone = [i for c in clusters if len(c) == 1 for i in c]
        cands = [
            (f"{gkey}-{j}", [grp[i] for i in c], "overlapping A")
            for j, c in enumerate(x for x in clusters if len(x) > 1)
        ]
        if len(alone) >= 2:
            cands.append((f"{gkey}-x", [grp[i] for i in alone], "no overlapping partner"))
        for key, members, kind in cands:
            g = _share_group(key, members, out, command, log, job_of)
            g["cluster"] = kind
            report.append(g)
    sep = sum(g["separate"]["bytes"] for g in report)
    zoo_b = sum(g["shared"]["bytes"] if g["decision"] == "shared" else g["separate"]["bytes"] for g in report)
    return {
        "groups": report,
        "separate_bytes": sep,
        "zoo_bytes": zoo_b,
        "bytes_saved": sep - zoo_b,
        "shared_groups": sum(1 for g in report if g["decision"] == "shared"),
    }


def cluster_by_overlap(ads: list[Adapter], probes: int = 3, threshold: float | None = None) -> list[list[int]]:
    """Split adapters (same module table) into clusters whose A row spaces overlap: an adapter joins
    the first cluster whose first member's A overlaps its own by a mean cos² ≥ ``threshold`` on
    ``probes`` modules spread over the table (default threshold: max(0.3, 3·r/in), three times
    what unrelated random subspaces give). One pass, O(adapters × clusters)."""
    mods = ads[0].modules
    idx = sorted({round(j * (len(mods) - 1) / max(1, probes - 1)) for j in range(min(probes, len(mods)))})
    if threshold is None:
        threshold = min(0.9, max(0.3, 3 * sum(mods[i].rank / mods[i].in_features for i in idx) / len(idx)))
    reps: list[list[torch.Tensor]] = []
    clusters: list[list[int]] = []
    for a, ad in enumerate(ads):
        qs = [linalg.orth_rows(ad.factors(ad.modules[i])[1].double()) for i in idx]
        for c, rq in enumerate(reps):
            if sum(linalg.subspace_overlap(q, r) for q, r in zip(qs, rq)) / len(qs) >= threshold:
                clusters[c].append(a)
                break
        else:
            reps.append(qs)
            clusters.append([a])
    return clusters


def _group_err(errs: list[float], norms: list[float]) -> float:
    """Energy-weighted group error sqrt(Σ_a e_a² ‖ΔW_a‖² / Σ_a ‖ΔW_a‖²)."""
    tot = sum(norms)
    return math.sqrt(sum(e * e * n for e, n in zip(errs, norms)) / tot) if tot > 0 else 0.0


def _share_group(gkey: str, grp: list[dict], out: Path, command: str, log, job_of) -> dict:
    n = len(grp)
    ads = [load_adapter(r["source"]) for r in grp]
    dt = resolve_dtype(grp[0].get("dtype"), ads[0])
    fb = torch.empty(0, dtype=dt).element_size()
    modules = ads[0].modules
    # the alternative: each adapter's separate container (the better of its form and the same-bytes svd)
    sep_bytes, sep_err = [], []
    for r in grp:
        if r.get("shared_file"):  # shared by an earlier run: its container remembers the alternative
            sep_bytes.append(r["separate_bytes"])
            sep_err.append(r["separate_rel_error"])
        else:
            sep_bytes.append(r["bytes"])
            sep_err.append(min(x for x in (r.get("rel_error"), r.get("svd_baseline_rel_error")) if x is not None))
    T = sum(sep_bytes)
    costs = [
        (m.in_features + n * m.out_features) * fb for m in modules
    ]  # one shared direction: A row once, B column n times
    bases = [
        linalg.module_basis(
            (ad.factors(ad.modules[i]) for ad in ads),
            m.in_features,
            cap=max(0, int(T // costs[i])),
            total_rank=sum(ad.modules[i].rank for ad in ads),
        )
        for i, m in enumerate(modules)
    ]
    norms = [sum(b.norms[a] for b in bases) for a in range(n)]
    total = sum(norms)
    e_sep = _group_err(sep_err, norms)
    target = e_sep**2 * total
    by_type: dict[str, list[float]] = {}
    for m, b in zip(modules, bases):
        if not math.isnan(b.overlap):
            by_type.setdefault(m.type_key, []).append(b.overlap)
    ov = [x for v in by_type.values() for x in v]

    def metrics(a: int, blob_bytes: int) -> dict:
        return {
            "svd_baseline_rel_error": grp[a].get("svd_baseline_rel_error"),
            "svd_baseline_bytes": sep_bytes[a],
            "zoo": {
                "group": gkey,
                "adapters": n,
                "shared_file_bytes": blob_bytes,
                "shared_share_bytes": blob_bytes / n,
                "separate_bytes": sep_bytes[a],
                "separate_rel_error": sep_err[a],
            },
        }

    # fixed bytes of sharing (headers, carried tensors): the containers and shared file at rank 0
    zero = [0] * len(modules)
    _, blob0, sha0 = _shared_blob(bases, zero, modules, dt, n, gkey)
    fixed = len(blob0) + sum(
        ct.serialized_size(
            *_shared_container(
                ad, {f"A.{i}": b.V[:0] for i, b in enumerate(bases)}, zero, dt, sha0, metrics(a, len(blob0)), command
            )[:2]
        )
        for a, ad in enumerate(ads)
    )
    ks_eq = linalg.allocate([b.lam[: b.V.shape[0]] for b in bases], costs, T - fixed)
    eq_err = (
        math.sqrt(max(0.0, total - sum(float(b.lam[:k].sum()) for b, k in zip(bases, ks_eq))) / total)
        if total > 0
        else 0.0
    )
    ks_need = linalg.allocate([b.lam for b in bases], costs, target_gain=total - target)
    res: dict[str, Any] = {
        "group": gkey,
        "adapters": n,
        "modules": len(modules),
        "dtype": DTYPE_NAMES[dt],
        "overlap": sum(ov) / len(ov) if ov else None,
        "overlap_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "overlap_random": sum(m.rank / m.in_features for m in modules) / len(modules),
        "separate": {"bytes": T, "rel_error": e_sep},
        "estimate": {
            "shared_rel_error_at_equal_bytes": eq_err,
            "shared_bytes_at_equal_error": None
            if ks_need is None
            else fixed + sum(k * c for k, c in zip(ks_need, costs)),
        },
        "shared": None,
        "decision": "separate",
        "reason": "",
    }
    best, ks = None, None
    for attempt in range(6):  # rounding to the container dtype costs a little: tighten the target and retry
        ks = linalg.allocate([b.lam[: b.V.shape[0]] for b in bases], costs, target_gain=total - target * 0.97**attempt)
        if ks is None or fixed + sum(k * c for k, c in zip(ks, costs)) >= T:
            break
        tensors, blob, sha = _shared_blob(bases, ks, modules, dt, n, gkey)
        sizes, errs = [], []
        for a, ad in enumerate(ads):
            t, man, rep = _shared_container(ad, tensors, ks, dt, sha, metrics(a, len(blob)), command)
            sizes.append(ct.serialized_size(t, man))
            errs.append(rep.rel_error)
        best = {
            "bytes": len(blob) + sum(sizes),
            "shared_file_bytes": len(blob),
            "containers_bytes": sum(sizes),
            "rel_error": _group_err(errs, norms),
            "ranks": {"total": sum(ks), "min": min(ks), "max": max(ks)},
            "sha256": sha,
        }
        if best["rel_error"] <= e_sep * (1 + 1e-9):
            break
    res["shared"] = best
    if best is None:
        res["reason"] = "a shared basis cannot match the separate containers' error in fewer bytes"
    elif best["rel_error"] > e_sep * (1 + 1e-9):
        res["reason"] = f"shared error {best['rel_error']:.4g} > separate {e_sep:.4g} within the separate bytes"
    elif best["bytes"] >= T:
        res["reason"] = f"shared needs {best['bytes']} bytes ≥ {T} separate"
    else:
        res.update(
            decision="shared",
            bytes_saved=T - best["bytes"],
            error_change=best["rel_error"] - e_sep,
            reason=f"{T - best['bytes']} bytes saved ({1 - best['bytes'] / T:.1%}) at group error {best['rel_error']:.4g} ≤ {e_sep:.4g}",
        )
    log(
        f"zoo sharing, group {gkey} ({n} adapters, A-overlap {res['overlap'] or 0:.3f}, random {res['overlap_random']:.3f}): "
        f"{res['decision']}: {res['reason']}"
    )
    if res["decision"] == "shared":
        tensors, blob, sha = _shared_blob(bases, ks, modules, dt, n, gkey)
        path = out / SHARED_DIR / f"{sha}.safetensors"
        if not (path.is_file() and file_sha256(path) == sha):  # content-addressed: an intact one is never rewritten
            with atomic_file(path) as tmp:
                tmp.write_bytes(blob)
        for a, (ad, r) in enumerate(zip(ads, grp)):
            if r.get("shared_sha256") == sha and r["status"] == "skipped":
                continue  # verified up to date by this run
            t, man, rep = _shared_container(ad, tensors, ks, dt, sha, metrics(a, len(blob)), command)
            written = ct.write(out / r["output"], t, man)
            r.update(
                status="shared",
                form=baseline_form().name,
                bytes=written,
                ratio=(written + len(blob) / n) / r["source_bytes"],
                rel_error=rep.rel_error,
                shared_file=f"{SHARED_DIR}/{sha}.safetensors",
                shared_sha256=sha,
                shared_share_bytes=len(blob) / n,
                separate_bytes=sep_bytes[a],
                separate_rel_error=sep_err[a],
            )
    elif job_of is not None:
        for r in grp:  # containers an earlier run shared, where sharing no longer pays: convert them one by one
            if r.get("shared_file"):
                job = job_of(Found("" if r["adapter"] == "." else r["adapter"], Path(r["source"])), out / r["output"])
                job.force = True
                r.clear()
                r.update(convert(job))
    return res
