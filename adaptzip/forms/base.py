"""The one interface every form implements, and the form registry.

A form is a ``torch.nn.Module`` whose parameters produce, for each module ``i`` of the adapter's
module table, two factors ``factors(i) -> (B, A)`` with ΔŴ_i = B @ A (out×in, the scale folded
in), differentiably. The same object is

* fitted in weight space (:mod:`adaptzip.fit`),
* run live inside a base model for distillation (:mod:`adaptzip.calibrate`),
* stored (``tensors()`` / ``from_tensors()``) and expanded (:mod:`adaptzip.export`).

A form adds: a hyperparameter dataclass ``Config`` (defaults from its paper, help text in the
field metadata, ``internal: True`` in the metadata for fields the budget search sets), ``fit``,
``factors``, ``tensors``, ``tensor_specs`` (the exact names, shapes and dtypes of what it stores,
used by ``verify``), ``from_tensors`` and ``config_for_budget``. Adding a form is one file in
``adaptzip/forms/`` plus one line in ``adaptzip/forms/__init__.py``: its Config fields become
CLI options (:mod:`adaptzip.cli`), ``adaptzip forms`` lists it, quantised storage and every
export work through the hooks below; nothing outside ``forms/`` tests a form's name.

Optional hooks (class attributes and methods with working defaults):

* ``lossless`` — the form restores the source exactly (no same-bytes baseline to compare with);
* ``auto_candidate`` — ``--to auto`` tries the form (default True);
* ``direction_rows`` / :meth:`stored_ranks` — stored ``A.{i}``/``B.{i}`` are module i's factors,
  one rank direction per row of A (reports then show bits per rank position);
* :meth:`directions` — ``--quant auto`` may drop or store each singular direction at its own
  width (:mod:`adaptzip.qsearch`);
* :meth:`quant_axis` — the group axis of a stored tensor (None: chosen by error);
* :meth:`native_exports` — extra ``expand --to`` targets of this form (e.g. PEFT's own VB-LoRA);
* :meth:`sharing` — whether a fitted shared form really shares anything, and why not;
* ``native_tuner`` / :meth:`live` / :meth:`fresh` — the form runs live in PEFT
  (:mod:`adaptzip.peft`): the module its tuner holds, and a new trainable adapter with ΔW = 0.
"""

from __future__ import annotations

import abc
import dataclasses
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..adapter import Adapter, ModuleInfo
from ..errors import OptionError
from ..sigma import SigmaSketch

Tensor = torch.Tensor

# name -> (shape, dtype or None for "the container's float dtype")
TensorSpecs = dict[str, tuple[tuple[int, ...], torch.dtype | None]]


@dataclass(frozen=True)
class Directions:
    """A form's rank directions: per module, balanced factors (B out×k, A k×in) of every direction
    it may store, strongest first, and ``with_ranks(ranks)``: the configuration keeping the first
    ``ranks[i]`` directions of module i."""

    table: list[tuple[Tensor, Tensor]]
    with_ranks: Callable[[Sequence[int]], Any]


@dataclass
class FitContext:
    """What a fit may use beyond the adapter: Σ statistics per module name or None, the seed,
    whether to show progress, and a bound on optimiser steps. A module's Σ is a dense in×in fp32
    tensor or a :class:`~adaptzip.sigma.SigmaSketch` (exact on the source's row space); forms use
    it only through :mod:`adaptzip.linalg` (``weigh``, ``gram``, ``sq_error``, ``factored_svd``…)."""

    stats: dict[str, Tensor | SigmaSketch] | None = None
    seed: int = 0
    progress: bool = False
    max_steps: int | None = None
    cache: dict = field(default_factory=dict)  # per-run memo (e.g. spectra shared by budget and fit)

    def sigma(self, m: ModuleInfo) -> Tensor | SigmaSketch | None:
        return None if self.stats is None else self.stats.get(m.name)


