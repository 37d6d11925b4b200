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

from .peft_hook import install as _install_peft_methods  # noqa: E402

_install_peft_methods()  # adaptzip's PEFT tuners, registered once PEFT is imported (adaptzip.peft)

# The public names load their modules (torch, safetensors…) on first use, so that ``import
# adaptzip`` itself is light: the console script (:mod:`adaptzip.entry`) must be able to answer a
# Ctrl-C that lands while those modules are still importing.
_LAZY = {
    "Adapter": ("adapter", "Adapter"),
    "ModuleInfo": ("adapter", "ModuleInfo"),
    "load_adapter": ("adapter", "load_adapter"),
    "compress": ("api", "compress"),
    "expand": ("api", "expand"),
    "inspect": ("api", "inspect"),
    "list_forms": ("api", "list_forms"),
    "verify": ("api", "verify"),
    "Container": ("container", "Container"),
    "open_container": ("container", "open_container"),
    "AdaptzipError": ("errors", "AdaptzipError"),
    "CalibrationOptions": ("options", "CalibrationOptions"),
    "CompressResult": ("options", "CompressResult"),
    "FitOptions": ("options", "FitOptions"),
    "QuantOptions": ("options", "QuantOptions"),
    "RunOptions": ("options", "RunOptions"),
    "report_containers": ("report", "report"),  # (the module adaptzip.report keeps its name)
    "batch": ("zoo", "batch"),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'adaptzip' has no attribute {name!r}")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
