"""adaptzip: convert existing PEFT LoRA adapters into compact parameter-shared forms and back.

Public API::

    import adaptzip
    ad = adaptzip.load_adapter("lora_dir")
    adaptzip.compress("lora_dir", "small.safetensors", to="svd", budget=0.25)  # -> CompressResult
    adaptzip.compress("lora_dir", "small.safetensors", to="bslora-ke", budget=0.06,
                      calibration=adaptzip.CalibrationOptions(base_model="base/", calib="text.txt"))
    adaptzip.expand("small.safetensors", "lora_out/")
    c = adaptzip.open_container("small.safetensors"); c.verify()
    adaptzip.batch("zoo_dir", "out_dir", to="svd", budget=0.25, shared_basis=True)   # every adapter below zoo_dir
    adaptzip.report_containers(["small.safetensors"], against="lora_dir", out="report_dir")
"""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that spin while waiting make torch 10-100x slower whenever the cores are shared
# (measured: a QR of an 11008x16 factor takes 5 ms with 1 thread, ~900 ms with 2 spinning threads
# on a busy 2-core machine, 7 ms with 2 passive ones). Must be set before torch loads OpenMP, so
# it only helps when adaptzip is imported first (the CLI); the user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .adapter import Adapter, ModuleInfo, load_adapter  # noqa: E402
from .api import compress, expand, inspect, list_forms, verify  # noqa: E402
from .container import Container, open_container  # noqa: E402
from .errors import AdaptzipError  # noqa: E402
from .options import CalibrationOptions, CompressResult, FitOptions, QuantOptions, RunOptions  # noqa: E402
from .peft_hook import install as _install_peft_methods  # noqa: E402
from .report import report as report_containers  # noqa: E402  (the module adaptzip.report keeps its name)
from .zoo import batch  # noqa: E402

_install_peft_methods()  # adaptzip's PEFT tuners, registered once PEFT is imported (adaptzip.peft)

__all__ = [
    "Adapter",
    "ModuleInfo",
    "load_adapter",
    "Container",
    "open_container",
    "compress",
    "expand",
    "inspect",
    "list_forms",
    "verify",
    "AdaptzipError",
    "FitOptions",
    "CalibrationOptions",
    "QuantOptions",
    "RunOptions",
    "CompressResult",
    "batch",
    "report_containers",
    "__version__",
]
