"""``joint``: the Compress-then-Serve form (Brüel-Gabrielsson et al., arXiv 2407.00066) — module
i's update is ΔŴ_i = U_i C_i V_i with U_i (out×k_i) and V_i (k_i×in) shared by a whole cluster of
adapters (``adaptzip batch --shared-basis`` stores them once, in the zoo's shared file) and a
small core C_i per adapter: a full k_i×k_i matrix (``--core full``) or its diagonal (``--core
diag``, k_i values).

Stored (formats/forms/joint.md): ``U.{i}`` (out×k_i), ``V.{i}`` (k_i×in) and ``core.{i}``
(k_i×k_i, or (k_i,) for diag); ``state.ranks`` = [k_i]. In a zoo container ``U.*`` and ``V.*``
live in the shared file (formats/shared.md, kind ``joint-basis``), ``core.*`` in the container.

The joint fit of a cluster is :func:`adaptzip.linalg.joint_basis` (alternating, from the stacked
SVDs; the ranks k_i are allocated across modules by energy per stored byte with
:func:`adaptzip.linalg.allocate`), done by :mod:`adaptzip.zoo.sharing`. Fitted alone (``compress
--to joint``) an adapter is its own cluster: U, V are its singular vectors and the core its
singular values — the svd form with the scale split off, never smaller than svd, so ``--to
auto`` does not try it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import linalg
from ..adapter import Adapter, ModuleInfo
from ..errors import OptionError
from . import svd as svd_form
from .base import FitContext, Form, TensorSpecs, register

Tensor = torch.Tensor
CORES = ("full", "diag")


@dataclass
class JointConfig:
    core: str = field(
        default="full",
        metadata={
            "help": "per-adapter core of each module: full (k×k, any mix of the shared directions) or diag (k values)"
        },
    )
    ranks: tuple[int, ...] | None = field(
        default=None,
        metadata={"help": "per-module ranks k_i (set by --budget or the zoo's joint fit)", "internal": True},
    )

    def __post_init__(self):
        if self.core not in CORES:
            raise ValueError(f"core must be one of {', '.join(CORES)}, got {self.core!r}")
        if self.ranks is not None:
            self.ranks = tuple(int(r) for r in self.ranks)


def joint_factors(U: Tensor, C: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """(B, A) = (U C, V) of ΔŴ = U C V; a 1-D ``C`` is a diagonal core (U diag(C) = U ∘ C)."""
    return (U * C if C.dim() == 1 else U @ C), V


def core_cost(core: str, k: int) -> int:
    """Values the k-th direction (0-based) adds to one adapter's core: 2k + 1 (full), 1 (diag)."""
    return 2 * k + 1 if core == "full" else 1


