"""Sizes: parsing ``--budget``, and fitting a form so that its whole container file fits one.

A container's size is its payload (what a form's configuration controls) plus a header (module
table, manifest, metrics, tensor entries) and carried tensors, which are only known once built.
:func:`fit_within` is the one loop that reconciles the two — every "refit until the file fits"
search (a form's configuration, a quantisation plan, a bit allocation) runs through it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

import torch

from . import container as ct
from . import quant as qz
from .adapter import DTYPE_NAMES, TORCH_DTYPES, Adapter
from .errors import OptionError
from .forms import FitContext, Form, baseline_form

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*$", re.I)
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


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
    """The container float dtype: ``dtype`` (fp16, bf16, fp32) or the source's."""
    if dtype is None:
        return adapter.dtype if adapter.dtype in DTYPE_NAMES else torch.float32
    if dtype not in TORCH_DTYPES:
        raise OptionError(None, f"--dtype {dtype!r}: expected one of fp16, bf16, fp32")
    return TORCH_DTYPES[dtype]


def fit_within(
    target: int,
    overhead: int,
    attempt: Callable[[int], tuple[T, int, int] | None],
    *,
    tries: int = 8,
    margin: int = 64,
    give_back: bool = True,
) -> T | None:
    """The largest result of ``attempt`` whose file fits ``target`` bytes, or None.

    ``attempt(allowance)`` fits something within ``allowance`` payload bytes and returns
    ``(result, size, used)``: the real file bytes and the payload bytes it used (None: nothing
    new to try). ``overhead`` estimates the bytes beyond the payload; each attempt corrects it:
    an overshoot shrinks the next allowance by the excess (plus ``margin/4``), and
    (``give_back``) a file more than ``margin`` below the target whose estimate was more than
    ``margin`` too high gives that reserve back to the payload (keeping ``margin/2``).
    After a fit, an overshoot stops the search: the fitting result is kept."""
    best: tuple[T, int] | None = None
    for _ in range(tries):
        allowance = target - overhead
        if allowance < 0:
            break
        got = attempt(allowance)
        if got is None:
            break
        result, size, used = got
        unmodelled = size - used  # the real header and carried bytes of this result
        if size <= target:
            if best is None or size > best[1]:
                best = (result, size)
            if not give_back or target - size <= margin or overhead - unmodelled <= margin:
                break
            overhead = unmodelled + margin // 2
        else:
            if best is not None:
                break
            overhead = max(overhead + size - target, unmodelled) + margin // 4
    return None if best is None else best[0]


def header_estimate(adapter: Adapter) -> int:
    """A first estimate of a container's bytes beyond the form's payload: carried tensors, the
    module table and source config as the manifest holds them, and the tensor entries."""
    carried = sum(
        adapter.carried_tensor(c.key).numel() * adapter.carried_tensor(c.key).element_size() for c in adapter.carried
    )
    table = json.dumps([m.to_json() for m in adapter.modules]) + json.dumps(adapter.config)
    return carried + len(table) + 1024 + 96 * 2 * len(adapter.modules)


@dataclass(frozen=True)
class FitRequest:
    """One fit to make: the source adapter, the form class and its configuration, the bytes the
    whole container may take (``budget``; None: the configuration as given), the container float
    dtype and the fit context (Σ, seed, per-run caches)."""

    adapter: Adapter
    form_cls: type[Form]
    config: Any
    budget: int | None
    dtype: torch.dtype
    ctx: FitContext

    def but(self, **changes: Any) -> FitRequest:
        """The same request with some fields changed (e.g. another form, another budget)."""
        return dataclasses.replace(self, **changes)


class Built(NamedTuple):
    """A fitted form and its container, built but not yet written: tensors, manifest, file size."""

    form: Form
    tensors: dict[str, torch.Tensor]
    manifest: dict
    size: int
    timings: dict = {}  # measured times (distillation seconds, tokens/s): reported, never stored


def fit_to_budget(
    req: FitRequest,
    *,
    metrics_fn: Callable[[Form, int], dict] | None = None,
    command: str | None = None,
    quant: str = "none",
    group_size: int = qz.DEFAULT_GROUP,
) -> Built:
    """Fit a form (choosing its configuration for the budget when one is given) so that the whole
    container file, header and manifest (with the metrics ``metrics_fn(form, size)`` returns)
    included, fits the budget. ``quant``: a fixed storage scheme (none, int8, int4, int4-asym)
    for the form's float tensors; the configuration is then chosen at its bytes per value, and
    ``metrics_fn`` sees the form as stored (dequantised)."""
    adapter, dtype, ctx = req.adapter, req.dtype, req.ctx
    fb = qz.bytes_per_value(quant, group_size, dtype)

    def build(form: Form) -> Built:
        storage = ct.storage_plan(form, quant, group_size, dtype)
        tensors, manifest = ct.build(form, adapter, dtype, command=command, storage=storage)
        size = ct.serialized_size(tensors, manifest)
        if metrics_fn is not None:
            stored = ct.decoded_form(form, tensors, manifest)  # measure what is stored (dtype cast, quantised)
            metrics = metrics_fn(stored, size)
            tensors, manifest = ct.build(form, adapter, dtype, metrics=metrics, command=command, storage=storage)
            size = ct.serialized_size(tensors, manifest)
        return Built(form, tensors, manifest, size)

    if req.budget is None:
        return build(req.form_cls.fit(adapter, req.config, ctx))
    overhead = header_estimate(adapter)
    if req.budget - overhead <= 0:
        raise OptionError(
            adapter.path, f"--budget of {req.budget} bytes is below the container's fixed overhead (~{overhead} bytes)"
        )
    tried: list[Any] = []

    def attempt(allowance: int):
        cfg = req.form_cls.config_for_budget(adapter, req.config, allowance, fb, ctx)
        if cfg in tried:
            return None  # the reserve given back buys this form nothing: keep the fit we have
        tried.append(cfg)
        built = build(req.form_cls.fit(adapter, cfg, ctx))
        payload = sum(t.numel() * t.element_size() for n, t in built.tensors.items() if not n.startswith("carry."))
        return built, built.size, payload

    best = fit_within(req.budget, overhead, attempt, margin=256)
    if best is None:
        raise OptionError(adapter.path, f"could not fit form {req.form_cls.name} into {req.budget} bytes")
    return best


def svd_baseline(adapter: Adapter, budget_bytes: int, dtype: torch.dtype, ctx: FitContext) -> tuple[Form, int]:
    """The per-module SVD with global rank allocation whose container has the same bytes."""
    cls = baseline_form()
    try:
        built = fit_to_budget(FitRequest(adapter, cls, cls.Config(), budget_bytes, dtype, ctx))
    except OptionError:  # smaller than any container with one direction (a tiny shared form): store none
        empty = cls.directions(adapter, cls.Config(), ctx).with_ranks([0] * len(adapter.modules))
        built = fit_to_budget(FitRequest(adapter, cls, empty, None, dtype, ctx))
    return built.form, built.size