class Form(nn.Module, metaclass=abc.ABCMeta):
    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]
    #: The form restores the source exactly: there is no same-bytes approximation to compare with.
    lossless: ClassVar[bool] = False
    #: Stored ``A.{i}`` (k_i×in) and ``B.{i}`` (out×k_i) are module i's factors, one rank direction
    #: per row of A / column of B (see :meth:`stored_ranks`).
    direction_rows: ClassVar[bool] = False
    #: ``compress --to auto`` tries this form (False: a form that never beats another alone).
    auto_candidate: ClassVar[bool] = True
    #: The :mod:`adaptzip.peft` tuner that runs this form live inside a model ("bslora", "masa",
    #: "vblora"), or None: the form is a plain LoRA (``expand --to peft``) or has no tuner.
    native_tuner: ClassVar[str | None] = None

    def __init__(self, modules: Sequence[ModuleInfo], config: Any):
        super().__init__()
        self.modules_info: list[ModuleInfo] = list(modules)
        self.config = config
        # Form-specific facts chosen at fit time that the manifest must record (e.g. svd ranks).
        self.state_info: dict[str, Any] = {}
        # Metrics the fit measured (e.g. soft vs hard top-k error); copied into the manifest.
        self.fit_info: dict[str, Any] = {}
        # The quantised storage the form will be written with, once chosen (quantisation-aware
        # distillation sees the form through it; ``container.build`` stores it so).
        self.quant_storage: Any = None

    # -- construction ---------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def fit(cls, adapter: Adapter, config: Any, ctx: FitContext) -> Form:
        """Weight-space (Σ-weighted when ctx.stats) fit of the adapter's updates."""

    @classmethod
    @abc.abstractmethod
    def tensor_specs(cls, modules: Sequence[ModuleInfo], config: Any, state: dict) -> TensorSpecs:
        """Exact names, shapes and dtypes of the stored tensors for this configuration."""

    @classmethod
    @abc.abstractmethod
    def from_tensors(cls, modules: Sequence[ModuleInfo], config: Any, state: dict, tensors: dict[str, Tensor]) -> Form:
        """Rebuild the form from stored tensors (shapes already checked against tensor_specs)."""

    @classmethod
    def config_for_budget(
        cls, adapter: Adapter, config: Any, budget_bytes: int, float_bytes: int, ctx: FitContext
    ) -> Any:
        """A configuration whose stored payload fits ``budget_bytes`` (floats of ``float_bytes``)."""
        raise OptionError(None, f"form {cls.name} does not support --budget")

    @classmethod
    def stored_lora_factors(
        cls, modules: Sequence[ModuleInfo], config: Any, state: dict, tensors: dict[str, Tensor]
    ) -> list[tuple[Tensor, Tensor, float]] | None:
        """(B, A, scale) per module read straight from the stored tensors, in their stored dtype,
        for forms whose stored tensors already are LoRA factors (``lora``, ``svd``): expand then
        skips rebuilding the form's fp32 parameters. None (the default): rebuild the form and
        use :meth:`lora_factors`."""
        return None

    @classmethod
    def stored_ranks(cls, modules: Sequence[ModuleInfo], config: Any, state: dict) -> list[int] | None:
        """Stored rank of every module when ``direction_rows`` (read off :meth:`tensor_specs`), else None."""
        if not cls.direction_rows:
            return None
        specs = cls.tensor_specs(modules, config, state)
        return [int(specs[f"A.{i}"][0][0]) for i in range(len(modules))]

    @classmethod
    def directions(cls, adapter: Adapter, config: Any, ctx: FitContext) -> Directions | None:
        """The rank directions ``--quant auto`` may store each at its own width (None: this form
        stores no such directions; its tensors get one width each)."""
        return None

    @classmethod
    def native_exports(cls) -> dict[str, Callable[..., dict]]:
        """Extra ``expand --to`` targets: name → ``fn(container, out_dir, *, dtype) -> dict``
        (by default ``peft-native`` when the form has a :attr:`native_tuner`)."""
        if cls.native_tuner is None:
            return {}
        from ..export import to_peft_native  # the export module imports forms: import it when asked

        return {"peft-native": to_peft_native}

    @classmethod
    def sharing(cls, modules: Sequence[ModuleInfo], config: Any, state: dict, metrics: dict | None) -> dict | None:
        """For forms that share parameters across modules: ``{"sharing_used": bool, "why": str}``
        read off a fitted or stored configuration (``metrics``: the manifest's, for the budget
        search's notes); None for forms without sharing (lora, svd)."""
        return None

    @classmethod
    def live(cls, modules: Sequence[ModuleInfo], config: Any, state: dict, tensors: dict[str, Tensor]) -> nn.Module:
        """The module a PEFT-native tuner holds for this form (:mod:`adaptzip.peft`): the stored
        tensors as its parameters and buffers, once, and ``factors(i)`` for module i's (B, A).
        Default: the form itself (:meth:`from_tensors`)."""
        return cls.from_tensors(modules, config, state, tensors)

    @classmethod
    def fresh(cls, modules: Sequence[ModuleInfo], config: Any, gen: torch.Generator) -> tuple[dict, dict[str, Tensor]]:
        """(state, tensors) of a new trainable adapter in this form with ΔW = 0 (as PEFT starts a
        LoRA: every product has a zero factor, the other random), for ``get_peft_model``."""
        raise OptionError(None, f"form {cls.name} cannot start a new adapter; convert one with adaptzip compress")

    def quant_axis(self, name: str, shape: tuple[int, ...]) -> int | None:
        """The group axis of stored tensor ``name`` under quantisation (None: chosen by error)."""
        return None

    # -- use --------------------------------------------------------------------
    @abc.abstractmethod
    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        """(B, A) of module i: B (out×k), A (k×in), fp32, ΔŴ_i = B @ A with the scale folded in."""

    def lora_factors(self, i: int) -> tuple[Tensor, Tensor, float]:
        """(B, A, scale) to write as a PEFT LoRA: ΔŴ_i = scale · B @ A. Forms that keep the
        source's own factors (``lora``) override this to restore them exactly."""
        B, A = self.factors(i)
        return B, A, 1.0

    @abc.abstractmethod
    def tensors(self) -> dict[str, Tensor]:
        """The tensors to store (floats in any dtype: the container casts them)."""

    def float_params(self) -> int:
        """Stored float values (what the container dtype applies to)."""
        specs = self.tensor_specs(self.modules_info, self.config, self.state_info)
        return sum(_numel(s) for s, dt in specs.values() if dt is None)

    def trainable_groups(self) -> list[dict]:
        """Parameter groups for distillation (default: every parameter, one group)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def finalize(self) -> None:
        """Called after distillation (e.g. VB-LoRA re-freezes its top-k selection)."""


def live_factors(form: Form, i: int, device_type: str) -> tuple[Tensor, Tensor]:
    """``form.factors(i)`` in the form's own precision, also inside an autocast region: a form's
    factors are small, skinny products (Kronecker expansions, gates, expert mixes, bank
    gathers) for which CPU bf16 kernels are far slower than fp32 — under bf16 autocast they made
    a bslora-ke/-gt or masa distillation step 4–10× slower (bench/bench_calibrate.py). Only the
    activations' products ``(x Aᵀ) Bᵀ`` then run in the autocast dtype."""
    with torch.autocast(device_type, enabled=False):
        return form.factors(i)