@register
class JointForm(Form):
    name = "joint"
    summary = "Compress-then-Serve joint form: ΔW = U C V, U and V shared by a zoo cluster (batch --shared-basis), a full or diagonal core per adapter"
    Config = JointConfig
    auto_candidate = False  # alone it is svd with the scale split off (never smaller)
    native_tuner = "joint"

    @classmethod
    def live(cls, modules, config, state, tensors) -> JointLive:
        return JointLive(modules, config, state, tensors)

    def __init__(
        self,
        modules: Sequence[ModuleInfo],
        config: JointConfig,
        Us: list[Tensor],
        Vs: list[Tensor],
        cores: list[Tensor],
    ):
        super().__init__(modules, config)
        self.U = nn.ParameterList([nn.Parameter(u.float().contiguous()) for u in Us])
        self.V = nn.ParameterList([nn.Parameter(v.float().contiguous()) for v in Vs])
        self.core = nn.ParameterList([nn.Parameter(c.float().contiguous()) for c in cores])
        self.state_info = {"ranks": [int(v.shape[0]) for v in Vs]}

    @staticmethod
    def _ranks(modules: Sequence[ModuleInfo], config: JointConfig) -> list[int]:
        """``config.ranks``, or by default per module the most directions whose values (U, V and
        the core) fit in the source's own r·(in + out): a joint form alone never outgrows the LoRA."""
        if config.ranks is None:
            out = []
            for m in modules:
                k, size = 0, 0
                while k < m.rank and size + m.in_features + m.out_features + core_cost(config.core, k) <= m.rank * (
                    m.in_features + m.out_features
                ):
                    size += m.in_features + m.out_features + core_cost(config.core, k)
                    k += 1
                out.append(k)
            return out
        if len(config.ranks) != len(modules):
            raise OptionError(None, f"joint: {len(config.ranks)} ranks given for {len(modules)} modules")
        return list(config.ranks)

    @classmethod
    def fit(cls, adapter: Adapter, config: JointConfig, ctx: FitContext) -> JointForm:
        """One adapter alone: U, V its (Σ-weighted) singular vectors, the core its singular values."""
        Us, Vs, cores = [], [], []
        for s, k in zip(svd_form.spectra(adapter, ctx), cls._ranks(adapter.modules, config)):
            k = min(k, len(s.S))
            Us.append(s.U[:, :k])
            Vs.append(s.Vh[:k])
            cores.append(s.S[:k] if config.core == "diag" else torch.diag(s.S[:k]))
        return cls(adapter.modules, config, Us, Vs, cores)

    @classmethod
    def config_for_budget(cls, adapter, config, budget_bytes, float_bytes, ctx):
        """Ranks by σ² per byte, each direction costing in + out + its core values."""
        sv = svd_form.spectra(adapter, ctx)
        costs = [
            [(m.in_features + m.out_features + core_cost(config.core, j)) * float_bytes for j in range(len(s.S))]
            for m, s in zip(adapter.modules, sv)
        ]
        ranks = linalg.allocate([s.S.double() ** 2 for s in sv], costs, budget_bytes)
        return JointConfig(core=config.core, ranks=tuple(ranks))

    @classmethod
    def tensor_specs(cls, modules, config, state) -> TensorSpecs:
        specs: TensorSpecs = {}
        for i, (m, k) in enumerate(zip(modules, state["ranks"])):
            specs[f"U.{i}"] = ((m.out_features, k), None)
            specs[f"V.{i}"] = ((k, m.in_features), None)
            specs[f"core.{i}"] = (((k,) if config.core == "diag" else (k, k)), None)
        return specs

    @classmethod
    def from_tensors(cls, modules, config, state, tensors) -> JointForm:
        n = len(modules)
        return cls(
            modules,
            config,
            [tensors[f"U.{i}"] for i in range(n)],
            [tensors[f"V.{i}"] for i in range(n)],
            [tensors[f"core.{i}"] for i in range(n)],
        )

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """(U C, V): out×k and k×in."""
        return joint_factors(self.U[i], self.core[i], self.V[i])

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for i in range(len(self.V)):
            out[f"U.{i}"], out[f"V.{i}"], out[f"core.{i}"] = (
                self.U[i].detach(),
                self.V[i].detach(),
                self.core[i].detach(),
            )
        return out


class JointBasisModule(nn.Module):
    """The shared U_i, V_i of every module (a zoo cluster's ``joint-basis``), held once per base
    by :mod:`adaptzip.peft` however many of the cluster's adapters are loaded."""

    def __init__(self, Us: list[Tensor], Vs: list[Tensor]):
        super().__init__()
        self.U = nn.ParameterList([nn.Parameter(u.detach().float().clone().contiguous()) for u in Us])
        self.V = nn.ParameterList([nn.Parameter(v.detach().float().clone().contiguous()) for v in Vs])


class JointLive(nn.Module):
    """A ``joint`` adapter as a PEFT tuner holds it: its cores as parameters, and a reference
    (``basis``, not a submodule: the tuner registers one per shared basis) to the
    :class:`JointBasisModule` of its cluster. ``factors(i)`` = (U_i C_i, V_i) as the form's."""

    def __init__(self, modules: Sequence[ModuleInfo], config: JointConfig, state: dict, tensors: dict[str, Tensor]):
        super().__init__()
        n = len(modules)
        self.diagonal = config.core == "diag"
        self.core = nn.ParameterList([nn.Parameter(tensors[f"core.{i}"].detach().float().clone()) for i in range(n)])
        self.attach(JointBasisModule([tensors[f"U.{i}"] for i in range(n)], [tensors[f"V.{i}"] for i in range(n)]))

    def attach(self, basis: JointBasisModule) -> None:
        object.__setattr__(self, "basis", basis)

    def apply_core(self, i: int, h: Tensor) -> Tensor:
        """h (rows×k, in V_i's coordinates) times this adapter's core: h C_iᵀ (full) or h ∘ d_i."""
        C = self.core[i]
        return h * C if self.diagonal else h @ C.T

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        return joint_factors(self.basis.U[i], self.core[i], self.basis.V[i])
