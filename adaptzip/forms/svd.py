"""``svd``: per-module truncated SVD of ΔW_m = scale·B_m A_m, computed from the factors.

ΔŴ_m = U_k S_k V_kᵀ stored in balanced factors B.{m} = U_k √S_k (out×k_m), A.{m} = √S_k V_kᵀ
(k_m×in). With calibration statistics the SVD is Σ-weighted (of ΔW R, R Rᵀ = Σ, mapped back), so
the truncation is optimal in the activation-weighted norm; it needs only A Σ Aᵀ (r×r), which a
Σ sketch holds exactly (:func:`adaptzip.linalg.factored_svd`). ``--rank`` gives a uniform rank;
``--budget`` allocates ranks globally: every singular direction of module m costs (in_m + out_m)
stored values, and directions are taken by σ² per byte — the strongest per-module baseline at
a given size, and the yardstick every report compares against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import linalg
from ..adapter import Adapter, ModuleInfo
from ..errors import ContainerError, OptionError
from .base import Directions, FitContext, Form, TensorSpecs, register


@dataclass
class SvdConfig:
    rank: int | None = field(
        default=None,
        metadata={
            "help": "uniform rank per module (default: the source's rank, i.e. lossless); capped by each module's source rank"
        },
    )
    ranks: tuple[int, ...] | None = field(
        default=None, metadata={"help": "per-module ranks (set by --budget)", "internal": True}
    )

    def __post_init__(self):
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if self.ranks is not None:
            self.ranks = tuple(int(r) for r in self.ranks)


def spectra(adapter: Adapter, ctx: FitContext) -> list[linalg.SVD]:
    """The (Σ-weighted when statistics exist) SVD of every module, cached per run."""
    key = ("svd", id(adapter))
    if key not in ctx.cache:
        out = []
        for m, B, A in adapter.iter_factors():
            out.append(linalg.factored_svd(B, A, ctx.sigma(m)))
        ctx.cache[key] = out
    return ctx.cache[key]


def direction_cost(m: ModuleInfo) -> int:
    return m.in_features + m.out_features


@register
class SvdForm(Form):
    name = "svd"
    summary = "per-module truncated SVD; --budget allocates ranks globally by energy per byte (the baseline)"
    Config = SvdConfig
    direction_rows = True

    def __init__(
        self, modules: Sequence[ModuleInfo], config: SvdConfig, factors: list[tuple[torch.Tensor, torch.Tensor]]
    ):
        super().__init__(modules, config)
        self.B = nn.ParameterList([nn.Parameter(b.float().contiguous()) for b, _ in factors])
        self.A = nn.ParameterList([nn.Parameter(a.float().contiguous()) for _, a in factors])
        self.state_info = {"ranks": [int(a.shape[0]) for _, a in factors]}

    @staticmethod
    def _ranks(modules: Sequence[ModuleInfo], config: SvdConfig) -> list[int]:
        if config.ranks is not None:
            if len(config.ranks) != len(modules):
                raise OptionError(None, f"svd: {len(config.ranks)} ranks given for {len(modules)} modules")
            return list(config.ranks)
        return [m.rank if config.rank is None else min(config.rank, m.rank) for m in modules]

    @classmethod
    def fit(cls, adapter: Adapter, config: SvdConfig, ctx: FitContext) -> SvdForm:
        ranks = cls._ranks(adapter.modules, config)
        sv = spectra(adapter, ctx)
        return cls(adapter.modules, config, [s.truncate(k) for s, k in zip(sv, ranks)])

    @classmethod
    def config_for_budget(cls, adapter, config, budget_bytes, float_bytes, ctx):
        sv = spectra(adapter, ctx)
        costs = [direction_cost(m) * float_bytes for m in adapter.modules]
        caps = None if config.rank is None else [config.rank] * len(adapter.modules)
        ranks = linalg.allocate([s.S.double() ** 2 for s in sv], costs, budget_bytes, caps)
        return SvdConfig(rank=config.rank, ranks=tuple(ranks))

    @classmethod
    def directions(cls, adapter, config, ctx):
        cap = config.rank
        table = [s.truncate(len(s.S) if cap is None else min(cap, len(s.S))) for s in spectra(adapter, ctx)]
        return Directions(table, lambda ranks: SvdConfig(rank=config.rank, ranks=tuple(int(r) for r in ranks)))

    @classmethod
    def tensor_specs(cls, modules, config, state) -> TensorSpecs:
        ranks = state["ranks"]
        if len(ranks) != len(modules):
            raise ContainerError(None, f"state.ranks has {len(ranks)} entries for {len(modules)} modules")
        bad = next((i for i, (m, k) in enumerate(zip(modules, ranks)) if not 0 <= int(k) <= m.rank), None)
        if bad is not None:  # a truncation of the source's factors has at most its rank
            raise ContainerError(None, f"state.ranks[{bad}] = {ranks[bad]} is outside [0, {modules[bad].rank}]")
        specs: TensorSpecs = {}
        for i, (m, k) in enumerate(zip(modules, ranks)):
            specs[f"A.{i}"] = ((k, m.in_features), None)
            specs[f"B.{i}"] = ((m.out_features, k), None)
        return specs

    @classmethod
    def from_tensors(cls, modules, config, state, tensors) -> SvdForm:
        return cls(modules, config, [(tensors[f"B.{i}"], tensors[f"A.{i}"]) for i in range(len(modules))])

    @classmethod
    def stored_lora_factors(cls, modules, config, state, tensors):
        return [(tensors[f"B.{i}"], tensors[f"A.{i}"], 1.0) for i in range(len(modules))]

    def factors(self, i: int):
        return self.B[i], self.A[i]

    def tensors(self):
        out = {}
        for i in range(len(self.A)):
            out[f"A.{i}"] = self.A[i].detach()
            out[f"B.{i}"] = self.B[i].detach()
        return out
