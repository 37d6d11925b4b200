"""The factored objective and the optimiser shared by all forms.

Objective: Σ_m ‖ΔW_m − ΔŴ_m‖²_{Σ_m} / Σ_m ‖ΔW_m‖²_{Σ_m}, with ΔW_m = scale·B_m A_m the source
update and ΔŴ_m = form.factors(m) — computed from Gram products (``linalg.sq_error``), never from
dense matrices. Σ_m is the module's input second moment when statistics exist (a dense tensor or a
:class:`~adaptzip.sigma.SigmaSketch`, used only through :mod:`adaptzip.linalg`), else the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

from . import linalg
from .fileio import json_clean
from .progress import progress_bar

if TYPE_CHECKING:  # forms use the fitter, never the other way round
    from .adapter import Adapter
    from .forms.base import FitContext, Form


@dataclass
class Target:
    """Source factors of one module (scale folded into B) and its Σ (or None)."""

    B: torch.Tensor
    A: torch.Tensor
    Sigma: linalg.SigmaLike | None
    norm2: float


def targets(adapter: Adapter, ctx: FitContext) -> list[Target]:
    """Source updates in fp32 with their Σ-weighted squared norms (cached in ctx)."""
    key = ("targets", id(adapter))
    if key not in ctx.cache:
        out = []
        for m, B, A in adapter.iter_factors():
            S = ctx.sigma(m)
            out.append(Target(B, A, S, float(linalg.sq_norm(B, A, S))))
        ctx.cache[key] = out
    return ctx.cache[key]


def module_sq_errors(form: Form, tg: list[Target], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """‖ΔW_m − ΔŴ_m‖²_Σ per module (differentiable). The Gram formula cancels: in fp32 a relative
    error below ~3e-4 is noise, so reporting uses ``dtype=torch.float64``."""
    errs = []
    for i, t in enumerate(tg):
        B, A = form.factors(i)
        S = None if t.Sigma is None else t.Sigma.to(dtype)
        errs.append(linalg.sq_error(t.B.to(dtype), t.A.to(dtype), B.to(dtype), A.to(dtype), S))
    return torch.stack(errs)


@dataclass
class FitReport:
    rel_error: float  # sqrt(Σ err² / Σ ‖ΔW‖²): energy-weighted over modules
    worst_module_rel_error: float
    worst_module: str
    module_rel_errors: list[float]

    def to_json(self) -> dict:
        # JSON has no inf: a module whose source update is zero but whose fit is not gets null
        return json_clean(asdict(self))


@torch.no_grad()
def evaluate(form: Form, adapter: Adapter, ctx: FitContext) -> FitReport:
    """Relative errors of a form against its source (Σ-weighted when ctx has statistics)."""
    tg = targets(adapter, ctx)
    e2 = module_sq_errors(form, tg, torch.float64).clamp_min(0)
    n2 = torch.tensor([t.norm2 for t in tg], dtype=torch.float64)
    rel = [math.sqrt(float(e) / float(n)) if n > 0 else (0.0 if e == 0 else math.inf) for e, n in zip(e2, n2)]
    total = math.sqrt(float(e2.sum()) / max(float(n2.sum()), 1e-30))
    worst = max(range(len(rel)), key=rel.__getitem__)
    return FitReport(total, rel[worst], adapter.modules[worst].name, rel)


def optimise(
    form: Form,
    adapter: Adapter,
    ctx: FitContext,
    *,
    lr: float = 1e-2,
    max_steps: int = 500,
    tol: float = 1e-4,
    patience: int = 25,
    params=None,
    label: str = "fit",
    loss_fn: Callable[[], torch.Tensor] | None = None,
) -> list[float]:
    """Adam on the relative factored objective with early stopping: stop when the best loss has
    not improved by a relative ``tol`` in ``patience`` steps; the best state is restored.
    ``loss_fn``: a form's own (faster, e.g. batched) computation of the same relative objective.
    Returns the loss history."""
    tg = targets(adapter, ctx)
    total = max(sum(t.norm2 for t in tg), 1e-30)
    if loss_fn is None:

        def loss_fn() -> torch.Tensor:
            return module_sq_errors(form, tg).sum() / total

    params = [p for p in (params if params is not None else form.parameters()) if p.requires_grad]
    if not params:
        return []
    steps = ctx.max_steps if ctx.max_steps is not None else max_steps
    torch.manual_seed(ctx.seed)
    opt = torch.optim.Adam(params, lr=lr)
    best = math.inf
    best_state = [p.detach().clone() for p in params]
    since = 0
    history: list[float] = []
    with progress_bar(ctx.progress, label, steps) as bar:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            val = float(loss.detach())
            history.append(val)
            bar(loss=val)
            if val < best * (1 - tol):  # snapshot the parameters that produced this loss, before the step
                best, since = val, 0
                best_state = [p.detach().clone() for p in params]
            else:
                since += 1
            opt.step()
            if since >= patience:
                break
    with torch.no_grad():
        final = float(loss_fn())
        if final > best:
            for p, b in zip(params, best_state):
                p.copy_(b)
    return history


def refine(
    form: Form,
    adapter: Adapter,
    ctx: FitContext,
    *,
    solve: Callable[[], None] | None = None,
    params=None,
    lr: float = 1e-2,
    relative_lr: bool = True,
    max_steps: int = 300,
    round_steps: int = 25,
    tol: float = 1e-4,
    chunk_values: int = 1 << 22,
    label: str = "refine",
) -> list[float]:
    """Alternating refinement (block-coordinate descent): rounds of Adam steps on ``params``
    (default: every parameter), each closed by ``solve()``, a callable that sets some blocks to
    their exact minimiser given the others (a truncated SVD, a least-squares solve).

    ``relative_lr``: each tensor's learning rate is ``lr`` × its RMS at the start of the round, so
    factors of very different scales (a kernel vs a factor) move alike. Gradients are accumulated
    over chunks of modules whose factors hold about ``chunk_values`` entries (bounded memory on large
    adapters, few backward calls on small ones). Stops when a round lowers the relative
    loss by less than ``tol`` (relative), or after ``max_steps`` Adam steps in all (``ctx.max_steps``
    overrides). The loss is measured in fp64 after each ``solve()`` and the best state seen is
    restored. Returns the relative loss at the start and after each round."""
    tg = targets(adapter, ctx)
    total = max(sum(t.norm2 for t in tg), 1e-30)
    every = list(form.parameters())
    params = [p for p in (params if params is not None else every) if p.requires_grad]
    steps = ctx.max_steps if ctx.max_steps is not None else max_steps

    @torch.no_grad()
    def solved() -> float:
        """``solve()`` (the closed-form blocks), then the exact relative loss in fp64."""
        if solve is not None:
            solve()
        return float(module_sq_errors(form, tg, torch.float64).sum()) / total

    best = solved()
    history = [best]
    best_state = [p.detach().clone() for p in every]
    if not params or steps <= 0:
        return history
    torch.manual_seed(ctx.seed)
    done = 0
    with progress_bar(ctx.progress, label, steps) as bar:
        while done < steps:
            rms = [float(p.detach().pow(2).mean().sqrt()) if p.numel() else 0.0 for p in params]
            nz = [r for r in rms if r > 0]
            fallback = sum(nz) / len(nz) if nz else 1.0
            lrs = [lr * (r if r > 0 else fallback) if relative_lr else lr for r in rms]
            # one parameter group per tensor, each with its own learning rate
            opt = torch.optim.Adam([{"params": [p], "lr": r} for p, r in zip(params, lrs)], lr=lr)
            for _ in range(min(round_steps, steps - done)):
                opt.zero_grad()
                val, chunk, held = 0.0, None, 0
                for i, t in enumerate(tg):  # graphs of ~chunk_values factor entries at a time
                    B, A = form.factors(i)
                    e = linalg.sq_error(t.B, t.A, B, A, t.Sigma) / total
                    chunk = e if chunk is None else chunk + e
                    held += B.numel() + A.numel()
                    if held >= chunk_values or i == len(tg) - 1:
                        if chunk.requires_grad:
                            chunk.backward()
                        val += float(chunk.detach())
                        chunk, held = None, 0
                opt.step()
                done += 1
                bar(loss=val)
            cur = solved()
            history.append(cur)
            gain = (best - cur) / best if best > 0 else 0.0
            if cur < best:
                best = cur
                best_state = [p.detach().clone() for p in every]
            if gain < tol:
                break
    with torch.no_grad():
        for p, b in zip(every, best_state):
            p.copy_(b)
    return history
