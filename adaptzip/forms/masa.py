"""``masa``: multi-A shared adaptation (MASA) — layers in a group share N A-experts, each layer
keeps its own B.

Layout. Modules are keyed by (``type_key``, ``in_features``, ``kind``): one key per module type
of a layer stack (``model.layers.*.self_attn.q_proj`` …), so types with different in-features
never share experts. Within a key the modules are ordered by layer index and cut into groups of
S consecutive ones (``--group``); the last group is smaller when S does not divide the count.
A module without a layer index is a group of its own. Group k stores N experts A_i^(k)
(``--experts``, each r_k×in) and every module ℓ of it stores B_ℓ (out×r_k, scale folded in)::

    ΔŴ_ℓ = B_ℓ · Σ_i A_i^(k)          r_k = min(rank, Σ_{ℓ∈k} min(rank_ℓ, out_ℓ), in)

Fit (closed form, no dense ΔW). For a group the best shared row space of rank r is the top-r right
singular subspace of the vertically stacked updates [ΔW_1; …; ΔW_S] (Eckart–Young on the stack:
with A's rows orthonormal, B_ℓ = ΔW_ℓ Aᵀ and the stack's residual is what the truncation drops).
It is computed from the factors: with F_ℓ the r×r root of B_ℓᵀB_ℓ (‖B_ℓ x‖ = ‖F_ℓ x‖), the
stack has the right singular vectors and values of C = [F_1 A_1; …; F_S A_S] ((Σ r_ℓ)×in), found
by a QR of Cᵀ and the SVD of a small (Σ r_ℓ)² core. Then each B_ℓ = argmin_B ‖ΔW_ℓ − B A_sum‖
by least squares (``linalg.lstsq_B``; = ΔW_ℓ Aᵀ if A's rows were orthonormal): the whole fit is
the global optimum of Σ_ℓ ‖ΔW_ℓ − B_ℓ A_sum‖² over the group.

Σ-weighted fit (calibration statistics). Layers of a group have different input statistics Σ_ℓ,
and no closed form exists for Σ_ℓ ‖(ΔW_ℓ − B_ℓ A) L_ℓ‖² in general. We write Σ_ℓ = c_ℓ Σ̂_ℓ with
c_ℓ = tr(Σ_ℓ)/in (the layer's activation energy) and use the group's mean shape Σ̄ = mean_ℓ Σ̂_ℓ
(= L̄ L̄ᵀ) with each layer's energy kept as a row weight: the subspace is the top-r right singular
subspace of [√c_1 ΔW_1 L̄; …; √c_S ΔW_S L̄], mapped back through L̄⁻¹. This is the exact optimum
whenever the Σ_ℓ of a group are proportional (identical ones included); otherwise it is the
optimum for the averaged shape. B_ℓ is then solved by least squares with the module's own Σ_ℓ,
which is optimal given A. A module of a group without statistics counts as Σ_ℓ = I (as the
evaluation does). Everything is computed from (Σ r_ℓ)² Gram products X Σ_ℓ Xᵀ of the stacked A rows
(:func:`_weighted_subspace`), never from an in×in Σ, so Σ sketches (:mod:`adaptzip.sigma`) serve:
the rows of A_sum leave each layer's own row space, so there they weigh with the sketch's
approximation of Σ_ℓ (the error that costs is measured in ``bench/bench_sigma.py``).

Gauge. B A = (B D⁻¹)(D A): rows of A_sum are scaled by d_i = √(s_i/√S) (s_i the stack's singular
values), so that A's row norms match the typical column norms of the B_ℓ (useful for fp16 storage
and for distillation from this start).

Experts. Under summation the N experts act only through A_sum: N > 1 stores (N−1)·r_k·in extra
values per group without changing any ΔŴ, so the default is N = 1 (the paper uses 5; pass
``--experts 5`` to seed MASA training with the paper's layout). A_sum is split by a seeded
disjoint-support rule: for each group in order, ``idx = torch.randint(N, (r_k, in), generator=g)``
with ``g = torch.Generator().manual_seed(seed)`` drawn once for the whole fit, and expert i holds
A_sum where idx == i and 0 elsewhere. Every element of A_sum lives in exactly one expert, so the
experts sum to A_sum exactly in every storage dtype, and the same ``--seed`` gives the same split.
The byte cost of N > 1 is reported in ``fit_info`` (``redundant_expert_params``,
``redundant_expert_share``).

Stored tensors (formats/forms/masa.md): ``A.{k}`` (N×r_k×in_k) per group k, ``B.{i}``
(out_i×r_k) per module i; ``state`` records ``groups`` (module indices per group) and ``ranks``
(r_k per group).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import linalg
from ..adapter import Adapter, ModuleInfo
from ..errors import ContainerError, OptionError
from ..progress import progress_bar
from .base import FitContext, Form, TensorSpecs, a_side, register

Tensor = torch.Tensor


@dataclass
class MasaConfig:
    rank: int = field(
        default=8,
        metadata={
            "help": "rank r of the shared A (per group; capped by the group's total source rank and in-features)"
        },
    )
    group: int = field(
        default=2,
        metadata={
            "help": "S: consecutive layers of one module type that share their A-experts (the last group is smaller when S does not divide the layer count)"
        },
    )
    experts: int = field(
        default=1,
        metadata={
            "help": "N: A-experts per group, ΔW_ℓ = B_ℓ Σ_i A_i. Under the sum they act as one A, so N > 1 costs (N−1)·r·in values per group without changing ΔŴ; 5 reproduces the paper's layout for further MASA training"
        },
    )

    def __post_init__(self):
        for name in ("rank", "group", "experts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer, got {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be ≥ 1, got {v}")


# ----------------------------------------------------------------------------- layout
def make_groups(modules: Sequence[ModuleInfo], group: int) -> list[list[int]]:
    """Module indices per group: modules keyed by (type_key, in_features, kind), ordered by layer,
    cut into runs of ``group``; modules without a layer index are groups of one. Groups are ordered
    by their first module's index (deterministic)."""
    by_key: dict[tuple, list[int]] = {}
    singles: list[list[int]] = []
    for i, m in enumerate(modules):
        if m.layer is None:
            singles.append([i])
        else:
            by_key.setdefault((m.type_key, m.in_features, m.kind), []).append(i)
    groups = list(singles)
    for idx in by_key.values():
        idx = sorted(idx, key=lambda i: modules[i].layer)
        groups += [idx[j : j + group] for j in range(0, len(idx), group)]
    return sorted(groups, key=lambda g: g[0])