def a_side(shape: Sequence[int], gen: torch.Generator) -> Tensor:
    """PEFT's LoRA A initialisation (kaiming-uniform with a = √5): U(−1/√fan_in, 1/√fan_in),
    fan_in the last dimension; seeded."""
    bound = 1.0 / max(int(shape[-1]), 1) ** 0.5
    return (torch.rand(tuple(shape), generator=gen) * 2 - 1) * bound


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


REGISTRY: dict[str, type[Form]] = {}


def register(cls: type[Form]) -> type[Form]:
    REGISTRY[cls.name] = cls
    return cls


def get_form(name: str) -> type[Form]:
    if name not in REGISTRY:
        raise OptionError(None, f"unknown form {name!r} (known: {', '.join(sorted(REGISTRY))})")
    return REGISTRY[name]


def config_fields(cls: type) -> list[dict]:
    """The options of a form's Config: name, default, type, help and whether it is internal (set
    by the budget search, hidden from the CLI) — for `adaptzip forms` and the CLI's options."""
    out = []
    for f in fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(
            {
                "name": f.name,
                "default": default,
                "type": str(f.type),
                "help": f.metadata.get("help", ""),
                "internal": bool(f.metadata.get("internal", False)),
            }
        )
    return out


def user_options(config: Any) -> dict[str, Any]:
    """The fields of a Config a user sets (internal ones, chosen by the budget search, left out)."""
    return {f.name: getattr(config, f.name) for f in fields(config) if not f.metadata.get("internal", False)}


def make_config(form: type[Form], options: dict[str, Any]) -> Any:
    """Build ``form.Config`` from options; unknown options are refused naming the form."""
    known = {f.name for f in fields(form.Config)}
    unknown = sorted(k for k, v in options.items() if v is not None and k not in known)
    if unknown:
        raise OptionError(
            None, f"form {form.name} has no option {unknown[0]!r} (its options: {', '.join(sorted(known)) or 'none'})"
        )
    hints = typing.get_type_hints(form.Config)
    for k, v in options.items():
        want = None if v is None else _type_problem(v, hints[k])
        if want is not None:
            raise OptionError(None, f"form {form.name}: option {k} expects {want}, got {v!r}")
    try:
        return form.Config(**{k: v for k, v in options.items() if v is not None})
    except (TypeError, ValueError) as e:
        raise OptionError(None, f"form {form.name}: {e}") from e


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should have been for a Config field typed ``hint`` (int, float, bool, str,
    tuples of those, optional), or None when it fits."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        wants = [_type_problem(value, a) for a in args if a is not type(None)]
        return None if any(w is None for w in wants) else " or ".join(wants)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            value = (value,)  # a single value given for a tuple: checked as one element
        elem = args[0] if args else Any
        bad = next((w for w in (_type_problem(x, elem) for x in value) if w is not None), None)
        return None if bad is None else f"a comma-separated list of {bad.removeprefix('an ').removeprefix('a ')}s"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    return None


def config_to_json(config: Any) -> dict:
    return dataclasses.asdict(config)


def config_from_json(form: type[Form], d: dict) -> Any:
    return form.Config(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})
