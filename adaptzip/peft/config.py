"""PEFT configurations of adaptzip's live forms: ``BSLoRAConfig``, ``MASAConfig`` and
``VBLoRACompactConfig`` (PEFT dataclasses: field help in the metadata, checks in
``__post_init__``).

Every config names its targets as a LoRA's does (``target_modules``: names or suffixes) and, once
an adapter exists, its exact **module table** (``modules``: name, in/out features, layer, … in the
form's order) and the form's **layout** (``form_state``: the container manifest's ``state``), so
that loading builds exactly the tensors that were saved. ``adaptzip expand --to peft-native``
writes both from the container; ``get_peft_model`` on a new config derives them from the base
model and the options, then fills them in, so ``save_pretrained`` writes a complete config.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from peft import PeftConfig

from ..errors import AdaptzipError
from ..forms import REGISTRY
from ..forms.base import make_config

#: ``storage_dtype`` names → torch dtypes (the container's float dtypes).
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in STORAGE_DTYPES.items() if v == dtype)


def _help(form: str, option: str) -> str:
    """The help text of an adaptzip form option (one definition: the form's Config)."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(REGISTRY[form].Config) if f.name == option)


@dataclass
class AdaptzipFormConfig(PeftConfig, metaclass=abc.ABCMeta):
    """What every adaptzip tuner config holds (see the module docstring); subclasses add the
    form's own options and name the form (:meth:`form_name`)."""

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "modules to adapt: a list of names or name suffixes, or a regex, as for LoRA (Linear and Conv1D layers; default: LoRA's defaults for the model type)"
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "modules not to adapt: names, suffixes or a regex, as for LoRA"}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "modules besides the adapted ones that are trained and saved (e.g. a head)"}
    )
    modules: list[dict] | None = field(
        default=None,
        metadata={
            "help": "the module table in the form's order (adaptzip ModuleInfo JSON: name, in, out, stack, layer, type, ...); written by `adaptzip expand --to peft-native`, filled in when a new adapter is created"
        },
    )
    form_state: dict | None = field(
        default=None,
        metadata={
            "help": "the form's layout (the container manifest's `state`: ranks, groups, ...); None for a new adapter, derived from the options"
        },
    )
    storage_dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the adapter tensors as created and saved (the container's float dtype: float32, float16 or bfloat16); PEFT's autocast_adapter_dtype=True (its default) computes in float32"
        },
    )
    init_seed: int = field(default=0, metadata={"help": "seed of a new adapter's random initialisation"})

    PEFT_TYPE: ClassVar[str]

    def __post_init__(self) -> None:
        super().__post_init__()
        from . import peft_type  # the enum member is created when adaptzip.peft registers

        self.peft_type = peft_type(self.PEFT_TYPE)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.modules is not None and self.form_state is None:
            raise ValueError("a module table (modules) needs the form's layout (form_state)")
        if isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int):
            raise ValueError(f"init_seed must be an integer, got {self.init_seed!r}")
        self.form_config()  # the form's own checks, as ValueError

    # -- what the tuner needs --------------------------------------------------------
    @abc.abstractmethod
    def form_name(self) -> str:
        """The adaptzip form these options describe."""

    @abc.abstractmethod
    def form_options(self) -> dict[str, Any]:
        """Options of the adaptzip form's Config (None: the form's default)."""

    def form_config(self) -> Any:
        """The adaptzip form's Config of these options (ValueError when they are invalid)."""
        try:
            return make_config(REGISTRY[self.form_name()], self.form_options())
        except AdaptzipError as e:
            raise ValueError(e.cause) from e

    @property
    def dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.storage_dtype]

    @classmethod
    def from_container(cls, form_name: str, form_config: Any, **common: Any) -> AdaptzipFormConfig:
        """The config of a container of form ``form_name`` with Config ``form_config``, plus the
        common fields (module table, state, dtype, task type, ...)."""
        return cls(**cls.options_of(form_name, form_config), **common)

    @classmethod
    @abc.abstractmethod
    def options_of(cls, form_name: str, form_config: Any) -> dict[str, Any]:
        """This config's own fields for an adaptzip form Config (inverse of :meth:`form_options`)."""


BSLORA_TRANSFORMS = ("ss", "gt", "ke")


