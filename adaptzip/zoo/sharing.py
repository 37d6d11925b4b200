"""Zoo-level sharing (``--shared-basis``): after the separate conversion, adapters of one shape
group (same base model, dtype and module table) are split into clusters whose A row spaces
overlap; for each candidate of ≥ 2 adapters the stacked updates of each module give ONE shared
``A`` (the top-k right singular subspace V, :func:`adaptzip.linalg.module_basis`), each adapter
keeping ``B = argmin ‖ΔW − B V‖``: an ``svd`` container whose ``A.{i}`` live in the content-addressed
file ``OUT_DIR/_shared/<sha256>.safetensors``. The ranks k are allocated greedily (energy per
stored byte) as the smallest that match the group error of the separate containers; a candidate
is shared only when that is fewer total bytes (shared file included) at equal or lower error.
The joint kinds (``joint-basis``) share U and V with a core per adapter instead.

With Σ statistics (``batch --stats FILE``: one file of the base model for the whole zoo) every
fit is Σ-weighted — the separate containers, the shared bases (:func:`adaptzip.linalg.module_basis`
and :func:`adaptzip.linalg.joint_basis` with ``Sigma``), B and the cores — and every error compared
is the Σ-weighted output error ‖ΔW − ΔŴ‖_Σ / ‖ΔW‖_Σ.
"""

from __future__ import annotations

import abc
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
from ..calibrate import load_stats
from ..fileio import atomic_file, file_sha256
from ..forms import REGISTRY, FitContext, baseline_form
from ..forms.joint import CORES, core_cost
from .discovery import SHARED_DIR, Found
from .run import OK_STATUSES, convert

#: A cluster whose adapters' files take at most this many bytes is read into memory once.
KEEP_IN_MEMORY = 2 << 30


class _Kind(abc.ABC):
    """One way to share a cluster (see the module docstring): the stored tensors of a rank
    allocation ``ks``, the gain and the byte cost of each direction, and each adapter's container."""

    name: str
    form: str

    def __init__(self, ads: list[Adapter], dt: torch.dtype, gkey: str, stats: dict | None = None):
        self.ads, self.dt, self.gkey, self.n = ads, dt, gkey, len(ads)
        self.modules = ads[0].modules
        self.fb = torch.empty(0, dtype=dt).element_size()
        self.ctx = FitContext(stats=stats)
        #: the module table lives once in the shared file (False: an existing file written without one)
        self.table_in_shared = True

    def sigma(self, i: int):
        """Module ``i``'s Σ (None: weight space)."""
        return self.ctx.sigma(self.modules[i])

    @abc.abstractmethod
    def gains(self) -> list[torch.Tensor]:
        """Per module, the energy each further direction captures."""

    @abc.abstractmethod
    def costs(self) -> list[list[float]]:
        """Per module, the bytes each further direction costs (shared and per-adapter parts)."""

    @abc.abstractmethod
    def shared_tensors(self, ks: list[int]) -> dict[str, torch.Tensor]:
        """The tensors of the shared file for ranks ``ks``, in float64."""

    @abc.abstractmethod
    def shared_meta(self, ks: list[int]) -> dict:
        """The shared file's ``tensors`` metadata (formats/shared.md §3)."""

    @abc.abstractmethod
    def container(self, a: int, shared: dict[str, torch.Tensor], ks: list[int], sha: str, metrics: dict, command: str):
        """(tensors, manifest, FitReport) of adapter ``a``'s container on the shared tensors as stored."""

    def blob(self, ks: list[int]) -> tuple[dict, bytes, str]:
        """The shared file's tensors (in the container dtype), its exact bytes and their sha256 (its name)."""
        from safetensors.torch import save

        tensors = {k: v.to(self.dt).contiguous() for k, v in self.shared_tensors(ks).items()}
        meta = {
            "format": "adaptzip-shared",
            "format_version": 1,
            "kind": self.name,
            "dtype": DTYPE_NAMES[self.dt],
            "group": self.gkey,
            "adapters": self.n,
            "tensors": self.shared_meta(ks),
            "modules": [m.to_json() for m in self.modules],
        }
        blob = save(tensors, metadata={ct.SHARED_META_KEY: json.dumps(meta, sort_keys=True, separators=(",", ":"))})
        return tensors, blob, hashlib.sha256(blob).hexdigest()

    def _write_container(self, form, a: int, sha: str, metrics: dict, command: str, names: list[str]):
        ad = self.ads[a]
        rep = fit.evaluate(form, ad, self.ctx)
        met = {
            **rep.to_json(),
            "module_rel_errors": rep.module_rel_errors,
            "weighted": self.ctx.stats is not None,
            **metrics,
        }
        ref = {
            "file": f"{SHARED_DIR}/{sha}.safetensors",
            "sha256": sha,
            "tensors": names,
            "modules": self.table_in_shared,
        }
        tensors, manifest = ct.build(form, ad, self.dt, metrics=met, command=command, shared=ref)
        return tensors, manifest, rep


