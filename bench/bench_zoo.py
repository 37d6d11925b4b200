"""Zoo benchmark: batch throughput with 1 and 2 worker processes, and zoo bytes and error with and
without ``--shared-basis``.

The zoo: N tiny PEFT LoRAs (3-layer Llama, hidden 64, r=8, all linear modules, fp32, trained 8
Adam steps at lr 5e-3 on synthetic text): half from ONE LoRA init seed on different data
(``zoo/same/``, the pipeline case zoo sharing is for), half each from its own seed
(``zoo/diff/``, where sharing must be refused). Every run is the real CLI in its own process:

    python bench/bench_zoo.py            # N = 100
    python bench/bench_zoo.py --n 20     # quick run

Prints a table; writes bench/out/zoo.json and bench/out/zoo.md. Errors are weight-space relative
errors, energy-weighted over the adapters: sqrt(Σ_a e_a²‖ΔW_a‖² / Σ_a ‖ΔW_a‖²).

``--joint`` measures the three sharing kinds (``row-basis``, ``joint-basis`` with a full or a
diagonal core) against the number of adapters instead, and writes bench/out/zoo_joint.json and
zoo_joint.md. Zoos, for N in ``--sizes`` (default 8, 32, 100):

* ``trained``: the first N/2 adapters of each half of the zoo above (N = 100: all of it); the
  clusters that the batch forms (the same-seed half, the own-seed half) are reported one by one;
* ``planted full`` / ``planted diag``: N adapters of ``tests/test_zoo_joint.py::joint_zoo``
  (related tasks: every update U0 C_a V0 on a planted 6-dimensional basis per module, plus weak
  private directions; full or diagonal cores C_a).

Each zoo: ``adaptzip batch --budget B --jobs 1`` (the separate containers), then the same with
``--shared-basis`` into the same folder (the conversions are up to date: only the sharing runs),
both as the CLI in its own process. Per cluster: the separate containers' bytes and error, each
kind's bytes at that error and its error at equal bytes (batch.json's ``candidates``), the kind
kept, and how the bytes split into safetensors headers (the manifest: module table, source,
metrics) and tensor payload, read from the files.

    python bench/bench_zoo.py --joint --work /tmp/zoo   # keeps the trained zoo for the next run

``--ray`` measures ``adaptzip batch --executor ray`` (jobs 2) on a real local Ray cluster (``ray
start --head``, 2 CPUs, a private temp folder, as ``tests/test_zoo_ray.py`` starts it) against
``--jobs 1`` inline, both through :func:`adaptzip.zoo.batch` with the same ``command``, on a zoo of
``--n`` adapters (default 20 here); reports each wall time, the throughput ratio, the cluster's
start-up time (not in the Ray run's wall time, which does include connecting to it) and how many
containers are byte-identical between the two runs. Writes bench/out/zoo_ray.json and zoo_ray.md.

    python bench/bench_zoo.py --ray --n 20 --work /tmp/zoo-ray
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
sys.path.insert(0, str(HERE.parent / "tests"))


def build_zoo(work: Path, n: int) -> Path:
    """N adapters: n//2 with init seed 0 (different data), the rest with their own init seeds."""
    import torch

    torch.set_num_threads(1)
    from fixtures import make_base, train_lora

    base = make_base(work / "base")
    zoo = work / "zoo"
    want = {f"{'same' if k < n // 2 else 'diff'}/ad{k:03d}" for k in range(n)}
    have = {p.parent.relative_to(zoo).as_posix() for p in zoo.glob("*/*/adapter_model.safetensors")}
    if have - want:
        raise SystemExit(f"{zoo} holds a zoo of another size ({len(have)} adapters): use another --work")
    for k in range(n):
        same = k < n // 2
        dest = zoo / ("same" if same else "diff") / f"ad{k:03d}"
        if (dest / "adapter_model.safetensors").is_file():  # a zoo left in --work by an earlier run
            continue
        train_lora(
            base,
            dest,
            init_seed=0 if same else 1000 + k,
            data_seed=k,
            lr=5e-3,
        )
    return zoo


