"""BSLoRA (ICML 2025): local + intra-layer + inter-layer shared low-rank parts.

Every module m's update is the sum of three low-rank parts::

    ΔŴ_m = B_loc,m A_loc,m + T_m(B_intra[ℓ(m)] A_intra[ℓ(m)]) + T_m(B_inter A_inter)

with ranks L (local, per module), I (intra: one shared pair per layer, for that layer's modules)
and G (inter: one shared pair for every module). T_m maps a shared pair to module m's (out, in):

* ``bslora-ss`` — slice sharing: the pair is (max_out×r)(r×max_in) over its members; module m
  takes the centred slice ``[(max−d)//2, (max−d)//2 + d)`` of rows of B and of columns of A.
* ``bslora-gt`` — gate transformation: the pair is (d_s×r)(r×d_s); module m has rank-1 gates
  G_i = g_iu g_idᵀ (d_s×in) and G_o = g_ou g_odᵀ (out×d_s), and T_m(B A) = G_o B A G_i =
  (g_odᵀ B A g_iu)·g_ou g_idᵀ: rank ≤ 1 per module and level, by construction of the paper's
  gates. Its fit is therefore closed form and globally optimal: the per-module truncated SVD of
  rank L + (number of shared levels), its extra components routed through the gates.
* ``bslora-ke`` — Kronecker extension: the pair is (s×r)(r×s); module m has kernels
  K_A (1×⌈in/s⌉) and K_B (⌈out/s⌉×1); T_m = (K_B ⊗ B)(K_A ⊗ A) cropped to the first out rows and
  the first in columns (the paper's code floors and fails when s does not divide a dim; we crop).
  A shared size larger than every module dim is clamped to the largest dim: the cropped product is
  identical, the stored pair smaller; ``state.shared_size`` records what is stored.

``factors(i)`` returns the concatenation [B_loc | T(B_intra) | T(B_inter)] (out×k) and
[A_loc; T(A_intra); T(A_inter)] (k×in), k = L_i + I + G (levels the module does not take part in
are left out), built differentiably from the parameters. Layers are ``ModuleInfo.group``
(stack, layer) in order of first appearance; modules without a layer index take no intra part.
A level of rank 0 stores nothing. With ``--budget`` the shared ranks are kept (halved while they
would take more than half the budget) and per-module local ranks are allocated greedily by
source energy per byte (the rule of the svd baseline), recorded as ``state.ranks``.

Fit (SS, KE), never forming a dense ΔW:
1. initialisation, two orders tried and the better kept: *shared-first* (the inter pair from the
   dominant joint subspace of all modules' back-projected updates, the intra pairs likewise from
   each layer's residual, then local = truncated SVD of each module's residual) and *local-first*
   (local SVD first, shared pairs from what it leaves, local re-solved). The joint subspace is a
   randomized subspace iteration on N = Σ_m T_m*(R_m) applied through the factors; every shared
   pair is then scaled by an exact (Σ-weighted) line search, so no level can raise the loss. KE
   alternates the shared pair with the kernels (a weighted rank-1 least squares per module).
2. refinement (:func:`adaptzip.fit.refine`): rounds of Adam on all parameters, each closed by the
   exact local solve (Σ-weighted truncated SVD of the residual), with early stopping; the best
   state is kept, so the result is never worse than the initialisation, which is never worse than
   the local-only truncated SVD of rank L.
Σ_m (``ctx.sigma``) weights every error, line search and local SVD; the joint-subspace and kernel
steps of the initialisation are unweighted (the refinement optimises the weighted objective).

One form family, one file (hence over ~500 lines): it holds the three transforms, their shared layout and
closed-form initialisation and the budget search, which only make sense together.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import fit as fitter
from .. import linalg
from ..adapter import Adapter, ModuleInfo
from ..errors import ContainerError, OptionError
from ..progress import progress_bar
from . import svd as svd_form
from .base import FitContext, Form, TensorSpecs, a_side, register

Tensor = torch.Tensor
LEVELS = ("intra", "inter")  # order of the shared parts in factors(i), after the local part
FIT_ORDER = ("inter", "intra")  # order in which the initialisation fits them
# Adam refinement: a deterministic work bound (flop estimate) so a Llama-7B-shaped fit stays near a
# minute on 2 CPU cores; small adapters get the full step count.
REFINE_WORK = 2.5e11
REFINE_MAX_STEPS = 300

_RANKS_HELP = (
    "ranks L,I,G: local rank per module, intra-layer shared rank (one pair per layer), "
    "inter-layer shared rank (one pair for all modules); 0 leaves a part out"
)
_LOCAL_HELP = "per-module local ranks (set by --budget): override L"
_STEPS_HELP = (
    "Adam steps after the closed-form initialisation (default: automatic, ≤ 300 and bounded so a "
    "Llama-7B-shaped adapter fits in about a minute on 2 cores; 0: initialisation only)"
)


# ----------------------------------------------------------------------------- configs
def _int(name: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an integer, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be ≥ {minimum}, got {v}")
    return v


def _check_ranks(ranks: Any) -> tuple[int, int, int]:
    if isinstance(ranks, (str, bytes)) or not hasattr(ranks, "__len__") or len(ranks) != 3:
        raise ValueError(f"ranks must be three integers L,I,G (local, intra-layer, inter-layer), got {ranks!r}")
    out = tuple(_int(f"ranks[{k}] ({n})", v, 0) for k, (n, v) in enumerate(zip("LIG", ranks)))
    if sum(out) == 0:
        raise ValueError("ranks 0,0,0 store nothing: give at least one positive rank")
    return out  # type: ignore[return-value]


def _check_local(local: Any) -> tuple[int, ...] | None:
    if local is None:
        return None
    return tuple(_int(f"local_ranks[{k}]", v, 0) for k, v in enumerate(local))


@dataclass
class SSConfig:
    ranks: tuple[int, int, int] = field(default=(2, 4, 32), metadata={"help": _RANKS_HELP})
    steps: int | None = field(default=None, metadata={"help": _STEPS_HELP})
    local_ranks: tuple[int, ...] | None = field(default=None, metadata={"help": _LOCAL_HELP, "internal": True})

    def __post_init__(self):
        self.ranks = _check_ranks(self.ranks)
        self.steps = None if self.steps is None else _int("steps", self.steps, 0)
        self.local_ranks = _check_local(self.local_ranks)


@dataclass
class GTConfig:
    ranks: tuple[int, int, int] = field(default=(2, 8, 16), metadata={"help": _RANKS_HELP})
    shared_size: int | None = field(
        default=None,
        metadata={
            "help": "d_s: width of the shared pair (d_s×r)(r×d_s) and of the gates; any d_s ≥ 1 works (each level adds rank ≤ 1 per module). Default: the model width / 4 (the paper's 1024 at width 4096); a larger d_s only costs bytes"
        },
    )
    local_ranks: tuple[int, ...] | None = field(default=None, metadata={"help": _LOCAL_HELP, "internal": True})

    def __post_init__(self):
        self.ranks = _check_ranks(self.ranks)
        self.shared_size = None if self.shared_size is None else _int("shared_size", self.shared_size, 1)
        self.local_ranks = _check_local(self.local_ranks)


@dataclass
class KEConfig:
    ranks: tuple[int, int, int] = field(default=(2, 4, 16), metadata={"help": _RANKS_HELP})
    shared_size: int = field(
        default=256,
        metadata={
            "help": "s: the shared pair is (s×r)(r×s), tiled ⌈out/s⌉×⌈in/s⌉ times by per-module kernels and cropped; clamped to the largest module dim (so it scales down with small adapters)"
        },
    )
    steps: int | None = field(default=None, metadata={"help": _STEPS_HELP})
    local_ranks: tuple[int, ...] | None = field(default=None, metadata={"help": _LOCAL_HELP, "internal": True})

    def __post_init__(self):
        self.ranks = _check_ranks(self.ranks)
        self.shared_size = _int("shared_size", self.shared_size, 1)
        self.steps = None if self.steps is None else _int("steps", self.steps, 0)
        self.local_ranks = _check_local(self.local_ranks)


def default_shared_size(modules: Sequence[ModuleInfo], fraction: float) -> int:
    """``fraction`` × the model width (the narrowest in-features of an adapted module: the hidden
    size of a transformer), at least 1 — the paper's sizes for Llama-7B (width 4096), scaled."""
    return max(1, round(fraction * min(m.in_features for m in modules)))


