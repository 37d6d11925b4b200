"""Register adaptzip's PEFT methods (:mod:`adaptzip.peft`) whenever PEFT is in use, without
making ``import adaptzip`` import PEFT (about 3 s; the CLI's reading commands never need it).

:func:`install` (called by ``import adaptzip``): when ``peft`` is already imported, import
:mod:`adaptzip.peft` now; otherwise put a finder first on ``sys.meta_path`` that, when ``peft``
is imported later, lets PEFT's own loader run and then imports :mod:`adaptzip.peft` (which
registers with ``peft.utils.register_peft_method``). So ``import adaptzip`` followed by
``PeftModel.from_pretrained(base, DIR)`` loads an ``expand --to peft-native`` directory in either
import order.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import warnings


class _PeftFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != "peft":
            return None
        sys.meta_path.remove(self)  # one shot: the spec comes from the finders after this one
        spec = importlib.util.find_spec("peft")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register()

        spec.loader.exec_module = exec_module
        return spec


def _register() -> None:
    """Import :mod:`adaptzip.peft`; a PEFT it cannot work with (too old) must not break the
    user's ``import peft``: say why in one warning instead."""
    try:
        importlib.import_module("adaptzip.peft")
    except ImportError as e:
        warnings.warn(f"adaptzip: its PEFT methods are not registered: {e}", stacklevel=2)


def install() -> None:
    if "peft" in sys.modules:
        _register()
    elif not any(isinstance(f, _PeftFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftFinder())
