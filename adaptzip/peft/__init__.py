"""adaptzip's shared forms as live PEFT methods: a converted adapter runs, switches, merges and
trains in its compact form (the shared parts held once), not as the plain LoRA ``expand``
replicates it into.

Four PEFT methods, registered with ``peft.utils.register_peft_method`` when this module is
imported (``import adaptzip`` imports it as soon as ``peft`` is imported, see
:mod:`adaptzip.peft_hook`):

==================  ============================  ===========================================
PEFT type           config                        holds per adapter (once, on the tuner model)
==================  ============================  ===========================================
ADAPTZIP_BSLORA     :class:`BSLoRAConfig`         local pairs + intra/inter shared pairs (+ gates/kernels)
ADAPTZIP_MASA       :class:`MASAConfig`           per-group A-experts + per-module B
ADAPTZIP_VBLORA     :class:`VBLoRACompactConfig`  bank + uint8/int16 indices + k−1 weights
ADAPTZIP_JOINT      :class:`JointConfig`          a core per module; U, V once per basis key
==================  ============================  ===========================================

``adaptzip expand C --to peft-native -o DIR`` writes such an adapter; then
``PeftModel.from_pretrained(base, DIR)``. ``get_peft_model(base, BSLoRAConfig(target_modules=[...],
transform="ke"))`` starts a new one (ΔW = 0) to train in the form. PEFT has no entry point for
third-party methods and its ``PeftType`` enum lists only its own, so :func:`peft_type` adds
adaptzip's members to that enum before registering (the one departure from PEFT's own tuners).
"""

from __future__ import annotations

import peft as _peft
from packaging.version import Version

#: The PEFT release these tuners are written and tested against (its tuner hooks: register_peft_method,
#: the classmethod state-dict hooks of BaseTuner); older releases lack them.
MIN_PEFT = "0.21"
if Version(_peft.__version__) < Version(MIN_PEFT):
    raise ImportError(f"adaptzip's PEFT tuners need peft >= {MIN_PEFT} (installed: {_peft.__version__})")

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402
from peft.utils import PeftType, register_peft_method  # noqa: E402

from .config import AdaptzipFormConfig, BSLoRAConfig, JointConfig, MASAConfig, VBLoRACompactConfig  # noqa: E402
from .tuner import METHODS, BSLoRAModel, FormLayer, FormTuner, JointModel, MASAModel, VBLoRACompactModel  # noqa: E402

#: ``Form.native_tuner`` → the config class of that tuner.
NATIVE: dict[str, type[AdaptzipFormConfig]] = {
    "bslora": BSLoRAConfig,
    "masa": MASAConfig,
    "vblora": VBLoRACompactConfig,
    "joint": JointConfig,
}


def peft_type(name: str) -> PeftType:
    """The ``PeftType`` member ``name`` (upper case), added to PEFT's enum when missing."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


def register() -> None:
    """Register adaptzip's three PEFT methods (idempotent)."""
    for name, (config_cls, model_cls) in METHODS.items():
        ptype = peft_type(name.upper())
        if PEFT_TYPE_TO_CONFIG_MAPPING.get(ptype) is config_cls:
            continue
        register_peft_method(name=name, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)


register()

__all__ = [
    "AdaptzipFormConfig",
    "BSLoRAConfig",
    "MASAConfig",
    "VBLoRACompactConfig",
    "JointConfig",
    "FormLayer",
    "FormTuner",
    "BSLoRAModel",
    "MASAModel",
    "VBLoRACompactModel",
    "JointModel",
    "peft_type",
    "register",
]