def run_batch(zoo: Path, out: Path, jobs: int, shared: bool, budget: str) -> tuple[dict, float, float]:
    """One CLI run; returns its summary, wall seconds and the CPU seconds of the CLI process (its pool
    workers are forkserver children, not counted there: the rows' ``cpu_seconds`` count them)."""
    cmd = [
        sys.executable,
        "-m",
        "adaptzip.cli",
        "batch",
        str(zoo),
        "-o",
        str(out),
        "--budget",
        budget,
        "--jobs",
        str(jobs),
        "--json",
    ] + (["--shared-basis"] if shared else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    if p.returncode != 0:
        raise SystemExit(f"batch failed ({p.returncode}): {p.stderr[-2000:]}")
    return json.loads(p.stdout), wall, cpu


def zoo_error(summary: dict, norms: dict[str, float], prefix: str = "") -> float:
    num = den = 0.0
    for r in summary["adapters"]:
        if r["adapter"].startswith(prefix) and r["rel_error"] is not None:
            n2 = norms[r["adapter"]]
            num += r["rel_error"] ** 2 * n2
            den += n2
    return math.sqrt(num / den) if den else float("nan")


def sub_bytes(summary: dict, out: Path, prefix: str) -> int:
    """Bytes of the containers below ``prefix`` plus the shared files they reference (once each)."""
    rows = [r for r in summary["adapters"] if r["adapter"].startswith(prefix) and r["bytes"] is not None]
    shared = {r["shared_file"] for r in rows if r.get("shared_file")}
    return sum(r["bytes"] for r in rows) + sum((out / f).stat().st_size for f in shared)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=None, help="adapters in the zoo (default 100; --ray: 20)")
    ap.add_argument("--budget", default="0.25", help="per-adapter budget (as adaptzip batch --budget)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--joint", action="store_true", help="sharing kinds against N (zoo_joint.json / .md)")
    ap.add_argument("--sizes", default="8,32,100", help="--joint: comma-separated zoo sizes N (even)")
    ap.add_argument("--ray", action="store_true", help="Ray executor against jobs 1 (zoo_ray.json / .md)")
    args = ap.parse_args()
    if args.n is None:
        args.n = 20 if args.ray else 100
    if args.ray:
        ray_main(args)
        return
    if args.joint:
        joint_main(args)
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="adaptzip-bench-zoo-"))
    try:
        t0 = time.perf_counter()
        zoo = build_zoo(work, args.n)
        build_s = time.perf_counter() - t0
        import torch

        from adaptzip import fit
        from adaptzip.adapter import load_adapter
        from adaptzip.forms import FitContext
        from adaptzip.zoo import OVERLAP_KEYS

        torch.set_num_threads(1)
        norms = {}
        for d in sorted(zoo.glob("*/*")):
            ad = load_adapter(d)
            norms[d.relative_to(zoo).as_posix()] = sum(t.norm2 for t in fit.targets(ad, FitContext()))
        load = os.getloadavg()[0]
        runs = {}
        for name, jobs, shared in (("jobs1", 1, False), ("jobs2", 2, False), ("jobs2_shared", 2, True)):
            out = work / f"out_{name}"
            s, wall, cpu = run_batch(zoo, out, jobs, shared, args.budget)
            conv_cpu = sum(r.get("cpu_seconds") or 0.0 for r in s["adapters"])
            runs[name] = {
                "jobs": jobs,
                "shared_basis": shared,
                "wall_s": wall,
                "cli_cpu_s": cpu,
                "conversion_cpu_s": conv_cpu,
                "batch_s": s["seconds"],
                "adapters_per_s": args.n / wall,
                "counts": s["counts"],
                "zoo_bytes": s["totals"]["zoo_bytes"],
                "source_bytes": s["totals"]["source_bytes"],
                "rel_error": zoo_error(s, norms),
                "same_bytes": sub_bytes(s, out, "same/"),
                "diff_bytes": sub_bytes(s, out, "diff/"),
                "same_rel_error": zoo_error(s, norms, "same/"),
                "diff_rel_error": zoo_error(s, norms, "diff/"),
                "sharing": s.get("sharing"),
            }
        sep, sh = runs["jobs2"], runs["jobs2_shared"]
        result = {
            "adapters": args.n,
            "budget": args.budget,
            "build_s": build_s,
            "cpus": os.cpu_count(),
            "load_avg_1m": load,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "runs": runs,
            "throughput_ratio_jobs2_over_jobs1": runs["jobs2"]["adapters_per_s"] / runs["jobs1"]["adapters_per_s"],
            "sharing": {
                "bytes_without": sep["zoo_bytes"],
                "bytes_with": sh["zoo_bytes"],
                "bytes_saved": sep["zoo_bytes"] - sh["zoo_bytes"],
                "error_without": sep["rel_error"],
                "error_with": sh["rel_error"],
                "groups": [
                    {k: g[k] for k in ("group", "adapters", "cluster", *OVERLAP_KEYS, "decision", "reason")}
                    | {"separate_bytes": g["separate"]["bytes"], "shared_bytes": (g["shared"] or {}).get("bytes")}
                    for g in (sh["sharing"] or {}).get("groups", [])
                ],
            },
        }
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    OUT.mkdir(exist_ok=True)
    (OUT / "zoo.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        (
            f"Zoo of {args.n} tiny adapters (half one init seed, half own seeds), --budget {args.budget}, "
            f"{result['cpus']} CPUs, 1-min load average {load:.1f} at start; each run is the CLI in its own process."
        ),
        "",
        "| run | wall s | conversion CPU s | adapters/s | zoo bytes | ratio | rel. error | same-seed half: bytes / error | own-seed half: bytes / error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in runs.items():
        lines.append(
            f"| {name.replace('_', ' + ')} | {r['wall_s']:.1f} | {r['conversion_cpu_s']:.1f} | {r['adapters_per_s']:.2f} | {r['zoo_bytes']} | "
            f"{r['zoo_bytes'] / r['source_bytes']:.4f} | {r['rel_error']:.4f} | {r['same_bytes']} / {r['same_rel_error']:.4f} | "
            f"{r['diff_bytes']} / {r['diff_rel_error']:.4f} |"
        )
    s = result["sharing"]
    lines += [
        "",
        f"Throughput ratio jobs 2 / jobs 1: **{result['throughput_ratio_jobs2_over_jobs1']:.2f}×**.",
        (
            f"--shared-basis: zoo bytes {s['bytes_without']} → {s['bytes_with']} ({s['bytes_saved']} saved, "
            f"{s['bytes_saved'] / s['bytes_without']:.1%}), error {s['error_without']:.4f} → {s['error_with']:.4f}."
        ),
        "",
        "| candidate group | adapters | cluster | A-overlap | random | B-overlap | random | separate bytes | shared bytes | decision |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for g in s["groups"]:
        lines.append(
            f"| {g['group']} | {g['adapters']} | {g['cluster']} | {g['overlap']:.3f} | {g['overlap_random']:.3f} | "
            f"{_r(g['overlap_out'])} | {_r(g['overlap_out_random'])} | "
            f"{g['separate_bytes']} | {g['shared_bytes'] if g['shared_bytes'] is not None else '–'} | {g['decision']}: {g['reason']} |"
        )
    md = "\n".join(lines) + "\n"
    (OUT / "zoo.md").write_text(md)
    print(md)


# ----------------------------------------------------------------------------- --joint
JOINT_KINDS = ("row-basis", "joint-basis (full core)", "joint-basis (diag core)")
GOAL_RATIO = 0.25  # joint bytes at the separate error / separate bytes, same-seed half, largest N


def file_split(path: Path) -> tuple[int, int]:
    """(header bytes: the 8-byte length and the JSON header with the manifest, tensor payload bytes)
    of a safetensors file."""
    import struct

    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
    return 8 + n, path.stat().st_size - 8 - n


def subset_zoo(full: Path, dest: Path, n: int) -> Path:
    """The first n/2 adapters of each half of the trained zoo, copied (a batch does not follow
    symlinked folders)."""
    if dest.is_dir():
        shutil.rmtree(dest)
    for half in ("same", "diff"):
        for d in sorted((full / half).iterdir())[: n // 2]:
            shutil.copytree(d, dest / half / d.name)
    return dest


def clusters_of(zoo: Path, gkey_rows: list[dict]) -> dict[str, list[str]]:
    """cluster key (as batch.json's groups name them) -> member adapters, by the batch's own
    clustering (:func:`adaptzip.zoo.sharing.cluster_by_overlap`) of the members of each shape group."""
    from adaptzip.adapter import load_adapter
    from adaptzip.zoo.sharing import cluster_by_overlap

    by_group: dict[str, list[dict]] = {}
    for r in gkey_rows:
        if r.get("group"):
            by_group.setdefault(r["group"], []).append(r)
    out = {}
    for gkey, rows in by_group.items():
        rows.sort(key=lambda r: r["adapter"])
        clusters = cluster_by_overlap([load_adapter(r["source"]) for r in rows])
        multi = [c for c in clusters if len(c) > 1]
        for j, c in enumerate(multi):
            out[f"{gkey}-{j}"] = [rows[i]["adapter"] for i in c]
        alone = [rows[i]["adapter"] for c in clusters if len(c) == 1 for i in c]
        if len(alone) >= 2:
            out[f"{gkey}-x"] = alone
    return out


def half_of(members: list[str]) -> str:
    halves = {m.split("/", 1)[0] for m in members}
    return {"same": "same-seed half", "diff": "own-seed half"}.get(halves.pop(), "?") if len(halves) == 1 else "mixed"


def joint_case(label: str, zoo: Path, out: Path, budget: str) -> list[dict]:
    """Separate batch, then --shared-basis on the same folder; one record per cluster."""
    if out.exists():
        shutil.rmtree(out)
    s1, wall1, _ = run_batch(zoo, out, 1, False, budget)
    sep = {r["adapter"]: r for r in s1["adapters"]}
    split1 = {a: file_split(out / r["output"]) for a, r in sep.items()}
    s2, wall2, _ = run_batch(zoo, out, 1, True, budget)
    members = clusters_of(zoo, s2["adapters"])
    rows2 = {r["adapter"]: r for r in s2["adapters"]}
    recs = []
    for g in s2["sharing"]["groups"]:
        mem = members[g["group"]]
        if len(mem) != g["adapters"]:
            raise RuntimeError(f"cluster {g['group']}: {len(mem)} members found here, {g['adapters']} in batch.json")
        shared = g["shared"] or {}
        kept_split = [file_split(out / rows2[a]["output"]) for a in mem]
        files = {rows2[a]["shared_file"] for a in mem if rows2[a].get("shared_file")}
        shared_split = [file_split(out / f) for f in files]
        cands = {}
        for k in JOINT_KINDS:
            c = g["candidates"].get(k) or {}
            cands[k] = {
                "bytes": c.get("bytes"),
                "rel_error": c.get("rel_error"),
                "rel_error_at_equal_bytes": c.get("rel_error_at_equal_bytes"),
                "bytes_at_equal_error_estimate": (c.get("estimate") or {}).get("shared_bytes_at_equal_error"),
                "shared_file_bytes": c.get("shared_file_bytes"),
                "containers_bytes": c.get("containers_bytes"),
                "ranks": c.get("ranks"),
                "why": c.get("why"),
            }
        T = g["separate"]["bytes"]
        recs.append(
            {
                "zoo": label,
                "n": len(s2["adapters"]),
                "cluster": g["group"],
                "half": half_of(mem) if label == "trained" else "all",
                "adapters": g["adapters"],
                "overlap": g.get("overlap"),
                "overlap_random": g.get("overlap_random"),
                "overlap_out": g.get("overlap_out"),
                "overlap_out_random": g.get("overlap_out_random"),
                "separate": {
                    "bytes": T,
                    "rel_error": g["separate"]["rel_error"],
                    "header_bytes": sum(split1[a][0] for a in mem),
                    "payload_bytes": sum(split1[a][1] for a in mem),
                    "files_bytes": sum(sep[a]["bytes"] for a in mem),
                },
                "candidates": cands,
                "decision": g["decision"],
                "reason": g["reason"],
                "kept": {
                    "kind": shared.get("kind", "separate"),
                    "bytes": shared.get("bytes", T),
                    "rel_error": shared.get("rel_error", g["separate"]["rel_error"]),
                    "ratio": shared.get("bytes", T) / T,
                    "header_bytes": sum(h for h, _ in kept_split) + sum(h for h, _ in shared_split),
                    "payload_bytes": sum(p for _, p in kept_split) + sum(p for _, p in shared_split),
                },
                "wall_s": {"separate": wall1, "shared_basis": wall2},
                "sharing_s": s2["seconds"],
            }
        )
    return recs


def best_joint(rec: dict) -> tuple[str, float | None, bool]:
    """(kind, its bytes at the separate error, exact) of the better joint kind; bytes from the
    allocation estimate (exact False) when no allocation below the separate bytes matched it."""
    best = ("", None, False)
    for k in JOINT_KINDS[1:]:
        c = rec["candidates"][k]
        b, exact = (c["bytes"], True) if c["bytes"] is not None else (c["bytes_at_equal_error_estimate"], False)
        if b is not None and (best[1] is None or b < best[1]):
            best = (k, b, exact)
    return best


def _r(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


JOINT_COLUMNS = (
    "zoo",
    "N",
    "cluster",
    "adapters",
    "A / B overlap (random)",
    "separate bytes",
    "separate error",
    "kept",
    "kept / separate",
    "kept error",
    "row-basis / separate",
    "joint full / separate",
    "joint diag / separate",
    "err. at equal bytes: row / full / diag",
    "headers / separate",
    "kept payload / separate payload",
)


def joint_rows(recs: list[dict]) -> list[list[str]]:
    rows = []
    for r in recs:
        T, c = r["separate"]["bytes"], r["candidates"]

        def rel(k, c=c, T=T):
            b = c[k]["bytes"]
            if b is not None:
                return f"{b / T:.3f}"
            e = c[k]["bytes_at_equal_error_estimate"]
            return "–" if e is None else f"(≈{e / T:.2f})"

        short = {"separate": "separate", "row-basis": "row-basis"}
        kept = r["kept"]["kind"]
        rows.append(
            [
                r["zoo"],
                str(r["n"]),
                r["half"],
                str(r["adapters"]),
                f"{_r(r['overlap'], '.2f')} / {_r(r['overlap_out'], '.2f')} "
                f"({_r(r['overlap_random'], '.2f')} / {_r(r['overlap_out_random'], '.2f')})",
                str(T),
                f"{r['separate']['rel_error']:.4f}",
                short.get(kept, kept.replace("joint-basis (", "joint ").replace(" core)", "")),
                f"{r['kept']['ratio']:.3f}",
                f"{r['kept']['rel_error']:.4f}",
                rel("row-basis"),
                rel("joint-basis (full core)"),
                rel("joint-basis (diag core)"),
                " / ".join(_r(c[k]["rel_error_at_equal_bytes"]) for k in JOINT_KINDS),
                f"{r['separate']['header_bytes'] / T:.3f}",
                f"{r['kept']['payload_bytes'] / r['separate']['payload_bytes']:.3f}",
            ]
        )
    return rows


def joint_targets(recs: list[dict], nmax: int) -> list[dict]:
    out = []
    for r in recs:
        if r["zoo"] == "trained" and r["n"] == nmax and r["half"] == "same-seed half":
            kind, b, exact = best_joint(r)
            out.append(
                {
                    "name": f"trained zoo, N = {nmax}, same-seed half: best joint kind's bytes at the separate error / "
                    f"separate bytes ({kind or 'none'}{'' if exact else ', allocation estimate'})",
                    "measured": float("inf") if b is None else b / r["separate"]["bytes"],
                    "limit": GOAL_RATIO,
                }
            )
        if r["zoo"] == "trained" and r["n"] == nmax and r["half"] == "own-seed half":
            out.append(
                {
                    "name": f"trained zoo, N = {nmax}, own-seed half: stored shared (1) instead of separate (0)",
                    "measured": float(r["decision"] == "shared"),
                    "limit": 0.0,
                }
            )
    return common.check_targets(out)


def joint_main(args: argparse.Namespace) -> None:
    sizes = [int(x) for x in args.sizes.split(",") if x]
    if any(n % 2 or n < 4 for n in sizes):
        raise SystemExit("--sizes: even numbers ≥ 4")
    nmax = max(sizes)
    with common.scratch(args.work, "adaptzip-bench-zoo-joint-", keep=False) as work:
        load_start = common.loadavg()
        t0 = time.perf_counter()
        print(f"… build the trained zoo ({nmax} adapters)", file=sys.stderr, flush=True)
        full = build_zoo(work, nmax)
        build_s = time.perf_counter() - t0
        from test_zoo_joint import joint_zoo

        recs = []
        for n in sizes:
            for label in ("trained", "planted full", "planted diag"):
                print(f"… {label}, N = {n}", file=sys.stderr, flush=True)
                case = work / "joint" / f"{label.replace(' ', '-')}-{n}"
                zoo = case / "zoo"
                if label == "trained":
                    subset_zoo(full, zoo, n)
                else:
                    if zoo.exists():
                        shutil.rmtree(zoo)
                    joint_zoo(zoo, n, diagonal=label.endswith("diag"))
                recs += joint_case(label, zoo, case / "out", args.budget)
        wall = time.perf_counter() - t0
    order = {"trained": 0, "planted full": 1, "planted diag": 2}
    recs.sort(key=lambda r: (order[r["zoo"]], r["n"], r["half"] != "same-seed half"))
    tg = joint_targets(recs, nmax)
    result = {
        "benchmark": "zoo_joint",
        "budget": args.budget,
        "sizes": sizes,
        "build_s": build_s,
        "wall_s": wall,
        "machine": common.machine_info() | {"cpus": os.cpu_count()},
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": common.loadavg(),
        "clusters": recs,
        "targets": tg,
    }
    intro = (
        f"Zoo sharing kinds against the number of adapters N, `adaptzip batch --budget {args.budget} --jobs 1`, "
        "then `--shared-basis` on the same folder (each the CLI in its own process). `trained`: N/2 adapters from each "
        "half of the zoo above (tiny Llama, r=8, trained a few steps; one half from one LoRA init seed, the other with "
        "own seeds), each cluster the batch forms in a row of its own; `planted full` / `planted diag`: "
        "`tests/test_zoo_joint.py::joint_zoo` (2 layers, r=8, every update on a planted 6-dimensional basis per "
        "module plus weak private directions; full or diagonal cores). `A / B overlap (random)`: the mean pairwise "
        "cos² of the adapters' A row spaces and of their B column spaces (in parentheses: what unrelated random "
        "subspaces of those ranks give); a shared V can draw on the first, a shared U only on the second. "
        "`kept`: what the batch stored (the fewest "
        "bytes among the kinds whose group error is at most the separate containers'); `X / separate`: each kind's "
        "total bytes (shared file included) at the separate error, relative to the separate containers (in "
        "parentheses: the rank allocation's estimate where no allocation below the separate bytes matched the "
        "error; –: not even that); `err. at equal bytes`: each kind's group error when given the separate "
        "containers' bytes; `headers / separate`: the separate containers' safetensors headers (the manifest) "
        "as a share of their bytes; `kept payload / separate payload`: tensor bytes only (shared file included). "
        f"Errors are weight-space, energy-weighted over the cluster. {result['machine']['cpus']} CPUs, 1-min load "
        f"average {load_start:.1f} at the start, {result['load_avg_1m_end']:.1f} at the end; "
        f"{wall:.0f} s in all."
    )
    lines = [intro, "", *common.markdown_table(JOINT_COLUMNS, joint_rows(recs)), *common.targets_markdown(tg)]
    why = []
    for r in (r for r in recs if r["decision"] == "separate"):
        by_why: dict[str, list[str]] = {}
        for k, c in r["candidates"].items():
            by_why.setdefault(c["why"], []).append(k)
        why += [f"| {r['zoo']} | {r['n']} | {r['half']} | {', '.join(ks)}: {w} |" for w, ks in by_why.items()]
    if why:
        lines += ["", "Clusters kept separate, and why each kind was refused:", ""]
        lines += ["| zoo | N | cluster | why |", "|---|---:|---|---|", *why]
    md = "\n".join(lines) + "\n"
    common.write_outputs(OUT, "zoo_joint", result, md)
    print(common.table(JOINT_COLUMNS, joint_rows(recs)))
    print()
    print(md)


# ----------------------------------------------------------------------------- --ray
def start_ray_cluster(ray_tmp: Path) -> tuple[subprocess.Popen, str]:
    """The test suite's local cluster (``tests/test_zoo_ray.py``'s :func:`start_cluster`, without
    its audit hook): 2 CPUs on 127.0.0.1; returns the process and the cluster's address."""
    from test_zoo_ray import start_cluster

    try:
        return start_cluster(ray_tmp)
    except RuntimeError as e:
        raise SystemExit(str(e)) from e


def timed_batch(zoo: Path, out: Path, budget: str, jobs: int, executor: str) -> tuple[dict, float]:
    from adaptzip import zoo as azoo

    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    s = azoo.batch(zoo, out, to="svd", budget=budget, jobs=jobs, executor=executor, command="bench")
    return s, time.perf_counter() - t0


RAY_COLUMNS = ("run", "executor", "jobs", "wall s", "adapters/s", "converted", "failed", "zoo bytes")


def ray_main(args: argparse.Namespace) -> None:
    from test_zoo_ray import _stop_cluster

    budget = float(args.budget)
    with common.scratch(args.work, "adaptzip-bench-zoo-ray-", keep=False) as work:
        load_start = common.loadavg()
        t0 = time.perf_counter()
        print(f"… build the zoo ({args.n} adapters)", file=sys.stderr, flush=True)
        zoo = build_zoo(work, args.n)
        build_s = time.perf_counter() - t0
        import torch

        torch.set_num_threads(1)
        print("… jobs 1, inline", file=sys.stderr, flush=True)
        s1, wall1 = timed_batch(zoo, work / "out_jobs1", budget, 1, "process")
        ray_tmp = Path(tempfile.mkdtemp(prefix="azray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        proc = None
        try:
            print("… start a local Ray cluster", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            proc, address = start_ray_cluster(ray_tmp)
            start_s = time.perf_counter() - t0
            print("… executor ray, jobs 2", file=sys.stderr, flush=True)
            old = os.environ.get("RAY_ADDRESS")
            os.environ["RAY_ADDRESS"] = address
            try:
                s2, wall2 = timed_batch(zoo, work / "out_ray", budget, 2, "ray")
            finally:
                if old is None:
                    os.environ.pop("RAY_ADDRESS", None)
                else:
                    os.environ["RAY_ADDRESS"] = old
        finally:
            if proc is not None:
                _stop_cluster(proc)
            shutil.rmtree(ray_tmp, ignore_errors=True)
        files1 = {p.relative_to(work / "out_jobs1"): p for p in (work / "out_jobs1").rglob("*.safetensors")}
        files2 = {p.relative_to(work / "out_ray"): p for p in (work / "out_ray").rglob("*.safetensors")}
        names = sorted(set(files1) | set(files2))
        identical = sum(
            1 for n in names if n in files1 and n in files2 and files1[n].read_bytes() == files2[n].read_bytes()
        )
    runs = {}
    for name, executor, jobs, s, wall in (("jobs1", "process (inline)", 1, s1, wall1), ("ray", "ray", 2, s2, wall2)):
        runs[name] = {
            "executor": executor,
            "jobs": jobs,
            "wall_s": wall,
            "adapters_per_s": args.n / wall,
            "counts": s["counts"],
            "zoo_bytes": s["totals"]["zoo_bytes"],
        }
    ratio = runs["ray"]["adapters_per_s"] / runs["jobs1"]["adapters_per_s"]
    result = {
        "benchmark": "zoo_ray",
        "adapters": args.n,
        "budget": budget,
        "build_s": build_s,
        "ray_start_s": start_s,
        "runs": runs,
        "throughput_ratio_ray_over_jobs1": ratio,
        "containers_identical": identical,
        "containers_total": len(names),
        "machine": common.machine_info() | {"cpus": os.cpu_count()},
        "load_avg_1m_start": load_start,
        "load_avg_1m_end": common.loadavg(),
    }
    rows = [
        [
            name,
            r["executor"],
            str(r["jobs"]),
            f"{r['wall_s']:.1f}",
            f"{r['adapters_per_s']:.2f}",
            str(r["counts"].get("converted", 0)),
            str(r["counts"].get("failed", 0)),
            str(r["zoo_bytes"]),
        ]
        for name, r in runs.items()
    ]
    m = result["machine"]
    intro = (
        f"`adaptzip.zoo.batch(to='svd', budget={budget}, command='bench')` on a zoo of {args.n} tiny adapters (the zoo "
        "above), once with `jobs=1` inline and once with `executor='ray', jobs=2` on a local Ray cluster (`ray start "
        "--head`, 2 CPUs, found through `RAY_ADDRESS`), both in the bench's own process. The Ray run's wall time "
        f"includes connecting to the cluster and starting its workers; starting the cluster itself took "
        f"{start_s:.1f} s more, not counted. {m['cpus']} CPUs ({m['cpu']}), Python {m['python']}, torch "
        f"{m['torch']}; 1-min load average {load_start:.1f} at the start, {result['load_avg_1m_end']:.1f} at the end."
    )
    lines = [
        intro,
        "",
        *common.markdown_table(RAY_COLUMNS, rows),
        "",
        f"Throughput ratio Ray (jobs 2) / jobs 1: **{ratio:.2f}×**. Containers byte-identical between the two runs: "
        f"**{identical} / {len(names)}**.",
    ]
    md = "\n".join(lines) + "\n"
    common.write_outputs(OUT, "zoo_ray", result, md)
    print(md)


if __name__ == "__main__":
    main()
