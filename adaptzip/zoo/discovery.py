"""The zoo's layout: finding the adapters (a lazy walk that never follows symlinked folders), the
output path of each (``OUT_DIR/<rel>.safetensors``, refused when it could leave OUT_DIR or clash),
the reserved names in OUT_DIR, the resume stamp (the hash of the conversion options at the end of
a container's manifest ``command``) and the group key of adapters that can share a basis."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter import DTYPE_NAMES, Adapter
from ..options import CalibrationOptions, FitOptions, QuantOptions
from ..sigma import SigmaSketch

SHARED_DIR = "_shared"
SUMMARY_JSON = "batch.json"
SUMMARY_MD = "batch.md"
LOCK_FILE = ".adaptzip-batch.lock"
RESERVED = {SHARED_DIR, SUMMARY_JSON, SUMMARY_MD, LOCK_FILE}
_STAMP_RE = re.compile(r"\[adaptzip-batch options_sha256=([0-9a-f]{64})\]\s*$")
_ODD = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Found:
    """One discovery result: an adapter folder (``problem`` None) or a refused entry."""

    rel: str  # posix path relative to the zoo ('' for the zoo folder itself)
    path: Path
    problem: str | None = None
    status: str = "adapter"  # adapter, or for refused entries: failed | ignored


def inside(p: str, root: str) -> bool:
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


def _adapter_file_problem(d: str, zoo_real: str) -> str | None:
    """An adapter whose config or weights file is a symlink leaving the zoo is refused."""
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        p = os.path.join(d, name)
        if os.path.islink(p):
            target = os.path.realpath(p)
            if not inside(target, zoo_real):
                return f"{name} is a symlink to {target}, outside the zoo (not followed)"
    return None


def discover(zoo: str | Path, exclude: str | Path | None = None) -> Iterator[Found]:
    """Yield every PEFT LoRA adapter folder (one with ``adapter_config.json``) below ``zoo``, at any
    depth, lazily and in sorted order. Symlinked folders are never followed: one that points
    outside the zoo at an adapter is yielded as failed, one inside the zoo as ignored (its real
    path is converted). Hidden folders (``.*``) and ``exclude`` (the output folder) are skipped."""
    zoo = Path(zoo)
    zoo_real = os.path.realpath(zoo)
    excl = os.path.realpath(exclude) if exclude is not None else None
    stack: list[tuple[str, str]] = [(str(zoo), "")]
    while stack:
        d, rel = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            yield Found(rel, Path(d), f"cannot list folder: {e.strerror or e}", "failed")
            continue
        names = {e.name for e in entries}
        if "adapter_config.json" in names:
            problem = _adapter_file_problem(d, zoo_real)
            yield Found(rel, Path(d), problem, "adapter" if problem is None else "failed")
        subdirs = []
        for e in entries:
            if e.name.startswith("."):
                continue
            sub_rel = f"{rel}/{e.name}" if rel else e.name
            try:
                if e.is_symlink():
                    target = os.path.realpath(e.path)
                    if not os.path.isdir(target) or not os.path.isfile(os.path.join(target, "adapter_config.json")):
                        continue  # a link to something that is not an adapter: nothing to convert
                    if inside(target, zoo_real):
                        yield Found(
                            sub_rel,
                            Path(e.path),
                            f"symlink to {os.path.relpath(target, zoo_real)} inside the zoo (converted at its real path)",
                            "ignored",
                        )
                    else:
                        yield Found(
                            sub_rel, Path(e.path), f"symlink to {target}, outside the zoo (not followed)", "failed"
                        )
                    continue
                if not e.is_dir(follow_symlinks=False):
                    continue
            except OSError:
                continue
            if excl is not None and os.path.realpath(e.path) == excl:
                continue
            subdirs.append((e.path, sub_rel))
        stack.extend(reversed(subdirs))  # depth first, in name order


def output_for(out_dir: Path, rel: str, zoo_name: str) -> tuple[Path | None, str | None]:
    """``OUT_DIR/<rel>.safetensors`` for an adapter at ``rel`` (the zoo itself: ``<zoo name>``),
    or (None, why) when the path could leave OUT_DIR or clash with another output."""
    parts = rel.split("/") if rel else [zoo_name or "adapter"]
    for p in parts:
        if p in ("", ".", "..") or "/" in p or "\\" in p:
            return None, f"path component {p!r} is not allowed"
        if _ODD.search(p):
            return None, f"path component {p!r} has control characters"
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            return None, f"path component {p!r} is not valid UTF-8"
    if parts[0] in RESERVED:
        return None, f"{parts[0]!r} is reserved in the output folder"
    for p in parts[:-1]:
        if p.lower().endswith(".safetensors"):  # a folder named like a container would clash with one
            return None, f"folder name {p!r} ends with .safetensors and would clash with a container"
    out = out_dir.joinpath(*parts[:-1], parts[-1] + ".safetensors")
    cur = out_dir
    for p in parts[:-1]:
        cur = cur / p
        if cur.is_symlink():
            return None, f"output folder {cur} is a symlink (refusing to write through it)"
    if out.is_symlink() or out.is_dir():
        return None, f"output {out} exists and is not a regular file"
    if not os.path.realpath(out).startswith(os.path.realpath(out_dir) + os.sep):
        return None, f"output {out} would leave the output folder"
    return out, None


# ------------------------------------------------------------------ options and stamps
def canon(v: Any) -> Any:
    """A JSON-able canonical form of an option value (tensors by content hash)."""
    if isinstance(v, torch.Tensor):
        t = v.detach().contiguous().cpu()
        return {
            "tensor_sha256": hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest() if t.numel() else "",
            "shape": list(t.shape),
        }
    if isinstance(v, SigmaSketch):
        return {"sigma_sketch": canon(v.tensors())}
    if isinstance(v, dict):
        return {str(k): canon(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0])) if x is not None}
    if isinstance(v, (list, tuple)):
        return [canon(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def options_sha256(opts: dict) -> str:
    return hashlib.sha256(json.dumps(canon(opts), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def stamp(command: str | None, digest: str) -> str:
    """The manifest ``command`` of a batch container: the command line and the options hash."""
    return f"{command or 'adaptzip batch'} [adaptzip-batch options_sha256={digest}]"


def stamped_options(command: str | None) -> str | None:
    m = _STAMP_RE.search(command or "")
    return m[1] if m else None


def group_key(ad: Adapter, dtype: torch.dtype) -> str:
    """Adapters with equal keys can share a basis: same base model, container dtype and module table."""
    sig = {
        "base_model": ad.base_model,
        "dtype": DTYPE_NAMES[dtype],
        "modules": [[m.name, m.in_features, m.out_features, m.kind, m.fan_in_fan_out] for m in ad.modules],
    }
    return hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]


def batch_options(
    to: str,
    budget: str | float | None,
    config_json: dict,
    fitting: FitOptions,
    calibration: CalibrationOptions | None,
    quant: QuantOptions,
) -> dict:
    """Everything that shapes a batch's containers, as hashed into their resume stamp (Σ statistics
    given in ``fitting.stats`` are hashed by content)."""
    fit = fitting.to_json()
    if fitting.stats is not None:
        fit["stats"] = fitting.stats
    return {
        "to": to,
        "budget": None if budget is None else str(budget),
        "options": config_json,
        "fitting": fit,
        "calibration": None if calibration is None else calibration.to_json(),
        "quant": quant.to_json(),
    }
