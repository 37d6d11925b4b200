"""The tuner model and layer of adaptzip's live forms (one implementation for every form).

The tuner model (:class:`FormTuner`, a PEFT ``BaseTuner``) holds, per adapter name, ONE module in
``adaptzip_forms``: the form's own object (``Form.live``: a BSLoRA or MASA form, or a compact
VB-LoRA), whose parameters are the container's tensors, each once. Every adapted layer
(:class:`FormLayer`) only knows its module index i in that table and asks the form for
``factors(i) = (B, A)`` at each forward — the same code that fits, distils and exports the form,
so a form and its live tuner cannot drift. The shared parts (BSLoRA's intra/inter pairs, MASA's
experts, VB-LoRA's bank) thus stay shared in memory, and gradients reach them from every layer.

Layer forward: ``y = base(x) + (x Aᵀ) Bᵀ`` per active adapter (the scale is folded into B);
``adapter_names`` gives each row of a batch its own adapter (``"__base__"``: none); merging adds
ΔW = B A (transposed for Conv1D) to the base weight. State-dict keys are
``base_model.adaptzip_forms.<param>`` in the saved file (the adapter name removed, PEFT's rule).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from torch.nn import functional as F
from transformers.pytorch_utils import Conv1D

from ..adapter import ModuleInfo, split_layer
from ..forms import REGISTRY
from ..forms.base import live_factors
from .config import AdaptzipFormConfig, BSLoRAConfig, JointConfig, MASAConfig, VBLoRACompactConfig

FORMS = "adaptzip_forms"  # the tuner's ModuleDict: adapter name -> live form
SHARED = "adaptzip_shared"  # the tuner's ModuleDict: basis key -> a basis shared by several adapters (joint)
BASE_ROWS = "__base__"  # a row of a mixed batch without adapter (PEFT's name)


def _base_shape(base: nn.Module, key: str) -> tuple[int, int, bool]:
    """(in, out, fan_in_fan_out) of a layer adaptzip's tuners adapt (Linear, transformers' Conv1D)."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, Conv1D):
        n_in, n_out = base.weight.shape
        return int(n_in), int(n_out), True
    raise ValueError(f"{key}: adaptzip's tuners adapt Linear and Conv1D layers, not {type(base).__name__}")


