"""Form registry: one file per form, one import line here."""
from .base import REGISTRY, FitContext, Form, get_form, make_config  # noqa: F401
from . import lora, svd  # noqa: F401  (each module registers its form)
from . import masa  # noqa: F401,E402  (issue 4: MASA)
from . import vblora  # noqa: F401,E402  (issue 4: VB-LoRA)
from . import bslora  # noqa: F401,E402  (issue 3: BSLoRA SS/GT/KE)