@dataclass
class BSLoRAConfig(AdaptzipFormConfig):
    """BSLoRA (local + intra-layer + inter-layer shared low-rank parts) live in PEFT; the shape
    transform is ``transform`` (ss: slice sharing, gt: gate transformation, ke: Kronecker
    extension)."""

    transform: str = field(
        default="ss",
        metadata={"help": "shape transform of the shared pairs: ss (slice sharing), gt (gates), ke (Kronecker)"},
    )
    ranks: list[int] | None = field(
        default=None, metadata={"help": _help("bslora-ss", "ranks") + " (default: the transform's paper ranks)"}
    )
    shared_size: int | None = field(
        default=None,
        metadata={"help": "gt: " + _help("bslora-gt", "shared_size") + "; ke: " + _help("bslora-ke", "shared_size")},
    )

    PEFT_TYPE: ClassVar[str] = "ADAPTZIP_BSLORA"

    def __post_init__(self) -> None:
        if self.transform not in BSLORA_TRANSFORMS:
            raise ValueError(f"transform must be one of {', '.join(BSLORA_TRANSFORMS)}, got {self.transform!r}")
        if self.transform == "ss" and self.shared_size is not None:
            raise ValueError("shared_size applies to the gt and ke transforms (ss slices the largest module dims)")
        if self.ranks is not None:
            self.ranks = list(self.ranks)
        super().__post_init__()

    def form_name(self) -> str:
        return f"bslora-{self.transform}"

    @classmethod
    def options_of(cls, form_name, form_config):
        transform = form_name.removeprefix("bslora-")
        opts = {"transform": transform, "ranks": list(form_config.ranks)}
        if transform != "ss":
            opts["shared_size"] = form_config.shared_size
        return opts

    def form_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"ranks": None if self.ranks is None else tuple(self.ranks)}
        if self.transform != "ss":
            opts["shared_size"] = self.shared_size
        return opts


@dataclass
class MASAConfig(AdaptzipFormConfig):
    """MASA (S consecutive layers of a type share N summed A-experts, one B per layer) live in PEFT."""

    r: int = field(default=8, metadata={"help": _help("masa", "rank")})
    group: int = field(default=2, metadata={"help": _help("masa", "group")})
    experts: int = field(default=1, metadata={"help": _help("masa", "experts")})

    PEFT_TYPE: ClassVar[str] = "ADAPTZIP_MASA"

    def form_name(self) -> str:
        return "masa"

    @classmethod
    def options_of(cls, form_name, form_config):
        return {"r": form_config.rank, "group": form_config.group, "experts": form_config.experts}

    def form_options(self) -> dict[str, Any]:
        return {"rank": self.r, "group": self.group, "experts": self.experts}


@dataclass
class VBLoRACompactConfig(AdaptzipFormConfig):
    """A converted VB-LoRA adapter kept as stored (bank + uint8/int16 indices + k−1 weights) for
    serving; bank and weights train with the top-k fixed. A new VB-LoRA is trained with PEFT's own
    ``VBLoRAConfig`` (dense logits) and converted with adaptzip."""

    num_vectors: int = field(default=256, metadata={"help": _help("vblora", "bank")})
    vector_length: int = field(default=256, metadata={"help": _help("vblora", "vector_len")})
    topk: int = field(default=2, metadata={"help": _help("vblora", "topk")})

    PEFT_TYPE: ClassVar[str] = "ADAPTZIP_VBLORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form_state is None:
            raise ValueError(
                "VBLoRACompactConfig loads a converted adapter (adaptzip expand --to peft-native); "
                "train a new VB-LoRA with peft.VBLoRAConfig and convert it with adaptzip compress --to vblora"
            )

    def form_name(self) -> str:
        return "vblora"

    @classmethod
    def options_of(cls, form_name, form_config):
        return {"num_vectors": form_config.bank, "vector_length": form_config.vector_len, "topk": form_config.topk}

    def form_options(self) -> dict[str, Any]:
        return {"bank": self.num_vectors, "vector_len": self.vector_length, "topk": self.topk}


@dataclass
class JointConfig(AdaptzipFormConfig):
    """A ``joint`` adapter (Compress-then-Serve: ΔW = U C V) live in PEFT: its core per module,
    and its cluster's U, V held once per base (adapters with the same ``basis_key`` share them;
    a batch whose rows use different adapters of one basis runs in one pass: x Vᵀ once, each
    row's core, then Uᵀ once)."""

    core: str = field(default="full", metadata={"help": _help("joint", "core")})
    basis_key: str | None = field(
        default=None,
        metadata={
            "help": "identifies the shared U, V (the zoo's shared-file sha256, or that of the container's own U, V tensors); adapters with the same key hold one copy"
        },
    )

    PEFT_TYPE: ClassVar[str] = "ADAPTZIP_JOINT"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.form_state is None or not self.basis_key:
            raise ValueError(
                "JointConfig loads converted zoo adapters (adaptzip batch --shared-basis, then expand --to peft-native)"
            )
        if not self.basis_key.isalnum():
            raise ValueError(f"basis_key must be alphanumeric (a hex digest), got {self.basis_key!r}")

    def form_name(self) -> str:
        return "joint"

    def form_options(self) -> dict[str, Any]:
        return {"core": self.core}

    @classmethod
    def options_of(cls, form_name, form_config):
        return {"core": form_config.core}
