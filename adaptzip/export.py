"""Expanding a container: PEFT LoRA directory (optionally vLLM-compatible), dense ΔW file, or a
merged base model. Dense and merged outputs stream: one ΔW (or one base tensor) in memory at a
time, written at its planned offset by :class:`adaptzip.fileio.StreamingWriter`."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from . import linalg
from .adapter import PREFIX, TORCH_DTYPES, ModuleInfo, pattern_key, peft_targets, runtime_features
from .container import Container
from .errors import BaseModelError, ContainerError, ExportError
from .fileio import (
    ST_TORCH,
    StreamingWriter,
    atomic_dir,
    atomic_file,
    save_tensors,
    tensor_index,
)
from .forms.base import Form

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _resolve_dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else TORCH_DTYPES[name]


def _alpha_for(scale: float, r: int, rslora: bool) -> float:
    a = scale * (math.sqrt(r) if rslora else r)
    return round(a) if abs(a - round(a)) < 1e-9 else a


def _config_reproduces(cfg: dict, want: dict[str, tuple[int, float]]) -> bool:
    """Whether PEFT, reading ``cfg``, gives every module the (rank, alpha) in ``want``."""
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for name, (r, alpha) in want.items():
        rk, ak = pattern_key(rp, name), pattern_key(ap, name)
        r_cfg = rp[rk] if rk is not None else cfg.get("r", 8)
        a_cfg = ap[ak] if ak is not None else cfg.get("lora_alpha", 8)
        if int(r_cfg) != r or abs(float(a_cfg) - float(alpha)) > 1e-9 * max(1.0, abs(float(alpha))):
            return False
    return True


def _name_targets(cfg: dict, names: list[str]) -> dict:
    """``cfg`` targeting exactly the modules ``names`` (their full paths in the base model): PEFT
    adapts a module listed in ``target_modules`` by its full name whatever the source config
    said (suffixes, a regex, ``layers_to_transform``, ``exclude_modules``), so every module
    written is loaded and no other one is added. A source whose ``target_modules`` disagree
    with its tensors (``Adapter.config_mismatch``) then loses no update."""
    cfg = dict(cfg)
    cfg.update(target_modules=list(names), layers_to_transform=None, layers_pattern=None, exclude_modules=None)
    return cfg


def _lora_config(
    source: dict, modules: list[ModuleInfo], ranks: dict[str, int], alphas: dict[str, float], rslora: bool
) -> dict:
    """A LoraConfig dict that targets exactly the modules in ``ranks`` (by full name) and gives
    each its rank and alpha: the source's own r/alpha/patterns when they do, else a uniform
    r/alpha (the most common) plus rank_pattern/alpha_pattern entries keyed by full module names
    (PEFT matches a pattern key against the end of a module's name, so a full name matches that
    module only; :func:`_config_reproduces` checks it by PEFT's rule)."""
    present = [m for m in modules if m.name in ranks]
    cfg = _name_targets(source, [m.name for m in present])
    cfg["use_rslora"] = rslora
    cfg["inference_mode"] = True
    want = {m.name: (ranks[m.name], alphas[m.name]) for m in present}
    if not _config_reproduces(cfg, want):
        r0 = Counter(ranks[m.name] for m in present).most_common(1)[0][0] if present else 1
        a0 = Counter(alphas[m.name] for m in present).most_common(1)[0][0] if present else 1
        cfg.update(
            r=r0,
            lora_alpha=a0,
            rank_pattern={m.name: ranks[m.name] for m in present if ranks[m.name] != r0},
            alpha_pattern={m.name: alphas[m.name] for m in present if alphas[m.name] != a0},
        )
    return cfg


def _check_targets(c: Container, cfg: dict) -> None:
    """Every module written is one PEFT adapts under ``cfg`` (e.g. not excluded by the source's
    ``modules_to_save``): otherwise PEFT would load the directory and drop that update."""
    for m in c.modules:
        if m.name in cfg["target_modules"] and not peft_targets(cfg, m.name, m.kind):
            raise ExportError(
                c.path,
                f"module {m.name} would not be adapted by PEFT under the source config "
                f"(modules_to_save {cfg.get('modules_to_save')}); its update would be lost",
            )


def _factor_keys(m: ModuleInfo) -> tuple[str, str]:
    if m.kind == "embedding":
        return f"{PREFIX}{m.name}.lora_embedding_A", f"{PREFIX}{m.name}.lora_embedding_B"
    return f"{PREFIX}{m.name}.lora_A.weight", f"{PREFIX}{m.name}.lora_B.weight"


def refuse_runtime_features(c: Container, target: str) -> None:
    """An export that writes plain ΔW, a plain live form or another tuner's format (every
    target but ``--to peft``; api.expand checks the forms' native exports) cannot carry what the source's PEFT
    config adds to "W x + ΔW x on every token" (:data:`adaptzip.adapter.RUNTIME_FEATURES`)."""
    feats = runtime_features(c.source_config)
    if feats:
        raise ExportError(c.path, f"{target} cannot express {feats[0]}; expand with --to peft")


def to_peft(
    c: Container, out: Path, *, target: str = "peft", max_lora_rank: int | None = None, dtype: str | None = None
) -> dict:
    """Write a PEFT LoRA directory. ``target='vllm'`` also satisfies vLLM's loader (one global
    rank ≤ max_lora_rank, scale folded into B, only lora_A/lora_B tensors)."""
    facs = c.lora_factors()  # stored dtype for lora/svd (no fp32 round trip), fp32 otherwise
    out_dtype = _resolve_dtype(dtype, c.dtype)
    src_cfg = c.source_config
    rslora = bool(src_cfg.get("use_rslora"))
    tensors: dict[str, torch.Tensor] = {}
    info: dict = {"output": str(out), "target": target}
    scales: dict[str, float] = {}
    with torch.no_grad():
        if target == "vllm":
            refuse_runtime_features(c, "--target vllm")
            bad = [x for x in c.carried if x["role"] in ("lora_bias", "dora_magnitude", "modules_to_save")]
            if bad:
                why = {
                    "lora_bias": "a LoRA bias (lora_B.bias)",
                    "dora_magnitude": "DoRA (lora_magnitude_vector)",
                    "modules_to_save": "modules_to_save",
                }[bad[0]["role"]]
                raise ExportError(
                    c.path, f"vLLM cannot load {why} ({bad[0]['key']}); expand with --target peft instead"
                )
            R = max((A.shape[0] for _, A, _ in facs), default=1)
            if max_lora_rank is None:
                max_lora_rank = next((n for n in VLLM_RANKS if n >= R), VLLM_RANKS[-1])
            if max_lora_rank not in VLLM_RANKS:
                raise ExportError(
                    out, f"--max-lora-rank {max_lora_rank} is not one vLLM accepts ({', '.join(map(str, VLLM_RANKS))})"
                )
            r = max(1, min(R, max_lora_rank))
            refactored = {}
            for m, (B, A, scale) in zip(c.modules, facs):
                B, A = B.float() * scale, A.float()
                k = A.shape[0]
                if k > r:
                    s = linalg.factored_svd(B, A)
                    B2, A2 = s.truncate(r)
                    refactored[m.name] = math.sqrt(
                        float(linalg.sq_error(B, A, B2, A2).clamp_min(0)) / max(float(linalg.sq_norm(B, A)), 1e-30)
                    )
                    B, A = B2, A2
                elif k < r:  # zero-pad to the global rank
                    B = torch.cat([B, B.new_zeros(B.shape[0], r - k)], 1)
                    A = torch.cat([A, A.new_zeros(r - k, A.shape[1])], 0)
                ka, kb = _factor_keys(m)
                tensors[ka], tensors[kb] = A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous()
            cfg = _name_targets(src_cfg, [m.name for m in c.modules])
            cfg.update(
                r=r,
                lora_alpha=r,
                use_rslora=False,
                rank_pattern={},
                alpha_pattern={},
                use_dora=False,
                lora_bias=False,
                bias="none",
                modules_to_save=None,
                inference_mode=True,
            )
            dropped = [x["key"] for x in c.carried if x["role"] == "embedding_base"]
            info.update(r=r, max_lora_rank=max_lora_rank, refactored=refactored, dropped=dropped)
        else:
            ranks, alphas = {}, {}
            for m, (B, A, scale) in zip(c.modules, facs):
                k = A.shape[0]
                if k == 0:
                    continue  # ΔŴ = 0: the module is simply not adapted
                ka, kb = _factor_keys(m)
                tensors[ka], tensors[kb] = A.to(out_dtype).contiguous(), B.to(out_dtype).contiguous()
                ranks[m.name], alphas[m.name] = k, _alpha_for(scale, k, rslora)
                scales[m.name] = scale
            if not ranks:
                raise ExportError(
                    c.path, "every module has rank 0 in this container: there is no update to write as a LoRA"
                )
            cfg = _lora_config(src_cfg, c.modules, ranks, alphas, rslora)
            info.update(r=cfg["r"], ranks=ranks)
        _check_targets(c, cfg)
        for j, x in enumerate(c.carried):
            if target == "vllm":
                continue
            t = c.carried_tensor(j)
            if x["role"] == "lora_bias" and x["module"] in scales:
                # PEFT scales lora_B's bias with the module's scaling: keep scaling·bias unchanged.
                src = next(m for m in c.modules if m.name == x["module"])
                if scales[x["module"]] != src.scale:
                    t = (t.float() * (src.scale / scales[x["module"]])).to(t.dtype)
            tensors[x["key"]] = t.contiguous()
    with atomic_dir(out) as tmp:
        save_tensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    info["bytes"] = (out / "adapter_model.safetensors").stat().st_size
    return info


def to_peft_native(c: Container, out: Path, *, dtype: str | None = None) -> dict:
    """Write a PEFT directory in the form's own adaptzip tuner type (:mod:`adaptzip.peft`):
    ``adapter_config.json`` (the config with the module table and the manifest's state) and
    ``adapter_model.safetensors`` holding the container's tensors once, under the names of the
    live form's parameters (``base_model.adaptzip_forms.<param>``), in the container's float
    dtype (fp32 for quantised tensors, which are written dequantised; ``dtype`` overrides).
    ``modules_to_save`` tensors are carried verbatim; LoRA biases, DoRA and embeddings are
    refused (the tuners adapt Linear and Conv1D layers)."""
    try:
        from . import peft as live_peft  # imports PEFT: only for this target
    except ImportError as e:
        raise ExportError(c.path, f"--to peft-native: {e}") from e

    emb = [m.name for m in c.modules if m.kind == "embedding"]
    if emb:
        raise ExportError(
            c.path, f"adaptzip's PEFT tuners adapt Linear/Conv1D layers, not the embedding {emb[0]}; use --to peft"
        )
    bad = [x for x in c.carried if x["role"] != "modules_to_save"]
    if bad:
        raise ExportError(
            c.path,
            f"adaptzip's PEFT tuners carry no {bad[0]['role'].replace('_', ' ')} ({bad[0]['key']}); use --to peft",
        )
    form_cls = c.form_class
    quantised = c.storage is not None and bool(c.storage.tensors)
    out_dtype = _resolve_dtype(dtype, torch.float32 if quantised else c.dtype)
    live = form_cls.live(c.modules, c.config, c.manifest["state"], c.tensors(sorted(c.specs)))

    def cast(v: torch.Tensor) -> torch.Tensor:
        return (v.to(out_dtype) if v.is_floating_point() else v).contiguous()

    tensors = {f"base_model.{live_peft.tuner.FORMS}.{k}": cast(v) for k, v in live.state_dict().items()}
    extra: dict = {}
    basis = getattr(live, "basis", None)
    if basis is not None:  # held once per key by the tuner: the zoo's shared file, or this container's own
        parts = {k: cast(v) for k, v in basis.state_dict().items()}
        key = (c.manifest.get("shared") or {}).get("sha256") or hashlib.sha256(
            b"".join(parts[k].view(torch.uint8).numpy().tobytes() for k in sorted(parts))
        ).hexdigest()
        extra["basis_key"] = key
        tensors.update({f"base_model.{live_peft.tuner.SHARED}.{key}.{k}": v for k, v in parts.items()})
    for j, x in enumerate(c.carried):
        tensors[x["key"]] = c.carried_tensor(j).contiguous()
    src = c.source_config
    config = live_peft.NATIVE[form_cls.native_tuner].from_container(
        c.form_name,
        c.config,
        task_type=src.get("task_type"),
        base_model_name_or_path=src.get("base_model_name_or_path"),
        revision=src.get("revision"),
        modules_to_save=src.get("modules_to_save") if c.carried else None,
        target_modules=[m.name for m in c.modules],
        modules=[m.to_json() for m in c.modules],
        form_state=c.manifest["state"],
        storage_dtype=live_peft.config.dtype_name(out_dtype),
        inference_mode=True,
        **extra,
    )
    with atomic_dir(out) as tmp:
        save_tensors(tmp / "adapter_model.safetensors", tensors, {"format": "pt"})
        config.save_pretrained(str(tmp))
    floats = sum(v.numel() for k, v in tensors.items() if v.is_floating_point() and "adaptzip_" in k)
    return {
        "output": str(out),
        "target": "peft-native",
        "peft_type": str(config.peft_type.value),
        "modules": len(c.modules),
        "float_values": floats,
        "dtype": live_peft.config.dtype_name(out_dtype),
        "bytes": (out / "adapter_model.safetensors").stat().st_size,
    }


def _delta(form: Form, i: int, m: ModuleInfo, dtype: torch.dtype) -> torch.Tensor:
    """Dense ΔŴ of module i as the base weight stores it (transposed for Conv1D / embeddings)."""
    B, A = form.factors(i)
    d = B.float() @ A.float()  # out×in
    return (d.T if m.dense_transposed else d).to(dtype).contiguous()


def to_dense(c: Container, out: Path, *, dtype: str | None = "fp32") -> dict:
    """One safetensors file: ΔW per module keyed by the base weight name, written module by module
    (peak memory: one ΔW). LoRA biases become ``<module>.bias`` deltas."""
    refuse_runtime_features(c, "--to dense")
    if any(x["role"] == "dora_magnitude" for x in c.carried):
        raise ExportError(
            c.path, "a DoRA update depends on the base weights and has no dense ΔW; use --to merged --base-model DIR"
        )
    form = c.form()
    out_dtype = _resolve_dtype(dtype, torch.float32)
    plan = []
    for m in c.modules:
        shape = (m.in_features, m.out_features) if m.dense_transposed else (m.out_features, m.in_features)
        plan.append((f"{m.name}.weight", out_dtype, shape))
    biases = {x["module"]: j for j, x in enumerate(c.carried) if x["role"] == "lora_bias"}
    for m in c.modules:
        if m.name in biases:
            plan.append((f"{m.name}.bias", out_dtype, (m.out_features,)))
    not_included = [x["key"] for x in c.carried if x["role"] in ("modules_to_save", "embedding_base")]
    meta = {
        "adaptzip": json.dumps(
            {"kind": "dense_delta", "source_container": c.path.name, "form": c.form_name, "not_included": not_included},
            sort_keys=True,
        )
    }
    with torch.no_grad(), atomic_file(out) as tmp, StreamingWriter(tmp, plan, meta) as w:
        for i, m in enumerate(c.modules):
            w.write(f"{m.name}.weight", _delta(form, i, m, out_dtype))
        for m in c.modules:
            if m.name in biases:
                w.write(f"{m.name}.bias", (c.carried_tensor(biases[m.name]).float() * m.scale).to(out_dtype))
    return {"output": str(out), "tensors": len(plan), "bytes": out.stat().st_size, "not_included": not_included}


# ----------------------------------------------------------------------------- merged
def _base_shards(base: Path) -> tuple[list[Path], Path | None]:
    if not base.is_dir():
        raise BaseModelError(
            base, "not a directory (--base-model must be a local model directory with safetensors weights)"
        )
    idx = base / "model.safetensors.index.json"
    if idx.is_file():
        try:
            files = sorted(set(json.loads(idx.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise BaseModelError(idx, f"not a safetensors index with a weight_map: {e!r}") from e
        return [base / f for f in files], idx
    single = base / "model.safetensors"
    if single.is_file():
        return [single], None
    raise BaseModelError(base, "no model.safetensors or model.safetensors.index.json")


def _match_key(name: str, keys: set[str], suffix: str) -> str | None:
    """The base checkpoint key of ``name.suffix``: exact, or the unique key that differs only
    by a leading model prefix (``transformer.h.0...`` vs ``h.0...``)."""
    k = f"{name}.{suffix}"
    if k in keys:
        return k
    parts = name.split(".")
    if len(parts) > 1 and f"{'.'.join(parts[1:])}.{suffix}" in keys:
        return f"{'.'.join(parts[1:])}.{suffix}"
    cands = [x for x in keys if x.endswith("." + k)]
    return cands[0] if len(cands) == 1 else None


def to_merged(c: Container, base: Path, out: Path) -> dict:
    """The base model's safetensors shards with ΔŴ added (DoRA and LoRA biases applied,
    modules_to_save replaced), written shard by shard and tensor by tensor; other files copied."""
    refuse_runtime_features(c, "--to merged")
    form = c.form()
    shards, _ = _base_shards(base)
    keys: dict[str, Path] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for s in shards:
        try:
            with safe_open(s, framework="pt") as f:
                index = tensor_index(f)
            keys.update(dict.fromkeys(index, s))
            shapes.update({k: tuple(v[0]) for k, v in index.items()})
        except (SafetensorError, OSError) as e:
            raise BaseModelError(s, f"cannot read: {e}") from e
    kset = set(keys)
    # base key -> its edits, applied in this order: ("replace", j, rank) (a saved tensor of the
    # adapter: modules_to_save, the base layer PEFT saves with an embedding's LoRA; by rank),
    # ("delta", i), ("bias", j, i)
    edits: dict[str, list[tuple]] = {}
    want: list[tuple[str, tuple[int, ...], str]] = []  # (base key, the shape an edit needs, what needs it)
    magnitude = {x["module"]: j for j, x in enumerate(c.carried) if x["role"] == "dora_magnitude"}
    for i, m in enumerate(c.modules):
        k = _match_key(m.name, kset, "weight")
        if k is None:
            raise BaseModelError(base, f"module {m.name} of the adapter has no weight in the base model")
        if m.name in magnitude and m.kind == "embedding":
            raise ExportError(
                c.path, f"merging DoRA on an embedding ({m.name}) is not supported; expand with --to peft"
            )
        edits.setdefault(k, []).append(("delta", i))
        if m.name in magnitude:
            mag = c.stored_shape(c.carried[magnitude[m.name]]["tensor"])
            if math.prod(mag) != m.out_features:
                raise ContainerError(
                    c.path,
                    f"module {m.name}: its DoRA magnitude has shape {list(mag)}, expected {m.out_features} values",
                )
        want.append(
            (
                k,
                (m.in_features, m.out_features) if m.dense_transposed else (m.out_features, m.in_features),
                f"module {m.name}: its update",
            )
        )
    for j, x in enumerate(c.carried):
        if x["role"] == "lora_bias":
            k = _match_key(x["module"], kset, "bias")
            if k is None:
                raise BaseModelError(
                    base, f"module {x['module']} has a LoRA bias but the base layer has no bias to merge it into"
                )
            i = next(i for i, m in enumerate(c.modules) if m.name == x["module"])
            edits.setdefault(k, []).append(("bias", j, i))
            want.append((k, (c.modules[i].out_features,), f"module {x['module']}: its LoRA bias"))
        elif x["role"] in ("modules_to_save", "embedding_base"):
            name = x["key"].removeprefix(PREFIX)
            name = (
                name.replace(".base_layer.weight", ".weight")
                .replace(".base_layer.bias", ".bias")  # bias="all"/"lora_only": the trained bias of a LoRA layer
                .replace(".modules_to_save.", ".")
                .replace(".original_module.", ".")
            )
            k = name if name in kset else _match_key(name.rsplit(".", 1)[0], kset, name.rsplit(".", 1)[1])
            if k is None:
                raise BaseModelError(base, f"tensor {x['key']} of the adapter has no counterpart in the base model")
            # several saved tensors may name one base tensor (bias="all" saves a modules_to_save
            # module's original bias too): the copy PEFT runs with, modules_to_save, is applied last
            rank = 2 if ".modules_to_save." in x["key"] else 0 if ".original_module." in x["key"] else 1
            edits.setdefault(k, []).append(("replace", j, rank))
            want.append((k, c.stored_shape(x["tensor"]), f"tensor {x['key']} of the adapter"))
    for k, shape, what in want:
        if shapes[k] != tuple(shape):
            raise BaseModelError(
                keys[k],
                f"{what} is {list(shape)} but the base weight {k} is {list(shapes[k])} "
                "(a base model of another size than the adapter's?)",
            )
    with torch.no_grad(), atomic_dir(out) as tmp:
        for f in sorted(base.iterdir()):
            if f.is_file() and f not in shards:
                shutil.copy2(f, tmp / f.name)
        for s in shards:
            with safe_open(s, framework="pt") as fh:
                meta = fh.metadata()
                plan = [(n, ST_TORCH[dt], shape) for n, (shape, dt) in tensor_index(fh).items()]
                with StreamingWriter(tmp / s.name, plan, meta) as w:
                    for n, dt, _ in plan:
                        t = fh.get_tensor(n)
                        for e in sorted(edits.get(n, ()), key=_edit_order):
                            t = _apply(c, form, e, t, magnitude, s)
                        w.write(n, t.to(dt).contiguous())
    return {"output": str(out), "base_model": str(base), "shards": len(shards), "edited_tensors": len(edits)}


def _edit_order(e: tuple) -> tuple[int, int]:
    return {"replace": 0, "delta": 1, "bias": 2}[e[0]], e[2] if e[0] == "replace" else 0


def _apply(c: Container, form: Form, e: tuple, t: torch.Tensor, magnitude: dict[str, int], shard: Path) -> torch.Tensor:
    if e[0] == "replace":
        return c.carried_tensor(e[1])
    if e[0] == "bias":
        m = c.modules[e[2]]
        return t.float() + m.scale * c.carried_tensor(e[1]).float()
    i = e[1]
    m = c.modules[i]
    W = t.float()
    d = _delta(form, i, m, torch.float32)
    if W.shape != d.shape:
        raise BaseModelError(
            shard, f"module {m.name}: base weight has shape {list(W.shape)} but the adapter's update is {list(d.shape)}"
        )
    W = W + d
    if m.name in magnitude:
        Wo = W.T if m.dense_transposed else W  # (out, in), PEFT's DoRA convention
        norm = torch.linalg.norm(Wo, dim=1)
        Wo = (c.carried_tensor(magnitude[m.name]).float() / norm)[:, None] * Wo
        W = Wo.T if m.dense_transposed else Wo
    return W