class _RowBasis(_Kind):
    """``row-basis``: one shared A = V_i (the top-k right singular subspace of the stacked
    updates) per module, each adapter keeping B_i = argmin ‖ΔW_i − B V_i‖ (an ``svd`` container)."""

    name = "row-basis"
    form = "svd"

    def __init__(self, ads, dt, gkey, cap_bytes: float | None, stats: dict | None = None):
        """``cap_bytes`` None: no fit (only :meth:`container` on an existing shared file)."""
        super().__init__(ads, dt, gkey, stats)
        if cap_bytes is None:
            return
        self.bases = [
            linalg.module_basis(
                (ad.factors(ad.modules[i]) for ad in ads),
                m.in_features,
                cap=max(0, int(cap_bytes // self._cost(m))),
                total_rank=sum(ad.modules[i].rank for ad in ads),
                Sigma=self.sigma(i),
            )
            for i, m in enumerate(self.modules)
        ]

    def _cost(self, m) -> float:
        return (m.in_features + self.n * m.out_features) * self.fb  # a direction: A row once, B column n times

    def gains(self):
        return [b.lam[: b.V.shape[0]] for b in self.bases]

    def costs(self):
        return [[self._cost(m)] * b.V.shape[0] for m, b in zip(self.modules, self.bases)]

    def shared_tensors(self, ks):
        return {f"A.{i}": b.V[:k] for i, (b, k) in enumerate(zip(self.bases, ks))}

    def shared_meta(self, ks):
        return {
            f"A.{i}": {"module": m.name, "in": m.in_features, "rank": k}
            for i, (m, k) in enumerate(zip(self.modules, ks))
        }

    def container(self, a, shared, ks, sha, metrics, command):
        svd_cls = baseline_form()
        facs = []
        for i, (m, B, A) in enumerate(self.ads[a].iter_factors()):
            V = shared[f"A.{i}"].float()  # k×in, as stored
            Bn = (
                B.new_zeros(m.out_features, 0)
                if V.shape[0] == 0
                else linalg.lstsq_B(B.double(), A.double(), V.double(), self.sigma(i)).float()
            )
            facs.append((Bn.to(self.dt).float(), V))
        form = svd_cls(self.modules, svd_cls.Config(ranks=tuple(ks)), facs)
        return self._write_container(form, a, sha, metrics, command, [f"A.{i}" for i in range(len(ks))])


class _JointBasis(_Kind):
    """``joint-basis`` (Compress-then-Serve): per module U_i and V_i shared, each adapter a
    ``joint`` container holding only its core (full k×k or diagonal), fitted by least squares on
    U_i, V_i as stored (:func:`adaptzip.linalg.joint_cores`)."""

    name = "joint-basis"
    form = "joint"

    def __init__(
        self, ads, dt, gkey, core: str, cap_bytes: float | None, bases: list | None = None, stats: dict | None = None
    ):
        """``cap_bytes`` None: no fit (only :meth:`container` on an existing shared file);
        ``bases``: the joint bases already fitted for another core (the fit does not depend on it)."""
        super().__init__(ads, dt, gkey, stats)
        self.core = core
        self.bases = [] if bases is None else bases
        if cap_bytes is None or bases is not None:
            return
        # A module's directions are capped by twice its share of the separate bytes (its share of
        # the sources' values): more would cost more than the cluster's separate containers.
        share = [m.rank * (m.in_features + m.out_features) for m in self.modules]
        for i, m in enumerate(self.modules):
            values = 2 * cap_bytes * share[i] / max(sum(share), 1) / self.fb
            cap = int(values // (m.in_features + m.out_features + self.n))  # the diag core's cost: the cheapest
            self.bases.append(
                linalg.joint_basis(
                    [ad.factors(ad.modules[i]) for ad in ads],
                    min(cap, m.in_features, m.out_features),
                    Sigma=self.sigma(i),
                )
            )

    def costs(self):
        return [
            [(m.in_features + m.out_features + self.n * core_cost(self.core, j)) * self.fb for j in range(b.V.shape[0])]
            for m, b in zip(self.modules, self.bases)
        ]

    def gains(self):
        return [_concave(b.gains(self.core == "diag"), c) for b, c in zip(self.bases, self.costs())]

    def shared_tensors(self, ks):
        out = {}
        for i, (b, k) in enumerate(zip(self.bases, ks)):
            out[f"U.{i}"], out[f"V.{i}"] = b.U[:, :k], b.V[:k]
        return out

    def shared_meta(self, ks):
        meta = {}
        for i, (m, k) in enumerate(zip(self.modules, ks)):
            meta[f"U.{i}"] = {"module": m.name, "out": m.out_features, "rank": k}
            meta[f"V.{i}"] = {"module": m.name, "in": m.in_features, "rank": k}
        return meta

    def container(self, a, shared, ks, sha, metrics, command):
        cls = REGISTRY["joint"]
        Us = [shared[f"U.{i}"].float() for i in range(len(ks))]
        Vs = [shared[f"V.{i}"].float() for i in range(len(ks))]
        cores = [
            linalg.joint_cores(U, V, B, A, self.core == "diag", Sigma=self.sigma(i)).to(self.dt).float()
            for i, ((_, B, A), U, V) in enumerate(zip(self.ads[a].iter_factors(), Us, Vs))
        ]
        form = cls(self.modules, cls.Config(core=self.core, ranks=tuple(ks)), Us, Vs, cores)
        names = sorted(n for i in range(len(ks)) for n in (f"U.{i}", f"V.{i}"))
        return self._write_container(form, a, sha, metrics, command, names)


def _concave(gains: torch.Tensor, costs: list[float]) -> torch.Tensor:
    """Gains whose ratio to the costs is non-increasing along the chain (the slopes of the upper
    concave envelope of cumulative gain over cumulative cost), so that the greedy allocation by
    gain per byte sees a direction worth taking even when its first step gains little (a full
    core's k-th direction adds 2k − 1 core values, each carrying energy). Sums over the envelope's
    segments are unchanged."""
    g = [float(x) for x in gains]
    pts = [(0.0, 0.0)]
    for x, c in zip(g, costs):
        pts.append((pts[-1][0] + c, pts[-1][1] + x))
    hull = [0]
    for j in range(1, len(pts)):
        while len(hull) >= 2:
            (x0, y0), (x1, y1) = pts[hull[-2]], pts[hull[-1]]
            if (y1 - y0) * (pts[j][0] - x0) <= (pts[j][1] - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(j)
    out = []
    for h0, h1 in zip(hull, hull[1:]):
        slope = (pts[h1][1] - pts[h0][1]) / max(pts[h1][0] - pts[h0][0], 1e-300)
        out += [slope * costs[j] for j in range(h0, h1)]
    return torch.tensor(out, dtype=torch.float64)


def share_zoo(rows: list[dict], out: Path, *, command: str, log=print, job_of=None, stats=None) -> dict:
    """Phase 2 of ``--shared-basis``. Adapters with the same base model, dtype and module table
    form a shape group; :func:`cluster_by_overlap` splits it into clusters whose A row spaces
    overlap (e.g. one training seed each), and the adapters left alone form one more candidate.
    For each candidate of ≥ 2 adapters: measure the overlap, fit the shared basis that matches the
    separate containers' error with the fewest bytes, and replace its containers when that saves
    bytes. Updates ``rows`` in place; returns the sharing report.

    ``stats``: Σ per module name, or a stats file (formats/stats.md) of the zoo's base model, read
    once per shape group and checked against its module table; None: weight space."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] in OK_STATUSES and r.get("group"):
            groups.setdefault(r["group"], []).append(r)
    report = []
    for gkey, grp in sorted(groups.items()):
        if len(grp) < 2:
            continue
        grp.sort(key=lambda r: r["adapter"])
        ads = [load_adapter(r["source"]) for r in grp]
        sigma = stats if stats is None or isinstance(stats, dict) else load_stats(stats, ads[0])[0]
        clusters = cluster_by_overlap(ads)
        alone = [i for c in clusters if len(c) == 1 for i in c]
        cands = [(f"{gkey}-{j}", c, "overlapping A") for j, c in enumerate(x for x in clusters if len(x) > 1)]
        if len(alone) >= 2:
            cands.append((f"{gkey}-x", alone, "no overlapping partner"))
        for key, idx, kind in cands:
            g = _share_group(key, [grp[i] for i in idx], [ads[i] for i in idx], out, command, log, job_of, sigma)
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


# a sharing group's overlap figures in batch.json: A row spaces and B column spaces, each against
# what unrelated random subspaces of those ranks give
OVERLAP_KEYS = ("overlap", "overlap_random", "overlap_out", "overlap_out_random")


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


def _zoo_metrics(
    gkey: str, kind: _Kind, n: int, blob_bytes: int, row: dict, sep_bytes: int, sep_err: float, extended: bool = False
) -> dict:
    """A shared container's metrics beyond its fit report: what sharing replaced (formats/shared.md §4)."""
    zoo = {
        "group": gkey,
        "kind": kind.name,
        "adapters": n,
        "shared_file_bytes": blob_bytes,
        "shared_share_bytes": blob_bytes / n,
        "separate_bytes": sep_bytes,
        "separate_rel_error": sep_err,
    }
    if extended:
        zoo["extended"] = True
    return {"svd_baseline_rel_error": row.get("svd_baseline_rel_error"), "svd_baseline_bytes": sep_bytes, "zoo": zoo}


def _group_err(errs: list[float], norms: list[float]) -> float:
    """Energy-weighted group error sqrt(Σ_a e_a² ‖ΔW_a‖² / Σ_a ‖ΔW_a‖²)."""
    tot = sum(norms)
    return math.sqrt(sum(e * e * n for e, n in zip(errs, norms)) / tot) if tot > 0 else 0.0


def _share_group(
    gkey: str, grp: list[dict], ads: list[Adapter], out: Path, command: str, log, job_of, stats=None
) -> dict:
    n = len(grp)
    if sum(ad.bytes for ad in ads) <= KEEP_IN_MEMORY:
        for ad in ads:  # the fits and each allocation attempt's containers read every factor again
            ad.keep_in_memory()
    dt = resolve_dtype(grp[0].get("dtype"), ads[0])
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
    grown = _extend(gkey, grp, ads, dt, sep_bytes, sep_err, out, command, log, stats)
    if grown is not None:
        return grown
    joint = [_JointBasis(ads, dt, gkey, CORES[0], T, stats=stats)]
    joint += [_JointBasis(ads, dt, gkey, core, T, bases=joint[0].bases, stats=stats) for core in CORES[1:]]
    kinds: list[_Kind] = [_RowBasis(ads, dt, gkey, T, stats), *joint]
    bases = kinds[0].bases
    norms = [sum(b.norms[a] for b in bases) for a in range(n)]
    total = sum(norms)
    e_sep = _group_err(sep_err, norms)
    by_type: dict[str, list[float]] = {}
    for m, b in zip(modules, bases):
        if not math.isnan(b.overlap):
            by_type.setdefault(m.type_key, []).append(b.overlap)
    ov = [x for v in by_type.values() for x in v]
    measured = [(m, b.overlap_out) for m, b in zip(modules, bases) if not math.isnan(b.overlap_out)]

    def metrics(a: int, kind: _Kind, blob_bytes: int) -> dict:
        return _zoo_metrics(gkey, kind, n, blob_bytes, grp[a], sep_bytes[a], sep_err[a])

    res: dict[str, Any] = {
        "group": gkey,
        "adapters": n,
        "modules": len(modules),
        "dtype": DTYPE_NAMES[dt],
        "weighted": stats is not None,
        "overlap": sum(ov) / len(ov) if ov else None,
        "overlap_by_type": {k: sum(v) / len(v) for k, v in sorted(by_type.items())},
        "overlap_random": sum(m.rank / m.in_features for m in modules) / len(modules),
        # the B side: what a shared U can draw on (LoRA starts B at zero, so one init seed shares A only)
        "overlap_out": sum(x for _, x in measured) / len(measured) if measured else None,
        "overlap_out_random": sum(m.rank / m.out_features for m, _ in measured) / len(measured) if measured else None,
        "separate": {"bytes": T, "rel_error": e_sep},
        "candidates": {},
        "shared": None,
        "decision": "separate",
        "reason": "",
    }
    plans = {}
    for kind in kinds:
        label = kind.name if not isinstance(kind, _JointBasis) else f"{kind.name} ({kind.core} core)"
        cand, plan = _plan(kind, T, e_sep, total, norms, lambda a, b, k=kind: metrics(a, k, b), command)
        res["candidates"][label] = cand
        if plan is not None:
            plans[label] = plan
    res["estimate"] = res["candidates"]["row-basis"]["estimate"]  # the row basis's, as before the joint kinds
    ok = {k: p for k, p in plans.items() if p["rel_error"] <= e_sep * (1 + 1e-9) and p["bytes"] < T}
    if ok:
        label = min(ok, key=lambda k: (ok[k]["bytes"], k))
        best = ok[label]
        res["shared"] = {k: v for k, v in best.items() if not k.startswith("_")} | {"kind": label}
        res.update(
            decision="shared",
            bytes_saved=T - best["bytes"],
            error_change=best["rel_error"] - e_sep,
            reason=f"{label}: {T - best['bytes']} bytes saved ({1 - best['bytes'] / T:.1%}) at group error "
            f"{best['rel_error']:.4g} ≤ {e_sep:.4g}",
        )
    else:
        res["reason"] = "; ".join(f"{k}: {c['why']}" for k, c in res["candidates"].items())
    log(
        f"zoo sharing, group {gkey} ({n} adapters, A-overlap {res['overlap'] or 0:.3f}, random {res['overlap_random']:.3f}, "
        f"B-overlap {res['overlap_out'] or 0:.3f}, random {res['overlap_out_random'] or 0:.3f}, "
        f"{'Σ-weighted' if stats is not None else 'weight space: --stats FILE judges by output error'}): "
        f"{res['decision']}: {res['reason']}"
    )
    if res["decision"] == "shared":
        kind, ks = best["_kind"], best["_ks"]
        tensors, blob, sha = kind.blob(ks)
        path = out / SHARED_DIR / f"{sha}.safetensors"
        if not (path.is_file() and file_sha256(path) == sha):  # content-addressed: an intact one is never rewritten
            with atomic_file(path) as tmp:
                tmp.write_bytes(blob)
        for a, r in enumerate(grp):
            if r.get("shared_sha256") == sha and r["status"] == "skipped":
                continue  # verified up to date by this run
            t, man, rep = kind.container(a, tensors, ks, sha, metrics(a, kind, len(blob)), command)
            written = ct.write(out / r["output"], t, man)
            r.update(
                status="shared",
                form=kind.form,
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


def _plan(kind: _Kind, T: int, e_sep: float, total: float, norms: list[float], metrics, command: str):
    """The fewest-bytes allocation of ``kind`` whose group error matches the separate
    containers' ``e_sep`` (rank allocation by energy per byte, then measured exactly after
    rounding to the container dtype, the target tightened while rounding costs a little): its
    report and the plan (bytes, error, ranks, sha256 and, under ``_``-keys, what writing needs),
    or None when no allocation below the separate bytes ``T`` reaches the error."""
    n = kind.n
    gains, costs = kind.gains(), kind.costs()
    zero = [0] * len(kind.modules)
    t0, blob0, sha0 = kind.blob(zero)
    fixed = len(blob0) + sum(
        ct.serialized_size(*kind.container(a, t0, zero, sha0, metrics(a, len(blob0)), command)[:2]) for a in range(n)
    )
    ks_eq = linalg.allocate(gains, costs, T - fixed)
    got = sum(float(g[:k].sum()) for g, k in zip(gains, ks_eq))
    eq_err = math.sqrt(max(0.0, total - got) / total) if total > 0 else 0.0
    target = e_sep**2 * total
    ks_need = linalg.allocate(gains, costs, target_gain=total - target)
    report: dict[str, Any] = {
        "estimate": {
            "shared_rel_error_at_equal_bytes": eq_err,
            "shared_bytes_at_equal_error": None
            if ks_need is None
            else fixed + sum(sum(c[:k]) for c, k in zip(costs, ks_need)),
        },
        "rel_error_at_equal_bytes": eq_err,
        "bytes": None,
        "rel_error": None,
    }
    best = None
    for attempt in range(6):  # rounding to the container dtype costs a little: tighten the target and retry
        ks = linalg.allocate(gains, costs, target_gain=total - target * 0.97**attempt)
        if ks is None or fixed + sum(sum(c[:k]) for c, k in zip(costs, ks)) >= T:
            break
        tensors, blob, sha = kind.blob(ks)
        sizes, errs = [], []
        for a in range(n):
            t, man, rep = kind.container(a, tensors, ks, sha, metrics(a, len(blob)), command)
            sizes.append(ct.serialized_size(t, man))
            errs.append(rep.rel_error)
        best = {
            "bytes": len(blob) + sum(sizes),
            "shared_file_bytes": len(blob),
            "containers_bytes": sum(sizes),
            "rel_error": _group_err(errs, norms),
            "ranks": {"total": sum(ks), "min": min(ks), "max": max(ks)},
            "sha256": sha,
            "_kind": kind,
            "_ks": ks,
        }
        if best["rel_error"] <= e_sep * (1 + 1e-9):
            break
    if best is None:
        report["why"] = "cannot match the separate containers' error in fewer bytes"
    else:
        report.update({k: v for k, v in best.items() if not k.startswith("_")})
        if best["rel_error"] > e_sep * (1 + 1e-9):
            report["why"] = f"error {best['rel_error']:.4g} > separate {e_sep:.4g} within the separate bytes"
        else:
            report["why"] = f"{best['bytes']} bytes at error {best['rel_error']:.4g}"
    return report, best


def _extend(gkey, grp, ads, dt, sep_bytes, sep_err, out: Path, command: str, log, stats=None) -> dict | None:
    """A cluster that grew: when its earlier members all reference one intact shared file (up to
    date in this run) and the others are new, fit only the new adapters' own parts (B, or cores)
    to that file as it is. Kept when the whole cluster's error stays within the separate
    containers' and the new containers take fewer bytes than their separate ones; the shared
    file is never modified. With no new member the cluster is unchanged: nothing is refitted or
    written, and the report comes from the containers. None: refit the cluster (the caller's
    full search)."""
    old = [a for a, r in enumerate(grp) if r.get("shared_file") and r["status"] == "skipped"]
    new = [a for a, r in enumerate(grp) if not r.get("shared_file")]
    if not old or len(old) + len(new) != len(grp) or len({grp[a]["shared_sha256"] for a in old}) != 1:
        return None
    c = ct.open_container(out / grp[old[0]]["output"])
    sha, ks = c.manifest["shared"]["sha256"], [int(k) for k in c.manifest["state"]["ranks"]]
    shared = {n: c.tensor(n) for n in c.manifest["shared"]["tensors"]}
    n = len(grp)
    fresh = [ads[a] for a in new] or ads  # the kind serves the new adapters (or only measures, when none)
    kind: _Kind = (
        _JointBasis(fresh, dt, gkey, c.config.core, None, stats=stats)
        if c.form_name == "joint"
        else _RowBasis(fresh, dt, gkey, None, stats)
    )
    kind.table_in_shared = c.table_in_shared
    blob_bytes = c.shared_path.stat().st_size
    norms = [sum(float(linalg.sq_norm(*ad.factors(m), kind.ctx.sigma(m))) for m in ad.modules) for ad in ads]
    e_sep = _group_err(sep_err, norms)
    built, errs = {}, [grp[a]["rel_error"] for a in range(n)]
    for j, a in enumerate(new):
        met = _zoo_metrics(gkey, kind, n, blob_bytes, grp[a], sep_bytes[a], sep_err[a], extended=True)
        built[a] = kind.container(j, shared, ks, sha, met, command)
        errs[a] = built[a][2].rel_error
    new_bytes = sum(ct.serialized_size(*built[a][:2]) for a in new)
    err = _group_err(errs, norms)
    res = {
        "group": gkey,
        "adapters": n,
        "modules": len(ads[0].modules),
        "dtype": DTYPE_NAMES[dt],
        "weighted": stats is not None,
        **dict.fromkeys(OVERLAP_KEYS),  # not measured: the cluster was formed and fitted by an earlier run
        "separate": {"bytes": sum(sep_bytes), "rel_error": e_sep},
    }
    if new:
        res["extended"] = {
            "new_adapters": len(new),
            "new_bytes": new_bytes,
            "new_separate_bytes": sum(sep_bytes[a] for a in new),
        }
    if new and (err > e_sep * (1 + 1e-9) or new_bytes >= sum(sep_bytes[a] for a in new)):
        log(
            f"zoo sharing, group {gkey}: {len(new)} new adapters do not fit the existing shared file (group error "
            f"{err:.4g} vs {e_sep:.4g} separate, {new_bytes} bytes vs {sum(sep_bytes[a] for a in new)}); refitting the cluster"
        )
        return None
    for a in new:
        t, man, rep = built[a]
        r = grp[a]
        written = ct.write(out / r["output"], t, man)
        r.update(
            status="shared",
            form=kind.form,
            bytes=written,
            ratio=(written + blob_bytes / n) / r["source_bytes"],
            rel_error=rep.rel_error,
            shared_file=f"{SHARED_DIR}/{sha}.safetensors",
            shared_sha256=sha,
            shared_share_bytes=blob_bytes / n,
            separate_bytes=sep_bytes[a],
            separate_rel_error=sep_err[a],
        )
    total = blob_bytes + sum(grp[a]["bytes"] for a in range(n))
    res.update(
        decision="shared",
        shared={
            "kind": kind.name if isinstance(kind, _RowBasis) else f"{kind.name} ({kind.core} core)",
            "bytes": total,
            "rel_error": err,
            "sha256": sha,
        },
        reason=(
            f"{len(new)} new adapters fitted to the existing shared file {sha[:12]}… (unchanged)"
            if new
            else f"unchanged: every container is up to date on the shared file {sha[:12]}… (not refitted)"
        )
        + f": group error {err:.4g} ≤ {e_sep:.4g}, {total} bytes vs {sum(sep_bytes)} separate",
    )
    log(f"zoo sharing, group {gkey}: {res['reason']}")
    return res
