"""``lora``: the source's own factors, repacked losslessly (optionally cast to another dtype).

Stored: ``A.{i}`` (r_i×in_i) and ``B.{i}`` (out_i×r_i) exactly as in the source; the scale stays
in the module table (``scale``), so ΔŴ_i = scale_i · B_i @ A_i and expand restores the source
tensors and config bit for bit (in the same dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import Adapter, ModuleInfo
from .base import FitContext, Form, TensorSpecs, register


@dataclass
class LoraConfig:
    """No hyperparameters: the container dtype (--dtype) is the only choice."""


@register
class LoraForm(Form):
    name = "lora"
    summary = "lossless repack of the source LoRA factors (optional dtype cast)"
    Config = LoraConfig
    lossless = True
    direction_rows = True

    def __init__(self, modules: Sequence[ModuleInfo], config: LoraConfig, tensors: dict[str, torch.Tensor]):
        super().__init__(modules, config)
        self.A = nn.ParameterList([nn.Parameter(tensors[f"A.{i}"].float()) for i in range(len(modules))])
        self.B = nn.ParameterList([nn.Parameter(tensors[f"B.{i}"].float()) for i in range(len(modules))])
        self._raw = tensors  # the exact stored tensors, so expand restores them bit for bit

    @classmethod
    def fit(cls, adapter: Adapter, config: LoraConfig, ctx: FitContext) -> LoraForm:
        t = {}
        for i, m in enumerate(adapter.modules):
            t[f"A.{i}"] = adapter.lora_A(m.name)
            t[f"B.{i}"] = adapter.lora_B(m.name)
        return cls(adapter.modules, config, t)

    @classmethod
    def tensor_specs(cls, modules, config, state) -> TensorSpecs:
        specs: TensorSpecs = {}
        for i, m in enumerate(modules):
            specs[f"A.{i}"] = ((m.rank, m.in_features), None)
            specs[f"B.{i}"] = ((m.out_features, m.rank), None)
        return specs

    @classmethod
    def from_tensors(cls, modules, config, state, tensors) -> LoraForm:
        return cls(modules, config, tensors)

    @classmethod
    def stored_lora_factors(cls, modules, config, state, tensors):
        return [(tensors[f"B.{i}"], tensors[f"A.{i}"], m.scale) for i, m in enumerate(modules)]

    def factors(self, i: int):
        return self.B[i] * self.modules_info[i].scale, self.A[i]

    def lora_factors(self, i: int):
        if self._raw is not None:
            return self._raw[f"B.{i}"], self._raw[f"A.{i}"], self.modules_info[i].scale
        return self.B[i].detach(), self.A[i].detach(), self.modules_info[i].scale

    def tensors(self):
        if self._raw is not None:
            return dict(self._raw)
        return {
            **{f"A.{i}": a.detach() for i, a in enumerate(self.A)},
            **{f"B.{i}": b.detach() for i, b in enumerate(self.B)},
        }

    def train(self, mode: bool = True):
        # Once trained (distillation), the live parameters, not the source tensors, are the truth.
        if mode:
            self._raw = None
        return super().train(mode)
