"""Form registry: one file per form, one import line here (each module registers its form).

``BASELINE`` names the form every other is compared with at the same bytes (the per-module SVD
with global rank allocation): :func:`baseline_form` and :func:`is_baseline` are how code outside
this package refers to it, so that no form name appears anywhere else."""

from . import bslora, joint, lora, masa, svd, vblora  # noqa: F401
from .base import REGISTRY, FitContext, Form, get_form, make_config, user_options

BASELINE = "svd"


def baseline_form() -> type[Form]:
    """The same-bytes yardstick: per-module SVD, ranks allocated globally by energy per byte."""
    return REGISTRY[BASELINE]


def lossless_form() -> type[Form]:
    """The form that repacks the source exactly (the size no form should exceed unasked)."""
    return next(cls for _, cls in sorted(REGISTRY.items()) if cls.lossless)


def is_baseline(form: Form) -> bool:
    """True when ``form`` is the baseline fitted with default user options: then, fitted to a
    budget, it IS the same-bytes baseline (no second fit is needed)."""
    cls = baseline_form()
    return type(form) is cls and user_options(form.config) == user_options(cls.Config())


__all__ = [
    "BASELINE",
    "REGISTRY",
    "FitContext",
    "Form",
    "baseline_form",
    "get_form",
    "is_baseline",
    "lossless_form",
    "make_config",
    "user_options",
]