# ----------------------------------------------------------------------------- layout
def layer_groups(modules: Sequence[ModuleInfo]) -> list[list[int]]:
    """Module indices per layer ``(stack, layer)``, layers in order of first appearance; modules
    without a layer index belong to none."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(modules):
        if m.layer is not None:
            groups.setdefault(m.group, []).append(i)
    return list(groups.values())


@dataclass
class Layout:
    """Which parts a container holds: local rank per module, rank per level (0: absent), the
    members of each shared pair, and the shared size (GT, KE)."""

    local: list[int]
    rank: dict[str, int]
    slots: dict[str, list[list[int]]]  # level -> member module indices of each shared pair
    slot_of: dict[str, dict[int, int]]  # level -> module index -> its pair
    shared_size: int | None

    def levels_of(self, i: int) -> list[str]:
        return [lv for lv in LEVELS if i in self.slot_of[lv]]


def make_layout(modules: Sequence[ModuleInfo], state: dict, needs_size: bool) -> Layout:
    """The layout a ``state`` describes for ``modules`` (ContainerError when it does not fit)."""
    try:
        local = [int(k) for k in state["ranks"]]
        rank = {"intra": int(state["r_intra"]), "inter": int(state["r_inter"])}
        size = int(state["shared_size"]) if needs_size else None
    except (KeyError, TypeError, ValueError) as e:
        raise ContainerError(
            None,
            f"bslora state needs 'ranks' (per module), 'r_intra', 'r_inter'"
            f"{' and shared_size' if needs_size else ''} ({type(e).__name__}: {e})",
        ) from e
    if len(local) != len(modules):
        raise ContainerError(None, f"bslora state has {len(local)} local ranks for {len(modules)} modules")
    if min(local, default=0) < 0 or min(rank.values()) < 0 or (size is not None and size < 1):
        raise ContainerError(
            None, f"bslora state has a negative rank or a shared size < 1 ({rank}, shared_size {size})"
        )
    slots = {
        "intra": layer_groups(modules) if rank["intra"] > 0 else [],
        "inter": [list(range(len(modules)))] if rank["inter"] > 0 else [],
    }
    slot_of = {lv: {i: j for j, g in enumerate(slots[lv]) for i in g} for lv in LEVELS}
    return Layout(local, rank, slots, slot_of, size)


def shared_name(lv: str, j: int, side: str) -> str:
    return f"inter.{side}" if lv == "inter" else f"intra.{j}.{side}"


# ----------------------------------------------------------------------------- shared math
def _truncate(P: Tensor, Q: Tensor, Sigma: linalg.SigmaLike | None, k: int) -> tuple[Tensor, Tensor]:
    """Best rank-k approximation of P @ Q (out×K, K×in) in the Σ-weighted norm ‖·Σ^{1/2}‖ (Frobenius
    when Σ is None), as balanced factors zero-padded to exactly k columns/rows.

    From K×K Grams only (GEMMs, no QR of the tall factors): PᵀP = V_P D V_Pᵀ gives the orthonormal
    W = P V_P D^{-1/2}; the eigenvectors u of D^{1/2} V_Pᵀ (Q Σ Qᵀ) V_P D^{1/2} give the left
    singular vectors U = W u of P Q Σ^{1/2} and σ². The truncation is the projection U_k U_kᵀ P Q
    (optimal for a norm weighted on the right): B = U_k √σ, A = (u_kᵀ D^{1/2} V_Pᵀ) Q / √σ."""
    Pd, Qd = P.double(), Q.double()
    lam, V = torch.linalg.eigh(Pd.T @ Pd)
    keep = lam > float(lam.max().clamp_min(0)) * 1e-13
    V, d = V[:, keep], lam[keep].sqrt()
    G = linalg.gram(Qd, Sigma)  # Q Σ Qᵀ: K×K
    s2, u = torch.linalg.eigh(d[:, None] * (V.T @ G @ V) * d[None, :])
    u, s2 = u.flip(1)[:, :k], s2.flip(0)[:k].clamp_min(0)
    c = s2.sqrt().sqrt()  # √σ
    c = c.clamp_min(max(float(c[0]) if c.numel() else 0.0, 1e-30) * 1e-6)
    B = (Pd @ (V / d) @ u) * c
    A = ((u.T * d) @ V.T @ Qd) / c[:, None]
    if B.shape[1] < k:
        B = torch.cat([B, B.new_zeros(B.shape[0], k - B.shape[1])], 1)
        A = torch.cat([A, A.new_zeros(k - A.shape[0], A.shape[1])], 0)
    return B.float().contiguous(), A.float().contiguous()


def _rsvd(
    mv: Callable[[Tensor], Tensor],
    rmv: Callable[[Tensor], Tensor],
    n_out: int,
    n_in: int,
    r: int,
    gen: torch.Generator,
    power: int = 2,
    oversample: int = 10,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-r SVD (U n_out×r, S r, Vh r×n_in) of an operator N given only N·X (``mv``) and Nᵀ·Y
    (``rmv``): randomized subspace iteration with ``power`` power steps (Halko et al. 2011)."""
    p = min(r + oversample, n_in, n_out)
    Y = torch.linalg.qr(mv(torch.randn(n_in, p, generator=gen)))[0]
    for _ in range(power):
        Z = torch.linalg.qr(rmv(Y))[0]
        Y = torch.linalg.qr(mv(Z))[0]
    u, s, vh = torch.linalg.svd(rmv(Y).T.double(), full_matrices=False)  # Yᵀ N = u s vh
    return (Y.double() @ u[:, :r]).float(), s[:r].float(), vh[:r].float()