def group_rank(modules: Sequence[ModuleInfo], members: Sequence[int], rank: int) -> int:
    """r_k = min(rank, Σ_ℓ min(rank_ℓ, out_ℓ), in): the stack has no more directions than that."""
    return min(
        rank, sum(min(modules[i].rank, modules[i].out_features) for i in members), modules[members[0]].in_features
    )


def stored_params(
    modules: Sequence[ModuleInfo], groups: Sequence[Sequence[int]], ranks: Sequence[int], experts: int
) -> tuple[int, int]:
    """(A-expert values, B values) stored for a layout: Σ_k N·r_k·in_k and Σ_ℓ out_ℓ·r_k."""
    a = sum(experts * r * modules[g[0]].in_features for g, r in zip(groups, ranks))
    b = sum(modules[i].out_features * r for g, r in zip(groups, ranks) for i in g)
    return a, b


def _check_state(modules: Sequence[ModuleInfo], state: dict) -> tuple[list[list[int]], list[int]]:
    """The manifest's ``groups``/``ranks``, checked to describe a valid layout of ``modules``."""
    try:
        groups = [[int(i) for i in g] for g in state["groups"]]
        ranks = [int(r) for r in state["ranks"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ContainerError(None, f"masa state needs lists 'groups' and 'ranks' ({type(e).__name__}: {e})") from e
    if len(groups) != len(ranks):
        raise ContainerError(None, f"masa state has {len(groups)} groups but {len(ranks)} ranks")
    seen = sorted(i for g in groups for i in g)
    if seen != list(range(len(modules))):
        raise ContainerError(None, f"masa state groups do not cover the {len(modules)} modules exactly once")
    for k, (g, r) in enumerate(zip(groups, ranks)):
        ins = {modules[i].in_features for i in g}
        if len(ins) != 1:
            raise ContainerError(None, f"masa group {k} mixes in-features {sorted(ins)} (modules {g})")
        if r < 1:
            raise ContainerError(None, f"masa group {k} has rank {r} (must be ≥ 1)")
    return groups, ranks


# ----------------------------------------------------------------------------- fit
def _gram_root(B: Tensor) -> Tensor:
    """F (r×r) with Fᵀ F = Bᵀ B, so ‖F x‖ = ‖B x‖ for every x: the symmetric root of the r×r
    Gram matrix (eigh; exact for rank-deficient B). Replaces a QR of the tall B (out×r) by one
    GEMM; directions of B below √eps·‖B‖ carry < eps of the energy."""
    lam, U = torch.linalg.eigh(B.T @ B)
    return lam.clamp_min(0).sqrt()[:, None] * U.T


def _stack_core(facs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """From fp64 factors (B_ℓ, A_ℓ): C = [F_ℓ A_ℓ] stacked ((Σ r_ℓ)×in, fp64), F_ℓᵀF_ℓ = B_ℓᵀB_ℓ: Cᵀ C
    equals the Gram matrix of the stacked [ΔW_ℓ], so both have the same right singular vectors and values."""
    return torch.cat([_gram_root(B) @ A for B, A in facs], 0)


def _top_right_subspace(C: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k right singular vectors (k×in, orthonormal rows) and all singular values of C (m×in),
    via QR of Cᵀ and the SVD of the small core; cost O(in·m² + m³)."""
    Q, R = torch.linalg.qr(C.T)  # in×p, p×m with p = min(in, m)
    _, s, vh = torch.linalg.svd(R.T, full_matrices=False)  # C = Rᵀ Qᵀ = u s (vh Qᵀ)
    return vh[:k] @ Q.T, s


def _weighted_subspace(
    facs: list[tuple[Tensor, Tensor]], sigmas: list[linalg.SigmaLike | None], k: int
) -> tuple[Tensor, Tensor]:
    """The top-k rows (k×in, input coordinates) and all singular values of the weighted stack
    C = [√c_ℓ F_ℓ A_ℓ L̄] (Σ̄ = L̄ L̄ᵀ the group's mean shape, c_ℓ = tr(Σ_ℓ)/in; missing Σ_ℓ count as
    I), from (Σ r_ℓ)² Gram products only — never an in×in matrix, so a Σ sketch serves as well.

    With X = [A_1; …; A_S] (R×in) and D = blockdiag(√c_ℓ F_ℓ), C = D X L̄ and C Cᵀ = D (X Σ̄ Xᵀ) Dᵀ
    (R×R): its eigenpairs (w, s²) give C's left singular vectors and values, and the right ones
    mapped back through L̄⁻¹ are the rows wᵀ D X / s (L̄ cancels). X Σ̄ Xᵀ = mean_ℓ X Σ_ℓ Xᵀ / c_ℓ,
    damped by 1e-6·X Xᵀ (Σ̄ has mean diagonal 1). Rows whose s is below 1e-12·s_max carry nothing
    and are zero. Every Σ_ℓ zero: the unweighted stack."""
    X = torch.cat([A for _, A in facs], 0)  # R×in
    n_in = X.shape[1]
    G = torch.zeros(X.shape[0], X.shape[0], dtype=X.dtype)
    cs: list[float] = []
    used = 0
    for S in sigmas:
        c = 1.0 if S is None else linalg.sigma_trace(S) / n_in
        cs.append(max(c, 0.0))
        if c > 0:
            G += linalg.gram(X, S) / c
            used += 1
    if used == 0:  # every Σ_ℓ is zero: nothing weights anything; fall back to the plain fit
        return _top_right_subspace(_stack_core(facs), k)
    G = G / used + 1e-6 * (X @ X.T)
    D = torch.block_diag(*(c**0.5 * _gram_root(B) for (B, _), c in zip(facs, cs)))
    lam, W = torch.linalg.eigh(D @ G @ D.T)
    s = lam.flip(0).clamp_min(0).sqrt()
    W = W.flip(1)[:, :k]
    sk = s[:k]
    ok = sk > 1e-12 * float(s[0]) if s.numel() else sk.bool()
    rows = (W.T @ D @ X) / torch.where(ok, sk, torch.ones_like(sk))[:, None]
    rows[~ok] = 0
    return rows, s


def split_experts(A_sum: Tensor, n: int, g: torch.Generator) -> Tensor:
    """N experts (N×r×in) with disjoint supports that sum to A_sum exactly: element (j, c) goes to
    expert ``idx[j, c]``, ``idx = torch.randint(n, (r, in), generator=g)``."""
    if n == 1:
        return A_sum[None].clone()
    idx = torch.randint(n, tuple(A_sum.shape), generator=g)
    experts = torch.zeros((n, *A_sum.shape), dtype=A_sum.dtype)
    experts.scatter_(0, idx[None], A_sum[None])  # experts[idx[j,c], j, c] = A_sum[j, c]
    return experts


# ----------------------------------------------------------------------------- form
@register
class MasaForm(Form):
    name = "masa"
    summary = "MASA: S consecutive layers of a type share N summed A-experts, each layer its own B (closed-form fit)"
    Config = MasaConfig
    native_tuner = "masa"

    def __init__(
        self,
        modules: Sequence[ModuleInfo],
        config: MasaConfig,
        groups: list[list[int]],
        ranks: list[int],
        experts: list[Tensor],
        Bs: list[Tensor],
    ):
        """``experts[k]``: N×r_k×in_k of group k; ``Bs[i]``: out_i×r_k of module i (scale folded)."""
        super().__init__(modules, config)
        self.groups = groups
        self.A = nn.ParameterList([nn.Parameter(e.float().contiguous()) for e in experts])
        self.B = nn.ParameterList([nn.Parameter(b.float().contiguous()) for b in Bs])
        self._group_of = [0] * len(modules)
        for k, g in enumerate(groups):
            for i in g:
                self._group_of[i] = k
        self.state_info = {"groups": [list(g) for g in groups], "ranks": [int(r) for r in ranks]}
        a, b = stored_params(modules, groups, ranks, config.experts)
        redundant = a - a // config.experts
        self.fit_info = {
            "groups": len(groups),
            "experts": config.experts,
            "expert_params": a,
            "b_params": b,
            "redundant_expert_params": redundant,  # (N−1)·Σ r_k·in_k: what N > 1 adds, ΔŴ unchanged
            "redundant_expert_share": redundant / max(a + b, 1),  # of the stored float values (= of their bytes)
        }

    # -- construction ---------------------------------------------------------
    @classmethod
    def fit(cls, adapter: Adapter, config: MasaConfig, ctx: FitContext) -> MasaForm:
        mods = adapter.modules
        groups = make_groups(mods, config.group)
        ranks = [group_rank(mods, g, config.rank) for g in groups]
        gen = torch.Generator().manual_seed(int(ctx.seed))
        experts: list[Tensor] = []
        Bs: list[Tensor | None] = [None] * len(mods)
        with torch.no_grad(), progress_bar(ctx.progress, "masa", len(groups)) as bar:
            for g, r in zip(groups, ranks):
                facs = [adapter.factors(mods[i], torch.float64) for i in g]  # (scale·B, A)
                sigmas = [ctx.sigma(mods[i]) for i in g]
                if all(S is None for S in sigmas):
                    Vh, s = _top_right_subspace(_stack_core(facs), r)  # r×in
                else:
                    Vh, s = _weighted_subspace(facs, sigmas, r)  # r×in, input coordinates
                s_r = s[:r]  # r ≤ len(s) by group_rank
                floor = float(s_r.max()) * 1e-8 if float(s_r.max()) > 0 else 1.0
                d = (s_r.clamp_min(floor) / len(g) ** 0.5).sqrt()  # gauge: A rows ~ per-layer B columns
                A_sum = d[:, None] * Vh  # r×in
                for i, (B, A), S in zip(g, facs, sigmas):
                    Bs[i] = linalg.lstsq_B(B, A, A_sum, S).float()
                experts.append(split_experts(A_sum.float(), config.experts, gen))
                bar()
        form = cls(mods, config, groups, ranks, experts, Bs)  # type: ignore[arg-type]
        note = ctx.cache.get(("masa", "budget", id(adapter)))
        if note is not None and note.get("rank") == config.rank and note.get("group") == config.group:
            form.fit_info["budget_choice"] = note
        return form

    @classmethod
    def fresh(cls, modules, config, gen):
        """Groups and ranks as a fit would lay them out; experts random (LoRA's A init), B = 0."""
        groups = make_groups(modules, config.group)
        state = {"groups": groups, "ranks": [group_rank(modules, g, config.rank) for g in groups]}
        tensors = {
            name: torch.zeros(shape) if name.startswith("B.") else a_side(shape, gen)
            for name, (shape, _) in cls.tensor_specs(modules, config, state).items()
        }
        return state, tensors

    @classmethod
    def sharing(cls, modules, config, state, metrics):
        groups = state["groups"]
        shared = [g for g in groups if len(g) > 1]
        if shared:
            return {"sharing_used": True, "why": f"{len(shared)} of {len(groups)} groups share their A across layers"}
        return {"sharing_used": False, "why": "every group holds one layer (S = 1): each layer keeps its own A"}

    @classmethod
    def config_for_budget(
        cls, adapter: Adapter, config: MasaConfig, budget_bytes: int, float_bytes: int, ctx: FitContext
    ) -> MasaConfig:
        """The largest rank whose payload fits ``budget_bytes`` for the given S and N (the error
        only falls with the rank). When not even rank 1 fits (every layer keeps its own B, so at
        small budgets the A's are what must shrink), S doubles — up to every layer in one group —
        until it does. Records the choice for ``fit_info``."""
        mods = adapter.modules
        layers = max((len(g) for g in make_groups(mods, 10**9)), default=1)
        group = config.group
        while True:
            groups = make_groups(mods, group)
            cap = max(group_rank(mods, g, 10**9) for g in groups)

            def payload(r: int, groups=groups) -> int:  # float_bytes may be fractional (quantised storage)
                a, b = stored_params(mods, groups, [group_rank(mods, g, r) for g in groups], config.experts)
                return math.ceil((a + b) * float_bytes)

            best = 0
            for r in range(1, cap + 1):
                if payload(r) > budget_bytes:
                    break
                best = r
            if best or group >= layers:
                break
            group = min(2 * group, layers)
        if best == 0:
            raise OptionError(
                adapter.path,
                f"masa ({config.experts} experts) needs {payload(1)} payload bytes at rank 1 even "
                f"with every layer in one group (--group {group}), but the budget leaves {budget_bytes}; "
                f"raise --budget" + (" or use --experts 1" if config.experts > 1 else ""),
            )
        ctx.cache[("masa", "budget", id(adapter))] = {
            "rank": best,
            "group": group,
            "requested_group": config.group,
            "experts": config.experts,
            "payload_bytes": payload(best),
            "budget_payload_bytes": int(budget_bytes),
            "next_rank_payload_bytes": payload(best + 1) if best < cap else None,
        }
        return dataclasses.replace(config, rank=best, group=group)

    @classmethod
    def tensor_specs(cls, modules, config, state) -> TensorSpecs:
        groups, ranks = _check_state(modules, state)
        specs: TensorSpecs = {}
        for k, (g, r) in enumerate(zip(groups, ranks)):
            specs[f"A.{k}"] = ((config.experts, r, modules[g[0]].in_features), None)
            for i in g:
                specs[f"B.{i}"] = ((modules[i].out_features, r), None)
        return specs

    @classmethod
    def from_tensors(cls, modules, config, state, tensors) -> MasaForm:
        groups, ranks = _check_state(modules, state)
        return cls(
            modules,
            config,
            groups,
            ranks,
            [tensors[f"A.{k}"] for k in range(len(groups))],
            [tensors[f"B.{i}"] for i in range(len(modules))],
        )

    # -- use --------------------------------------------------------------------
    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """(B_ℓ, Σ_i A_i): out×r_k and r_k×in, differentiable in the stored parameters."""
        return self.B[i], self.A[self._group_of[i]].sum(0)

    def tensors(self) -> dict[str, Tensor]:
        out = {f"A.{k}": a.detach() for k, a in enumerate(self.A)}
        out.update({f"B.{i}": b.detach() for i, b in enumerate(self.B)})
        return out
