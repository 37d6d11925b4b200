"""The public Python API behind every CLI command (the CLI only parses and prints).

``compress`` (:mod:`adaptzip.pipeline`), ``expand`` (:mod:`adaptzip.export` and each form's
native exports), ``verify``, ``inspect`` and ``list_forms``; ``batch`` is :func:`adaptzip.zoo.batch`
and ``report`` :func:`adaptzip.report.report`.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import torch

from . import container as ct
from . import export, linalg, pipeline, runtime
from .adapter import TORCH_DTYPES, load_adapter
from .errors import ExportError, OptionError
from .fileio import check_output
from .forms import BASELINE, REGISTRY, get_form
from .forms.base import config_fields
from .options import CalibrationOptions, CompressResult, FitOptions, QuantOptions, RunOptions

EXPAND_TARGETS = ("peft", "dense", "merged")  # for every form; forms may add their own (Form.native_exports)


def compress(
    lora_dir: str | Path,
    output: str | Path,
    *,
    to: str = BASELINE,
    budget: str | float | None = None,
    options: dict[str, Any] | None = None,
    fitting: FitOptions | None = None,
    calibration: CalibrationOptions | None = None,
    quant: QuantOptions | None = None,
    run: RunOptions | None = None,
    **form_options: Any,
) -> CompressResult:
    """Fit the PEFT LoRA in ``lora_dir`` into form ``to`` and write one container to ``output``.

    ``budget``: a fraction of the source's bytes (``0.25``) or a size (``"5MB"``): the whole
    container file fits it. Form hyperparameters (``adaptzip forms``) come as keyword arguments
    (``rank=4``) or as the dict ``options``. ``to='auto'`` (needs a budget and a base model) tries
    every form and keeps the lowest eval KL. The rest is grouped (:mod:`adaptzip.options`):
    ``fitting`` (dtype, seed, Σ, fit steps, baseline), ``calibration`` (base model and text:
    Σ-weighted fit, distillation, KL metrics), ``quant`` (quantised storage) and ``run`` (force,
    progress, recorded command). Returns a :class:`~adaptzip.options.CompressResult`; its
    ``to_json()`` is what ``adaptzip compress --json`` prints."""
    run = run or RunOptions()
    with runtime.threads(run.threads):
        return pipeline.compress(
            lora_dir,
            output,
            to=to,
            budget=budget,
            form_options={**(options or {}), **form_options},
            fitting=fitting or FitOptions(),
            calibration=calibration,
            quant=quant or QuantOptions(),
            run=run,
        )


def expand_targets() -> list[str]:
    """Every ``expand --to`` target: the generic ones, then each form's native exports."""
    extra = sorted({t for cls in REGISTRY.values() for t in cls.native_exports()})
    return list(EXPAND_TARGETS) + [t for t in extra if t not in EXPAND_TARGETS]


def expand(
    container: str | Path,
    output: str | Path,
    *,
    to: str = "peft",
    target: str = "peft",
    max_lora_rank: int | None = None,
    base_model: str | Path | None = None,
    dtype: str | None = None,
    force: bool = False,
) -> dict:
    """Restore a container as a PEFT LoRA directory (``to='peft'``; ``target='vllm'`` for vLLM's
    loader), a dense ΔW file (``to='dense'``), a merged model (``to='merged'``, needs
    ``base_model``) or a form's own native export (e.g. ``to='peft-vblora'``)."""
    c = ct.open_container(container)
    output = Path(output)
    srcs = (c.path,) + ((Path(base_model),) if base_model else ())
    check_output(output, force, sources=srcs, folder=to != "dense")
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
    native = get_form(c.form_name).native_exports()
    if to in native:
        export.refuse_runtime_features(c, f"--to {to}")
        return native[to](c, output, dtype=dtype)
    if to in expand_targets():
        raise ExportError(
            c.path,
            f"--to {to}: not offered by form {c.form_name} (its targets: "
            f"{', '.join(list(EXPAND_TARGETS) + sorted(native))}); use --to peft for a LoRA",
        )
    raise OptionError(None, f"--to {to!r}: expected one of {', '.join(expand_targets())}")


def verify(container: str | Path) -> dict:
    """Check every invariant of formats/container.md §6 — the manifest (schema, version, module
    table, form), the tensors against the form's specs, the payload hash, finite values,
    quantised parts, the shared file, the form rebuilt from its tensors; raises ContainerError
    naming the file and the first problem. ``expand`` and ``report`` run the same checks."""
    return ct.open_container(container).verify()


def inspect(lora_dir: str | Path, *, top_k: tuple[int, ...] = (1, 2, 4, 8)) -> dict:
    """Facts about a PEFT LoRA adapter and a per-module spectrum summary (from the factors).
    ``config_mismatch`` (None when they agree) says where adapter_config.json's target_modules and
    the tensors disagree (:attr:`adaptzip.adapter.Adapter.config_mismatch`), with a ``message``."""
    ad = load_adapter(lora_dir)
    by_type = Counter(m.type_key for m in ad.modules)
    by_layer = Counter("none" if m.layer is None else f"{m.stack}.{m.layer}" for m in ad.modules)
    mods = []
    with torch.no_grad():
        for m, B, A in ad.iter_factors():
            s = linalg.factored_svd(B, A)
            mods.append(
                {
                    "name": m.name,
                    "layer": m.layer,
                    "type": m.type,
                    "kind": m.kind,
                    "in": m.in_features,
                    "out": m.out_features,
                    "rank": m.rank,
                    "alpha": m.alpha,
                    "scale": m.scale,
                    "norm": float(s.S.double().pow(2).sum().sqrt()),
                    "effective_rank": linalg.effective_rank(s.S),
                    "energy_top": {str(k): linalg.energy_top(s.S, k) for k in top_k if k <= m.rank},
                }
            )
    return {
        **ad.summary(),
        "modules_per_type": dict(sorted(by_type.items())),
        "modules_per_layer": dict(by_layer),
        "ranks": dict(Counter(str(m.rank) for m in ad.modules)),
        "alphas": dict(Counter(str(m.alpha) for m in ad.modules)),
        "scales": dict(Counter(f"{m.scale:.6g}" for m in ad.modules)),
        "modules": mods,
    }


def list_forms() -> list[dict]:
    """Every registered form with its options (internal ones left out), defaults and exports."""
    return [
        {
            "name": n,
            "summary": c.summary,
            "options": [o for o in config_fields(c.Config) if not o.pop("internal")],
            "exports": list(EXPAND_TARGETS) + sorted(c.native_exports()),
        }
        for n, c in sorted(REGISTRY.items())
    ]