class FormLayer(nn.Module, BaseTunerLayer):
    """A Linear or Conv1D layer with adaptzip adapters: ``adaptzip_index[name]`` is its module
    index in adapter ``name``'s form, held by the tuner model (not registered here, so the form's
    parameters are saved, moved and counted once)."""

    adapter_layer_names: tuple[str, ...] = ()  # the parameters live on the tuner (adaptzip_forms)
    other_param_names = ("adaptzip_index",)

    def __init__(self, base_layer: nn.Module, forms: nn.ModuleDict, key: str):
        super().__init__()
        self.base_layer = base_layer
        self.adaptzip_index: dict[str, int] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter: list[str] = []
        object.__setattr__(self, "_forms", forms)  # a reference, not a submodule
        self.in_features, self.out_features, self.fan_in_fan_out = _base_shape(self.get_base_layer(), key)

    def update_layer(self, adapter_name: str, index: int) -> None:
        self.adaptzip_index[adapter_name] = int(index)

    def _get_available_adapters(self) -> set[str]:
        return set(self.adaptzip_index)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in self.adaptzip_index:
            form = self._forms[name] if name in self._forms else None
            first = None if form is None else next(form.parameters(), None)
            want = name in names and not inference_mode
            if first is not None and first.requires_grad != want:  # every layer shares the form: set once
                form.requires_grad_(want)
        self._active_adapter = names

    # -- the update -----------------------------------------------------------------
    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B out×k, A k×in) of this layer in adapter ``name``, from the form's own code (in the
        form's precision under autocast: :func:`adaptzip.forms.base.live_factors`)."""
        form = self._forms[name]
        return live_factors(form, self.adaptzip_index[name], self.get_base_layer().weight.device.type)

    def _delta_out(self, x: torch.Tensor, name: str) -> torch.Tensor:
        B, A = self.factors(name)
        return F.linear(F.linear(x.to(A.dtype), A), B)

    def get_delta_weight(self, name: str) -> torch.Tensor:
        """ΔW of adapter ``name`` in the base weight's layout (out×in; in×out for Conv1D)."""
        B, A = self.factors(name)
        w = self.get_base_layer().weight
        delta = (B.float() @ A.float()).to(w.device)
        return (delta.T if self.fan_in_fan_out else delta).to(w.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.adaptzip_index:
                result = result + self._delta_out(x, name).to(result.dtype)
        return result

    def _mixed_batch_forward(self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any):
        """Row j of the batch gets adapter ``adapter_names[j]`` (``__base__``: none), one pass
        per distinct adapter over its rows."""
        result = self.base_layer(x, *args, **kwargs)
        if len(adapter_names) != x.shape[0]:
            raise ValueError(f"adapter_names has {len(adapter_names)} entries for a batch of {x.shape[0]} rows")
        by_basis: dict[tuple, list[tuple[str, list[int]]]] = {}
        for name in dict.fromkeys(adapter_names):
            if name == BASE_ROWS or name not in self.adaptzip_index:
                continue
            rows = [j for j, n in enumerate(adapter_names) if n == name]
            basis = getattr(self._forms[name], "basis", None)
            key = (id(basis), self.adaptzip_index[name]) if basis is not None else (name,)
            by_basis.setdefault(key, []).append((name, rows))
        for members in by_basis.values():
            if len(members) == 1 or getattr(self._forms[members[0][0]], "basis", None) is None:
                for name, rows in members:
                    result[rows] += self._delta_out(x[rows], name).to(result.dtype)
                continue
            # adapters of one shared basis (joint): x Vᵀ once for all their rows, each row's core, then Uᵀ once
            i = self.adaptzip_index[members[0][0]]
            basis = self._forms[members[0][0]].basis
            rows = [j for _, r in members for j in r]
            h = F.linear(x[rows].to(basis.V[i].dtype), basis.V[i])
            parts, start = [], 0
            for name, r in members:
                parts.append(self._forms[name].apply_core(i, h[start : start + len(r)]))
                start += len(r)
            result[rows] += F.linear(torch.cat(parts), basis.U[i]).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.adaptzip_index:
                continue
            weight = self.get_base_layer().weight
            with torch.no_grad():
                merged = weight.data + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights; adapter {name} seems to be broken")
                weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data -= self.get_delta_weight(name)

    def __repr__(self) -> str:
        return f"adaptzip.{super().__repr__()}"


def _adapter_names_hook(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs


class FormTuner(BaseTuner):
    """The PEFT model class of adaptzip's forms (see the module docstring); one subclass per
    registered PEFT method, naming its config and prefix."""

    tuner_layer_cls = FormLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING  # LoRA's defaults per model type
    uses_shared_state = True
    prefix: str

    # -- building an adapter -----------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: AdaptzipFormConfig, model_config: dict) -> AdaptzipFormConfig:
        if peft_config.modules is not None:  # an existing adapter: exactly its modules
            peft_config.target_modules = {m["name"] for m in peft_config.modules}
        return super()._prepare_adapter_config(peft_config, model_config)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        if not hasattr(self, FORMS):
            self.adaptzip_forms = nn.ModuleDict()
        config = self._prepare_adapter_config(self.peft_config[adapter_name], self.get_model_config(model))
        table, device = self._module_table(model, config)
        form_cls = REGISTRY[config.form_name()]
        fcfg = config.form_config()
        if config.form_state is None:  # a new adapter: the form's fresh start, ΔW = 0
            gen = torch.Generator().manual_seed(int(config.init_seed))
            state, tensors = form_cls.fresh(table, fcfg, gen)
        else:  # a saved adapter: tensors of the saved shapes, which PEFT's load then fills with the saved values
            state = config.form_state
            specs = form_cls.tensor_specs(table, fcfg, state)
            tensors = {name: torch.zeros(shape, dtype=dt or torch.float32) for name, (shape, dt) in specs.items()}
        live = form_cls.live(table, fcfg, state, tensors).to(device=device, dtype=config.dtype)
        basis = getattr(live, "basis", None)
        if basis is not None:  # held once per key, frozen: other adapters of the cluster use it too
            if not hasattr(self, SHARED):
                self.adaptzip_shared = nn.ModuleDict()
            if config.basis_key in self.adaptzip_shared:
                live.attach(self.adaptzip_shared[config.basis_key])
            else:
                self.adaptzip_shared[config.basis_key] = basis.to(device=device, dtype=config.dtype).requires_grad_(
                    False
                )
        self.adaptzip_forms[adapter_name] = live
        self._index = getattr(self, "_index", {})
        self._index[adapter_name] = {m.name: i for i, m in enumerate(table)}
        config.modules = [m.to_json() for m in table]
        config.form_state = state
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        missing = set(self._index[adapter_name]) - set(self.targeted_module_names)
        if missing:
            raise ValueError(f"the model has no module {sorted(missing)[0]} that adapter {adapter_name} adapts")
        trainable = adapter_name in self.active_adapters and not config.inference_mode
        live.requires_grad_(trainable)

    def _module_table(self, model: nn.Module, config: AdaptzipFormConfig) -> tuple[list[ModuleInfo], torch.device]:
        """The adapter's modules (its saved table, checked against the model, or every targeted
        Linear/Conv1D of the model in order) and the device of the first one's weight."""
        found: dict[str, tuple[int, int, bool, torch.device]] = {}
        for key, mod in model.named_modules():
            if key.endswith(".base_layer") or not self._check_target_module_exists(config, key):
                continue
            base = mod.get_base_layer() if isinstance(mod, BaseTunerLayer) else mod
            found[key] = (*_base_shape(base, key), base.weight.device)
        if config.modules is not None:
            table = [ModuleInfo.from_json(d) for d in config.modules]
            for m in table:
                if m.name not in found:
                    raise ValueError(f"the model has no Linear/Conv1D module {m.name} (the adapter adapts it)")
                n_in, n_out, fifo, _ = found[m.name]
                if (n_in, n_out) != (m.in_features, m.out_features):
                    raise ValueError(
                        f"{m.name}: the model's layer is {n_out}×{n_in}, the adapter's {m.out_features}×{m.in_features}"
                    )
        else:
            table = []
            for key, (n_in, n_out, fifo, _) in found.items():
                stack, layer, typ = split_layer(key)
                full = min(n_in, n_out)  # a new adapter has no source rank: the module's own
                table.append(ModuleInfo(key, stack, layer, typ, n_in, n_out, full, float(full), 1.0, "linear", fifo))
            if not table:
                raise ValueError(
                    f"no Linear or Conv1D module of the model matches target_modules {config.target_modules}"
                )
        return table, found[table[0].name][3]

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        index = self._index[adapter_name][current_key]
        if isinstance(target, FormLayer):
            target.update_layer(adapter_name, index)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"{current_key} already carries an adapter of another PEFT method")
        layer = FormLayer(target, self.adaptzip_forms, current_key)
        layer.update_layer(adapter_name, index)
        layer.set_adapter(self.active_adapters)
        self._replace_module(parent, target_name, layer, target)

    # -- adapters ------------------------------------------------------------------------
    def delete_adapter(self, adapter_name: str) -> None:
        key = getattr(self.peft_config.get(adapter_name), "basis_key", None)
        super().delete_adapter(adapter_name)
        del self.adaptzip_forms[adapter_name]
        self._index.pop(adapter_name, None)
        if key is not None and not any(getattr(c, "basis_key", None) == key for c in self.peft_config.values()):
            del self.adaptzip_shared[key]  # its last adapter is gone

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's rule for adapter weights: float16/bfloat16 computed in float32 unless
        ``autocast_adapter_dtype=False`` (then they stay in the stored dtype)."""
        form = self.adaptzip_forms[adapter_name]
        if autocast_adapter_dtype and any(p.dtype in (torch.float16, torch.bfloat16) for p in form.parameters()):
            form.float()
        basis = getattr(form, "basis", None)
        if autocast_adapter_dtype and basis is not None:
            basis.float()

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """``model(..., adapter_names=[...])`` and ``generate(..., adapter_names=[...])``: one adapter per row."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        unknown = {n for n in adapter_names if n != BASE_ROWS} - set(self.adaptzip_forms.keys())
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        beams = kwargs.get("num_beams")
        if isinstance(beams, int) and beams > 1:  # generate repeats every row num_beams times
            adapter_names = [n for n in adapter_names for _ in range(beams)]
        handles = [
            m.register_forward_pre_hook(partial(_adapter_names_hook, adapter_names=adapter_names), with_kwargs=True)
            for m in self.modules()
            if isinstance(m, FormLayer)
        ]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # -- state dict ----------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """PEFT's structural selection, less the shared bases of other adapters."""
        out = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        mine = f"{SHARED}.{getattr(config, 'basis_key', None)}."
        return {k: v for k, v in out.items() if f"{SHARED}." not in k or mine in k}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{FORMS}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{FORMS}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


class BSLoRAModel(FormTuner):
    """PEFT model of :class:`~adaptzip.peft.config.BSLoRAConfig`."""

    prefix = "adaptzip_bslora_"


class MASAModel(FormTuner):
    """PEFT model of :class:`~adaptzip.peft.config.MASAConfig`."""

    prefix = "adaptzip_masa_"


class VBLoRACompactModel(FormTuner):
    """PEFT model of :class:`~adaptzip.peft.config.VBLoRACompactConfig`."""

    prefix = "adaptzip_vblora_"


class JointModel(FormTuner):
    """PEFT model of :class:`~adaptzip.peft.config.JointConfig`."""

    prefix = "adaptzip_joint_"


#: PEFT method name (lower case, as ``register_peft_method`` wants) → (config, model).
METHODS = {
    "adaptzip_bslora": (BSLoRAConfig, BSLoRAModel),
    "adaptzip_masa": (MASAConfig, MASAModel),
    "adaptzip_vblora": (VBLoRACompactConfig, VBLoRACompactModel),
    "adaptzip_joint": (JointConfig, JointModel),
}