def _balanced(U: Tensor, S: Tensor, Vh: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """B = U diag(S/d), A = diag(d) Vh with d = max(√S, 1e-3·√S_1): balanced, and the rows of A are
    never zero (so B can still learn a direction whose singular value is 0); padded to rank r."""
    d = S.clamp_min(0).sqrt()
    d = d.clamp_min(max(float(d[0]) if d.numel() else 0.0, 1e-12) * 1e-3)
    B, A = U * (S / d), d[:, None] * Vh
    if B.shape[1] < r:
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1)
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], 0)
    return B.contiguous(), A.contiguous()


def _orthonormal(n: int, r: int, gen: torch.Generator) -> Tensor:
    """n×r with orthonormal columns (seeded); columns beyond n are zero."""
    q = min(n, r)
    Q = torch.linalg.qr(torch.randn(n, q, generator=gen, dtype=torch.float64))[0].float()
    return torch.cat([Q, Q.new_zeros(n, r - q)], 1)


# ----------------------------------------------------------------------------- base form
class _BSLoRA(Form):
    """What the three transforms share: parameters, layout, storage, factors, local solve, budget."""

    native_tuner = "bslora"
    uses_shared_size: ClassVar[bool] = True
    module_params: ClassVar[tuple[str, ...]] = ()  # per-module tensors of a level (gates, kernels)
    module_prefix: ClassVar[str] = ""

    def __init__(self, modules: Sequence[ModuleInfo], config: Any, state: dict, tensors: dict[str, Tensor]):
        """``tensors``: every stored tensor by name (see ``tensor_specs``), any float dtype."""
        super().__init__(modules, config)
        self.layout = make_layout(self.modules_info, state, self.uses_shared_size)
        self.state_info = dict(state)

        def P(name: str) -> nn.Parameter:
            return nn.Parameter(tensors[name].detach().float().clone().contiguous())

        n = len(self.modules_info)
        self.local_B = nn.ParameterList([P(f"local.{i}.B") for i in range(n)])
        self.local_A = nn.ParameterList([P(f"local.{i}.A") for i in range(n)])
        self.shared_B, self.shared_A, self.per_module = nn.ModuleDict(), nn.ModuleDict(), nn.ModuleDict()
        self._pos: dict[str, dict[int, int]] = {}
        for lv in LEVELS:
            slots = self.layout.slots[lv]
            if not slots:
                continue
            self.shared_B[lv] = nn.ParameterList([P(shared_name(lv, j, "B")) for j in range(len(slots))])
            self.shared_A[lv] = nn.ParameterList([P(shared_name(lv, j, "A")) for j in range(len(slots))])
            members = sorted(self.layout.slot_of[lv])
            self._pos[lv] = {i: k for k, i in enumerate(members)}
            if self.module_params:
                self.per_module[lv] = nn.ModuleDict(
                    {p: nn.ParameterList([P(self.pm_name(lv, i, p)) for i in members]) for p in self.module_params}
                )

    # -- per transform ----------------------------------------------------------
    @staticmethod
    @abc.abstractmethod
    def transform(Bs: Tensor, As: Tensor, pm: dict[str, Tensor], m: ModuleInfo) -> tuple[Tensor, Tensor]:
        """(T_B(Bs) out×r, T_A(As) r×in) of module m from a shared pair and its own tensors."""

    @classmethod
    def shared_shape(
        cls, modules: Sequence[ModuleInfo], members: Sequence[int], r: int, lay: Layout
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """(shape of B_s, shape of A_s) of a pair shared by ``members``: by default a square pair of
        the shared size (GT's d_s, KE's s); SS overrides it with the members' largest dims."""
        s = lay.shared_size
        return (s, r), (r, s)

    @classmethod
    def module_param_shapes(cls, m: ModuleInfo, lay: Layout) -> dict[str, tuple[int, ...]]:
        return {}

    @classmethod
    def pm_name(cls, lv: str, i: int, p: str) -> str:
        return f"{cls.module_prefix}.{lv}.{i}.{p}"

    @classmethod
    def make_state(cls, modules: Sequence[ModuleInfo], config: Any) -> dict:
        """Facts that fix the tensor shapes: local rank per module, level ranks, shared size."""
        L, I, G = config.ranks
        if config.local_ranks is not None:
            if len(config.local_ranks) != len(modules):
                raise OptionError(
                    None, f"{cls.name}: {len(config.local_ranks)} local ranks given for {len(modules)} modules"
                )
            local = list(config.local_ranks)
        else:
            local = [min(L, m.in_features, m.out_features) for m in modules]
        state: dict[str, Any] = {"ranks": local, "r_intra": I, "r_inter": G}
        if cls.uses_shared_size:
            state["shared_size"] = cls.effective_shared_size(modules, config.shared_size)
        return state

    #: Default shared size as a fraction of the model width (the narrowest input of an adapted
    #: module: the hidden size of a transformer), so that defaults scale with the adapter.
    WIDTH_FRACTION: ClassVar[float] = 1.0

    @classmethod
    def effective_shared_size(cls, modules: Sequence[ModuleInfo], size: int | None) -> int:
        """The stored shared size: ``size``, or by default the model width × ``WIDTH_FRACTION``."""
        return default_shared_size(modules, cls.WIDTH_FRACTION) if size is None else size

    @classmethod
    def sharing(cls, modules, config, state, metrics):
        I, G = int(state["r_intra"]), int(state["r_inter"])
        if I or G:
            return {"sharing_used": True, "why": f"intra-layer rank {I}, inter-layer rank {G}"}
        asked = (metrics or {}).get("budget_choice", {}).get("requested_ranks", list(config.ranks))[1:]
        if any(asked):
            why = (
                f"the budget left no room for the shared parts (intra/inter ranks {asked[0]}/{asked[1]} asked, "
                "halved to 0): a local-only container, i.e. the svd solution; raise --budget or lower --ranks"
            )
        else:
            why = "--ranks asks for intra and inter rank 0: a local-only container"
        return {"sharing_used": False, "why": why}

    # -- storage ------------------------------------------------------------------
    @classmethod
    def tensor_specs(cls, modules, config, state) -> TensorSpecs:
        lay = make_layout(modules, state, cls.uses_shared_size)
        specs: TensorSpecs = {}
        for i, (m, k) in enumerate(zip(modules, lay.local)):
            specs[f"local.{i}.A"] = ((k, m.in_features), None)
            specs[f"local.{i}.B"] = ((m.out_features, k), None)
        for lv in LEVELS:
            for j, members in enumerate(lay.slots[lv]):
                sb, sa = cls.shared_shape(modules, members, lay.rank[lv], lay)
                specs[shared_name(lv, j, "B")] = (sb, None)
                specs[shared_name(lv, j, "A")] = (sa, None)
            for i in sorted(lay.slot_of[lv]):
                for p, shape in cls.module_param_shapes(modules[i], lay).items():
                    specs[cls.pm_name(lv, i, p)] = (shape, None)
        return specs

    @classmethod
    def from_tensors(cls, modules, config, state, tensors) -> _BSLoRA:
        return cls(modules, config, state, tensors)

    @classmethod
    def fresh_module_param(cls, p: str, shape: tuple[int, ...], gen: torch.Generator) -> Tensor:
        """A new adapter's per-module tensor ``p`` of a level (gate, kernel; see :meth:`fresh`):
        by default random as a LoRA's A (the transforms override it)."""
        return a_side(shape, gen)

    @classmethod
    def fresh(cls, modules, config, gen):
        """The layout of ``config``; every B side (local and shared) zero, every A side random
        (LoRA's init), per-module gates or kernels from :meth:`fresh_module_param`, so ΔW = 0 and
        every factor gets a gradient."""
        state = cls.make_state(modules, config)
        pm = {cls.pm_name(lv, i, p) for lv in LEVELS for i in range(len(modules)) for p in cls.module_params}
        tensors = {}
        for name, (shape, _) in cls.tensor_specs(modules, config, state).items():
            if name in pm:
                tensors[name] = cls.fresh_module_param(name.rsplit(".", 1)[1], shape, gen)
            else:
                tensors[name] = torch.zeros(shape) if name.endswith(".B") else a_side(shape, gen)
        return state, tensors

    def tensors(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for i in range(len(self.modules_info)):
            out[f"local.{i}.A"] = self.local_A[i].detach()
            out[f"local.{i}.B"] = self.local_B[i].detach()
        for lv in self.shared_B.keys():
            for j in range(len(self.shared_B[lv])):
                out[shared_name(lv, j, "B")] = self.shared_B[lv][j].detach()
                out[shared_name(lv, j, "A")] = self.shared_A[lv][j].detach()
            if lv in self.per_module:
                for i, k in self._pos[lv].items():
                    for p in self.module_params:
                        out[self.pm_name(lv, i, p)] = self.per_module[lv][p][k].detach()
        return out

    # -- use ----------------------------------------------------------------------
    def level_factors(self, lv: str, i: int) -> tuple[Tensor, Tensor]:
        """T_m of module i's shared pair at level lv: (out×r, r×in)."""
        j = self.layout.slot_of[lv][i]
        k = self._pos[lv][i]
        pm = {p: self.per_module[lv][p][k] for p in self.module_params}
        return self.transform(self.shared_B[lv][j], self.shared_A[lv][j], pm, self.modules_info[i])

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """[B_loc | T(B_intra) | T(B_inter)] (out×k) and [A_loc; T(A_intra); T(A_inter)] (k×in)."""
        Bs, As = [self.local_B[i]], [self.local_A[i]]
        for lv in self.layout.levels_of(i):
            TB, TA = self.level_factors(lv, i)
            Bs.append(TB)
            As.append(TA)
        if len(Bs) == 1:
            return Bs[0], As[0]
        return torch.cat(Bs, 1), torch.cat(As, 0)

    @torch.no_grad()
    def solve_local(self, targets: Sequence[tuple[Tensor, Tensor]], sigmas: Sequence[linalg.SigmaLike | None]) -> None:
        """Exact minimiser of the local parts given the shared ones: for every module the
        (Σ-weighted) truncated SVD of ΔW_m − shared_m, computed from the factors."""
        for i, (B, A) in enumerate(targets):
            P, Q = [B], [A]
            for lv in self.layout.levels_of(i):
                TB, TA = self.level_factors(lv, i)
                P.append(-TB)
                Q.append(TA)
            Bl, Al = _truncate(torch.cat(P, 1), torch.cat(Q, 0), sigmas[i], self.layout.local[i])
            self.local_B[i].copy_(Bl)
            self.local_A[i].copy_(Al)

    # -- budget -------------------------------------------------------------------
    @classmethod
    def config_for_budget(
        cls, adapter: Adapter, config: Any, budget_bytes: int, float_bytes: int, ctx: FitContext
    ) -> Any:
        """Keep the shared ranks I, G (halving the larger part while the shared parts would take
        more than half the budget), then give the rest to per-module local ranks, allocated
        greedily by the source's σ² per byte (each local direction of m costs in_m + out_m)."""
        mods = adapter.modules
        _, I, G = config.ranks
        budget = int(budget_bytes // float_bytes)  # stored values (float_bytes may be fractional: quantised storage)

        def shared_values(I: int, G: int) -> tuple[int, int]:
            """Stored values of the intra and inter parts, each with the header entries of its
            tensors beyond the two per module the container's estimate already counts (~100 bytes each)."""
            state = {"ranks": [0] * len(mods), "r_intra": I, "r_inter": G}
            if cls.uses_shared_size:
                state["shared_size"] = cls.effective_shared_size(mods, config.shared_size)
            lay = make_layout(mods, state, cls.uses_shared_size)
            per = {lv: 0 for lv in LEVELS}
            for lv in LEVELS:
                n_tensors = 2 * len(lay.slots[lv])
                for members in lay.slots[lv]:
                    sb, sa = cls.shared_shape(mods, members, lay.rank[lv], lay)
                    per[lv] += math.prod(sb) + math.prod(sa)
                for i in lay.slot_of[lv]:
                    shapes = cls.module_param_shapes(mods[i], lay)
                    per[lv] += sum(math.prod(s) for s in shapes.values())
                    n_tensors += len(shapes)
                per[lv] += math.ceil(100 * n_tensors / float_bytes)
            return per["intra"], per["inter"]

        requested = (I, G)
        while (I or G) and sum(shared_values(I, G)) > budget / 2:
            vi, vg = shared_values(I, G)
            if vg >= vi and G:
                G //= 2
            else:
                I //= 2
        shared = sum(shared_values(I, G))
        sv = svd_form.spectra(adapter, ctx)
        costs = [m.in_features + m.out_features for m in mods]
        local = (
            linalg.allocate([s.S.double() ** 2 for s in sv], costs, budget - shared)
            if budget > shared
            else [0] * len(mods)
        )
        if I == 0 and G == 0 and sum(local) == 0:
            cheapest = min(costs)
            raise OptionError(
                adapter.path,
                f"{cls.name}: the budget leaves {budget_bytes} payload bytes, less than one local "
                f"direction ({cheapest * float_bytes:.0f} bytes); raise --budget",
            )
        note = {
            "requested_ranks": [config.ranks[0], *requested],
            "r_intra": I,
            "r_inter": G,
            "shared_values": shared,
            "local_values": sum(k * c for k, c in zip(local, costs)),
            "budget_values": int(budget),
            "local_rank_min": min(local),
            "local_rank_max": max(local),
        }
        ctx.cache[(cls.name, "budget", id(adapter))] = note
        return dataclasses.replace(config, ranks=(config.ranks[0], I, G), local_ranks=tuple(local))

    @classmethod
    def _budget_note(cls, adapter: Adapter, config: Any, ctx: FitContext) -> dict | None:
        note = ctx.cache.get((cls.name, "budget", id(adapter)))
        if (
            note is not None
            and config.local_ranks is not None
            and (note["r_intra"], note["r_inter"]) == tuple(config.ranks[1:])
        ):
            return note
        return None


# ----------------------------------------------------------------------------- SS and KE: init + refine
class _Fitted(_BSLoRA):
    """Forms fitted by initialisation (two orders) + alternating refinement (SS, KE)."""

    @classmethod
    @abc.abstractmethod
    def init_slot(
        cls,
        lv: str,
        members: list[int],
        mods: Sequence[ModuleInfo],
        lay: Layout,
        res: list[tuple[Tensor, Tensor]],
        sigmas: list[linalg.SigmaLike | None],
        gen: torch.Generator,
    ) -> tuple[Tensor, Tensor, dict[int, dict[str, Tensor]]]:
        """(B_s, A_s, per-module tensors) of one shared pair fitted to its members' residuals."""

    @classmethod
    def line_search(
        cls,
        members: list[int],
        mods: Sequence[ModuleInfo],
        res: list[tuple[Tensor, Tensor]],
        sigmas: list[linalg.SigmaLike | None],
        Bs: Tensor,
        As: Tensor,
        pms: dict[int, dict[str, Tensor]],
    ) -> tuple[Tensor, Tensor, float]:
        """Scale the pair by the α minimising Σ_m ‖R_m − α T_m‖²_Σ (exact); returns the scaled pair
        and the change of that loss (≤ 0)."""
        num = den = 0.0
        for i in members:
            TB, TA = cls.transform(Bs, As, pms.get(i, {}), mods[i])
            P, Q = res[i]
            num += float(linalg.inner(P, Q, TB, TA, sigmas[i]))
            den += float(linalg.sq_norm(TB, TA, sigmas[i]))
        alpha = num / den if den > 0 else 0.0
        f = math.sqrt(abs(alpha))
        return Bs * (f if alpha >= 0 else -f), As * f, -(num * num / den if den > 0 else 0.0)

    @classmethod
    def initialise(
        cls,
        mods: Sequence[ModuleInfo],
        lay: Layout,
        targets: list[tuple[Tensor, Tensor]],
        sigmas: list[linalg.SigmaLike | None],
        order: str,
        gen: torch.Generator,
        bar,
    ) -> dict[str, Tensor]:
        """Every stored tensor, by name, for one initialisation order (see the module docstring)."""
        T: dict[str, Tensor] = {}
        res = list(targets)
        if order == "local-first":
            for i, (B, A) in enumerate(targets):
                Bl, Al = _truncate(B, A, sigmas[i], lay.local[i])
                res[i] = (torch.cat([B, -Bl], 1), torch.cat([A, Al], 0))
        shared: list[list[tuple[Tensor, Tensor]]] = [[] for _ in mods]
        for lv in FIT_ORDER:
            for j, members in enumerate(lay.slots[lv]):
                Bs, As, pms = cls.init_slot(lv, members, mods, lay, res, sigmas, gen)
                T[shared_name(lv, j, "B")], T[shared_name(lv, j, "A")] = Bs, As
                for i in members:
                    for p, t in pms.get(i, {}).items():
                        T[cls.pm_name(lv, i, p)] = t
                    TB, TA = cls.transform(Bs, As, pms.get(i, {}), mods[i])
                    P, Q = res[i]
                    res[i] = (torch.cat([P, -TB], 1), torch.cat([Q, TA], 0))
                    shared[i].append((TB, TA))
                bar()
        for i, (B, A) in enumerate(targets):
            P = torch.cat([B] + [-TB for TB, _ in shared[i]], 1)
            Q = torch.cat([A] + [TA for _, TA in shared[i]], 0)
            T[f"local.{i}.B"], T[f"local.{i}.A"] = _truncate(P, Q, sigmas[i], lay.local[i])
        return T

    @classmethod
    def auto_steps(cls, mods: Sequence[ModuleInfo], lay: Layout) -> int:
        """Adam steps for the refinement: ≤ REFINE_MAX_STEPS and ≤ REFINE_WORK / (flops per step)."""
        flops = 0
        for i, m in enumerate(mods):
            k = lay.local[i] + sum(lay.rank[lv] for lv in lay.levels_of(i))
            flops += 6 * (m.in_features + m.out_features) * k * (k + m.rank)
        return int(max(5, min(REFINE_MAX_STEPS, REFINE_WORK // max(flops, 1))))

    @classmethod
    def fit(cls, adapter: Adapter, config: Any, ctx: FitContext) -> _Fitted:
        mods = adapter.modules
        state = cls.make_state(mods, config)
        lay = make_layout(mods, state, cls.uses_shared_size)
        tg = fitter.targets(adapter, ctx)
        targets = [(t.B, t.A) for t in tg]
        sigmas = [t.Sigma for t in tg]
        total = max(sum(t.norm2 for t in tg), 1e-30)
        n_slots = sum(len(lay.slots[lv]) for lv in LEVELS)
        orders = ("shared-first", "local-first") if n_slots else ("local",)
        best: tuple[float, str, _Fitted] | None = None
        with torch.no_grad(), progress_bar(ctx.progress, f"{cls.name} init", n_slots * len(orders)) as bar:
            for order in orders:
                gen = torch.Generator().manual_seed(int(ctx.seed))
                form = cls(mods, config, state, cls.initialise(mods, lay, targets, sigmas, order, gen, bar))
                loss = float(fitter.module_sq_errors(form, tg, torch.float64).sum()) / total
                if best is None or loss < best[0]:
                    best = (loss, order, form)
        assert best is not None
        init_loss, order, form = best
        steps = 0 if not n_slots else (config.steps if config.steps is not None else cls.auto_steps(mods, lay))
        if n_slots and ctx.max_steps is not None:
            steps = ctx.max_steps
        history = [init_loss]
        if steps > 0:
            history = fitter.refine(
                form,
                adapter,
                ctx,
                solve=lambda: form.solve_local(targets, sigmas),
                lr=3e-2,
                max_steps=steps,
                round_steps=max(5, min(25, steps // 3)),
                tol=1e-3,
                label=f"{cls.name} refine",
            )
        form.fit_info = {
            "init": order,
            "init_rel_error": math.sqrt(max(init_loss, 0.0)),
            "refine_rounds": len(history) - 1,
            "refine_max_steps": steps,
            "refine_rel_error": math.sqrt(max(min(history), 0.0)),
            "weighted": ctx.stats is not None,
        }
        if cls.uses_shared_size and config.shared_size is not None and state["shared_size"] != config.shared_size:
            form.fit_info["shared_size_clamped_from"] = config.shared_size
        note = cls._budget_note(adapter, config, ctx)
        if note is not None:
            form.fit_info["budget_choice"] = note
        return form


# ----------------------------------------------------------------------------- SS
@register
class SliceSharing(_Fitted):
    name = "bslora-ss"
    summary = "BSLoRA slice sharing: local + per-layer + global pairs, modules use centred slices (L,I,G = 2,4,32)"
    Config = SSConfig
    uses_shared_size = False

    @staticmethod
    def transform(Bs, As, pm, m):
        o = (Bs.shape[0] - m.out_features) // 2
        c = (As.shape[1] - m.in_features) // 2
        return Bs[o : o + m.out_features], As[:, c : c + m.in_features]

    @classmethod
    def shared_shape(cls, modules, members, r, lay):
        return (max(modules[i].out_features for i in members), r), (r, max(modules[i].in_features for i in members))

    @classmethod
    def init_slot(cls, lv, members, mods, lay, res, sigmas, gen):
        """Top-r of N = Σ_m pad(R_m) (each residual placed at its centred slice), then a line search."""
        (d_out, r), (_, d_in) = cls.shared_shape(mods, members, lay.rank[lv], lay)
        place = [(i, (d_out - mods[i].out_features) // 2, (d_in - mods[i].in_features) // 2) for i in members]

        def mv(X: Tensor) -> Tensor:  # X d_in×p → N X (d_out×p)
            Y = X.new_zeros(d_out, X.shape[1])
            for i, o, c in place:
                P, Q = res[i]
                Y[o : o + P.shape[0]] += P @ (Q @ X[c : c + Q.shape[1]])
            return Y

        def rmv(Y: Tensor) -> Tensor:  # Y d_out×p → Nᵀ Y (d_in×p)
            X = Y.new_zeros(d_in, Y.shape[1])
            for i, o, c in place:
                P, Q = res[i]
                X[c : c + Q.shape[1]] += Q.T @ (P.T @ Y[o : o + P.shape[0]])
            return X

        U, S, Vh = _rsvd(mv, rmv, d_out, d_in, min(r, d_out, d_in), gen)
        Bs, As = _balanced(U, S, Vh, r)
        Bs, As, _ = cls.line_search(members, mods, res, sigmas, Bs, As, {})
        return Bs, As, {}


# ----------------------------------------------------------------------------- KE
def _blocks(n: int, s: int) -> int:
    return -(-n // s)


@register
class KroneckerExtension(_Fitted):
    name = "bslora-ke"
    summary = "BSLoRA Kronecker extension: shared (s×r)(r×s) pairs tiled by per-module kernels, cropped (L,I,G = 2,4,16, s = 256)"
    Config = KEConfig
    module_params = ("A", "B")
    module_prefix = "kernel"
    KERNEL_ROUNDS = 3  # alternations of (shared pair, kernels) in the initialisation of a pair
    ALS_STEPS = 10  # alternations of a weighted rank-1 fit of one module's kernels

    @staticmethod
    def transform(Bs, As, pm, m):
        # K_B (n_out×1) ⊗ B_s (s×r) → (n_out·s)×r, first `out` rows; K_A (1×n_in) ⊗ A_s (r×s) → r×(n_in·s), first `in` columns
        return torch.kron(pm["B"], Bs)[: m.out_features], torch.kron(pm["A"], As)[:, : m.in_features]

    @classmethod
    def module_param_shapes(cls, m, lay):
        s = lay.shared_size
        return {"A": (1, _blocks(m.in_features, s)), "B": (_blocks(m.out_features, s), 1)}

    @classmethod
    def fresh_module_param(cls, p, shape, gen):
        return torch.ones(shape)  # every block tiles the shared pair once

    @classmethod
    def effective_shared_size(cls, modules, size):
        return min(size, max(max(m.in_features, m.out_features) for m in modules))

    @classmethod
    def init_slot(cls, lv, members, mods, lay, res, sigmas, gen):
        """Alternate: shared pair = top-r of N = Σ_m Σ_ij a_i b_j R_m^(ij) (line-searched); kernels
        (a = K_B, b = K_A) = weighted rank-1 least squares on the block projections c_ij =
        ⟨R^(ij), M^(ij)⟩ with weights n_ij = ‖M^(ij)‖² (M = B_s A_s, blocks cropped). Kept: the best
        round by the Σ-weighted loss of the pair."""
        s, r = lay.shared_size, lay.rank[lv]
        Pb, Qb, a, b = {}, {}, {}, {}
        for i in members:
            P, Q = res[i]
            no, ni = _blocks(P.shape[0], s), _blocks(Q.shape[1], s)
            Pb[i] = torch.cat([P, P.new_zeros(no * s - P.shape[0], P.shape[1])], 0).view(no, s, -1)  # n_out×s×k
            Qb[i] = torch.cat([Q, Q.new_zeros(Q.shape[0], ni * s - Q.shape[1])], 1).view(Q.shape[0], ni, s)  # k×n_in×s
            a[i], b[i] = P.new_ones(no), P.new_ones(ni)

        def kernels() -> dict[int, dict[str, Tensor]]:
            return {i: {"A": b[i][None, :].clone(), "B": a[i][:, None].clone()} for i in members}

        best: tuple[float, Tensor, Tensor, dict] | None = None
        for _ in range(cls.KERNEL_ROUNDS):
            Pt = {i: torch.einsum("i,isk->sk", a[i], Pb[i]) for i in members}  # Σ_i a_i P_i: s×k
            Qt = {i: torch.einsum("j,kjs->ks", b[i], Qb[i]) for i in members}  # Σ_j b_j Q_j: k×s
            U, S, Vh = _rsvd(
                lambda X, Pt=Pt, Qt=Qt: sum(Pt[i] @ (Qt[i] @ X) for i in members),
                lambda Y, Pt=Pt, Qt=Qt: sum(Qt[i].T @ (Pt[i].T @ Y) for i in members),
                s,
                s,
                min(r, s),
                gen,
            )
            Bs, As = _balanced(U, S, Vh, r)
            Bs, As, _ = cls.line_search(members, mods, res, sigmas, Bs, As, kernels())
            for i in members:
                a[i], b[i] = cls._kernel_step(Pb[i], Qb[i], Bs, As, mods[i], s, a[i], b[i])
            Bs, As, gain = cls.line_search(members, mods, res, sigmas, Bs, As, kernels())
            if best is None or gain < best[0]:
                best = (gain, Bs, As, kernels())
        assert best is not None
        _, Bs, As, pms = best
        return cls._gauge(Bs, As, pms)

    @classmethod
    def _kernel_step(
        cls, Pb: Tensor, Qb: Tensor, Bs: Tensor, As: Tensor, m: ModuleInfo, s: int, a: Tensor, b: Tensor
    ) -> tuple[Tensor, Tensor]:
        """argmin over a (n_out), b (n_in) of Σ_ij ‖R^(ij) − a_i b_j M^(ij)‖² by alternating exact
        steps from the current (a, b); R^(ij) = P_i Q_j from the padded blocks, M = B_s A_s."""
        U = torch.einsum("isk,sr->ikr", Pb, Bs)  # P_iᵀ B_s: n_out×k×r
        V = torch.einsum("kjs,rs->jkr", Qb, As)  # Q_j A_sᵀ: n_in×k×r
        C = torch.einsum("ikr,jkr->ij", U, V).double()  # ⟨R^(ij), M^(ij)⟩
        no, ni = Pb.shape[0], Qb.shape[1]
        hv = (s, m.out_features - s * (no - 1))  # block heights: full, last (cropped)
        wv = (s, m.in_features - s * (ni - 1))
        tab = torch.tensor(
            [
                [float(((Bs[:h].T @ Bs[:h]).double() * (As[:, :w] @ As[:, :w].T).double()).sum()) for w in wv]
                for h in hv
            ],
            dtype=torch.float64,
        )  # ‖M[:h, :w]‖²
        hi = torch.zeros(no, dtype=torch.long)
        hi[-1] = 1
        wi = torch.zeros(ni, dtype=torch.long)
        wi[-1] = 1
        Nn = tab[hi][:, wi]  # ‖M^(ij)‖², n_out×n_in
        a, b = a.double(), b.double()
        for _ in range(cls.ALS_STEPS):
            den = Nn @ (b * b)
            a = torch.where(den > 0, (C @ b) / den.clamp_min(1e-300), torch.zeros_like(den))
            den = Nn.T @ (a * a)
            b = torch.where(den > 0, (C.T @ a) / den.clamp_min(1e-300), torch.zeros_like(den))
        return a.float(), b.float()

    @staticmethod
    def _gauge(Bs: Tensor, As: Tensor, pms: dict[int, dict[str, Tensor]]) -> tuple[Tensor, Tensor, dict]:
        """B A = (B D⁻¹)(D A) for kernels: equal RMS of K_A and K_B per module, and their typical
        RMS 1 across modules (the scale moved into the shared pair)."""
        logs = []
        for pm in pms.values():
            ra, rb = float(pm["A"].pow(2).mean().sqrt()), float(pm["B"].pow(2).mean().sqrt())
            if ra > 0 and rb > 0:
                f = math.sqrt(rb / ra)
                pm["A"], pm["B"] = pm["A"] * f, pm["B"] / f
                logs.append(0.5 * math.log(ra * rb))
        if logs:
            g = math.exp(sum(logs) / len(logs))
            for pm in pms.values():
                pm["A"], pm["B"] = pm["A"] / g, pm["B"] / g
            Bs, As = Bs * g, As * g
        return Bs, As, pms


# ----------------------------------------------------------------------------- GT
@register
class GateTransformation(_BSLoRA):
    name = "bslora-gt"
    summary = "BSLoRA gate transformation: shared (d_s×r)(r×d_s) pairs behind rank-1 gates, rank ≤ 1 per module and level (L,I,G = 2,8,16, d_s = width/4)"
    Config = GTConfig
    WIDTH_FRACTION = 1 / 4
    module_params = ("iu", "id", "ou", "od")
    module_prefix = "gate"

    @staticmethod
    def transform(Bs, As, pm, m):
        # G_o B_s = g_ou (g_odᵀ B_s): out×r;  A_s G_i = (A_s g_iu) g_idᵀ: r×in
        return pm["ou"][:, None] * (pm["od"] @ Bs)[None, :], (As @ pm["iu"])[:, None] * pm["id"][None, :]

    @classmethod
    def module_param_shapes(cls, m, lay):
        d = lay.shared_size
        return {"iu": (d,), "id": (m.in_features,), "ou": (m.out_features,), "od": (d,)}

    @classmethod
    def fresh_module_param(cls, p, shape, gen):
        return torch.randn(shape, generator=gen) / shape[0] ** 0.5  # gates of norm ≈ 1

    @classmethod
    def fit(cls, adapter: Adapter, config: GTConfig, ctx: FitContext) -> GateTransformation:
        """Closed form, globally optimal: module m's update can be any matrix of rank ≤ L_m + n_m
        (n_m its shared levels), so the best is its (Σ-weighted) truncated SVD. Components
        0..L_m−1 go to the local pair; component L_m + t to level t (inter, then intra) through the
        gates: with the shared pair B_s = Q_b, A_s = Q_aᵀ (seeded orthonormal) and q = column
        (position of m in the pair) mod r, g_od = ρ q_b, g_iu = ρ q_a (so g_odᵀ B_s A_s g_iu = ρ²),
        g_ou = σ^¼ u, g_id = σ^¼ v with ρ = σ^¼: the gated part is σ u vᵀ, all gates of norm σ^¼."""
        mods = adapter.modules
        state = cls.make_state(mods, config)
        lay = make_layout(mods, state, True)
        d = lay.shared_size
        gen = torch.Generator().manual_seed(int(ctx.seed))
        T: dict[str, Tensor] = {}
        Q: dict[tuple[str, int], tuple[Tensor, Tensor]] = {}
        for lv in LEVELS:
            for j, _ in enumerate(lay.slots[lv]):
                Qb, Qa = _orthonormal(d, lay.rank[lv], gen), _orthonormal(d, lay.rank[lv], gen)
                T[shared_name(lv, j, "B")], T[shared_name(lv, j, "A")] = Qb, Qa.T.contiguous()
                Q[(lv, j)] = Qb, Qa
        tg = fitter.targets(adapter, ctx)
        with torch.no_grad(), progress_bar(ctx.progress, f"{cls.name} fit", len(mods)) as bar:
            for i, (m, t) in enumerate(zip(mods, tg)):
                k = lay.local[i]
                sv = linalg.factored_svd(t.B, t.A, t.Sigma)
                B, A = sv.truncate(min(k, len(sv.S)))
                T[f"local.{i}.B"] = torch.cat([B, B.new_zeros(m.out_features, k - B.shape[1])], 1)
                T[f"local.{i}.A"] = torch.cat([A, A.new_zeros(k - A.shape[0], m.in_features)], 0)
                top = float(sv.S[0]) if len(sv.S) else 0.0
                for n, lv in enumerate(lv for lv in FIT_ORDER if i in lay.slot_of[lv]):
                    j = lay.slot_of[lv][i]
                    Qb, Qa = Q[(lv, j)]
                    col = lay.slots[lv][j].index(i) % max(1, min(d, lay.rank[lv]))
                    c = k + n  # the SVD component this level carries
                    sigma = float(sv.S[c]) if c < len(sv.S) else 0.0
                    if sigma > 0:
                        rho = sigma**0.25
                        ou, id_ = sv.U[:, c] * rho, sv.Vh[c] * rho
                    else:  # nothing left to fit: a zero part that can still learn (g_ou = 0, g_id ≠ 0)
                        rho = max(top, 1e-12) ** 0.25
                        v = sv.Vh[c] if c < len(sv.S) else torch.randn(m.in_features, generator=gen)
                        ou, id_ = torch.zeros(m.out_features), v / max(float(v.norm()), 1e-30) * rho
                    T[cls.pm_name(lv, i, "od")] = Qb[:, col] * rho
                    T[cls.pm_name(lv, i, "iu")] = Qa[:, col] * rho
                    T[cls.pm_name(lv, i, "ou")] = ou.contiguous()
                    T[cls.pm_name(lv, i, "id")] = id_.contiguous()
                bar()
        form = cls(mods, config, state, T)
        form.fit_info = {"closed_form": True, "gated_rank_per_level": 1, "weighted": ctx.stats is not None}
        note = cls._budget_note(adapter, config, ctx)
        if note is not None:
            form.fit_info["budget_choice"] = note
        return form
