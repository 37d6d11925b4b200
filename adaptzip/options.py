"""The options of ``compress`` (and ``batch``), grouped by what they steer, and its typed result.

:func:`adaptzip.api.compress` takes the source, the output, the target form, the budget and the
form's own options, then one dataclass per concern::

    compress(lora_dir, output, to="bslora-ke", budget=0.06,
             fitting=FitOptions(seed=1),
             calibration=CalibrationOptions(base_model="base/", calib="text.txt", steps=100),
             quant=QuantOptions(scheme="int8"),
             run=RunOptions(force=True))

Every class is frozen and has a ``to_json()`` (what ``batch`` hashes into its resume stamp).
:class:`CompressResult` is what compress returns; ``to_json()`` gives the flat object that
``adaptzip compress --json`` prints.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import OptionError

DEFAULT_GROUP = 64  # quantisation group size (values per fp16 scale)
QUANT_SCHEMES = ("none", "int8", "int4", "int4-asym", "auto")


def _plain(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return list(v)
    return v


@dataclass(frozen=True)
class FitOptions:
    """The weight-space fit.

    dtype: container float dtype (fp16, bf16, fp32; None: the source's).
    seed: random seed; same inputs and seed give a byte-identical container.
    steps: bound on the optimiser steps of iterative fits (None: each form's own rule).
    stats: Σ per module name (a dense in×in fp32 tensor or an adaptzip.sigma.SigmaSketch) for an
    activation-weighted fit without a base model.
    baseline: also fit and measure the same-bytes svd baseline."""

    dtype: str | None = None
    seed: int = 0
    steps: int | None = None
    stats: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)
    baseline: bool = True

    def __post_init__(self):
        if self.dtype is not None and self.dtype not in ("fp16", "bf16", "fp32"):
            raise OptionError(None, f"--dtype {self.dtype!r}: expected one of fp16, bf16, fp32")
        if self.steps is not None and self.steps < 0:
            raise OptionError(None, f"fit steps must be ≥ 0, got {self.steps}")

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "seed": self.seed, "steps": self.steps, "baseline": self.baseline}


_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds of ``--calib-time``: a number of seconds (``600``) or a number with a unit, s, m
    (or min) or h (``90s``, ``10m``, ``1.5h``). Raises OptionError otherwise or when ≤ 0."""
    if isinstance(text, (int, float)):
        v = float(text)
    else:
        t = str(text).strip().lower()
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if t.endswith(u)), "")
        try:
            v = float(t[: len(t) - len(unit)]) * _UNITS.get(unit, 1.0)
        except ValueError:
            raise OptionError(
                None, f"--calib-time {text!r}: expected seconds or a duration like 90s, 10m, 1.5h"
            ) from None
    if not v > 0 or v == float("inf"):
        raise OptionError(None, f"--calib-time {text!r}: must be a positive duration")
    return v


# calibration tokens used when --calib-tokens is not given (all of a shorter text)
CALIB_TOKENS = 50000


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration on the base model: Σ statistics, distillation, behavioural metrics.

    base_model: a model directory (safetensors) or a ``.gguf`` file (None: no teacher; then
    ``stats_file`` alone gives a Σ-weighted fit).
    calib: calibration text (UTF-8, paragraphs separated by blank lines, or JSONL with ``text``).
    tokens: calibration tokens used (10% held out for early stopping, 10% more for eval); None: up
    to CALIB_TOKENS, all of a shorter text; a number: exactly that many (fewer in the text: refused).
    steps: the distillation step cap (batches of ``batch_size`` × ``seq_len`` tokens); 0: none.
    max_steps: how far that cap may grow while the held-out objective still falls by more than
    2% per third of ``steps`` (see adaptzip.trainer); None: 3 × ``steps``; ``steps``: a fixed cap.
    eval_text: evaluation text (None: a held-out part of ``calib``).
    stats_file: Σ file, reused when it exists, else written (None: ``<output>.stats.safetensors``).
    device: auto (CUDA when available), cpu or cuda.
    lr: distillation learning rate (None: probed on the held-out split, see adaptzip.trainer).
    auto_distil: with ``--to auto``, how many of the most promising forms are distilled.
    seconds: wall-clock budget for all distillation of one compress (None: ``steps`` and
    convergence alone), shared by the forms distilled (the form and its svd baseline; auto's
    shortlist).
    precision: of the training passes: auto (bf16 where the CPU/GPU computes it natively), fp32
    or bf16; the eval metrics are always computed in fp32."""

    base_model: str | Path | None = None
    calib: str | Path | None = None
    tokens: int | None = None
    steps: int = 300
    max_steps: int | None = None
    eval_text: str | Path | None = None
    stats_file: str | Path | None = None
    device: str = "auto"
    lr: float | None = None
    seq_len: int = 128
    batch_size: int = 4
    auto_distil: int = 3
    seconds: float | None = None
    precision: str = "auto"

    @property
    def steps_most(self) -> int:
        """The most steps one distillation may take (the cap grown as far as it may go)."""
        return 3 * self.steps if self.max_steps is None else self.max_steps

    def __post_init__(self):
        if self.base_model is None and (self.calib is not None or self.eval_text is not None):
            raise OptionError(None, "--calib/--eval need --base-model (the teacher runs on the base model)")
        if self.base_model is not None and self.calib is None:
            raise OptionError(None, "--base-model needs --calib TEXT (UTF-8 text or JSONL with a 'text' field)")
        if self.tokens is not None and self.tokens < 1:
            raise OptionError(None, f"--calib-tokens {self.tokens} must be ≥ 1")
        if self.steps < 0:
            raise OptionError(None, f"--calib-steps {self.steps} must be ≥ 0")
        if self.max_steps is not None and self.max_steps < self.steps:
            raise OptionError(
                None, f"--calib-max-steps {self.max_steps} must be ≥ --calib-steps {self.steps} (equal: a fixed cap)"
            )
        if self.seconds is not None and self.base_model is None:
            raise OptionError(None, "--calib-time limits distillation: it needs --base-model and --calib")
        if self.seconds is not None and not self.seconds > 0:
            raise OptionError(None, f"--calib-time must be > 0 seconds, got {self.seconds}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionError(None, f"--calib-lr must be a finite number > 0, got {self.lr}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device).lower()):
            raise OptionError(None, f"--device {self.device!r}: expected auto, cpu or cuda[:N]")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise OptionError(None, f"--precision {self.precision!r}: expected auto, fp32 or bf16")
        for name in ("seq_len", "batch_size", "auto_distil"):
            if getattr(self, name) < 1:
                raise OptionError(None, f"calibration {name} must be ≥ 1, got {getattr(self, name)}")

    @property
    def teacher(self) -> bool:
        """True when a base model runs (distillation and behavioural metrics)."""
        return self.base_model is not None

    def to_json(self) -> dict:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class QuantOptions:
    """Storage of the form's float tensors (formats/quantization.md).

    scheme: none (the container dtype), int8, int4, int4-asym or auto (needs a budget).
    group_size: values per quantisation group (one fp16 scale each)."""

    scheme: str = "none"
    group_size: int = DEFAULT_GROUP

    def __post_init__(self):
        if self.scheme not in QUANT_SCHEMES:
            raise OptionError(None, f"--quant {self.scheme!r}: expected one of {', '.join(QUANT_SCHEMES)}")
        if self.group_size < 1:
            raise OptionError(None, f"--group-size must be ≥ 1, got {self.group_size}")

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "group_size": self.group_size}


@dataclass(frozen=True)
class RunOptions:
    """How the command runs: replace an existing output, show progress on stderr, the command
    line recorded in the manifest, torch's intra-op threads (None: leave them as they are; the
    CLI sets the idle cores, see :func:`adaptzip.runtime.use_threads`)."""

    force: bool = False
    progress: bool = False
    command: str | None = None
    threads: int | None = None


@dataclass
class CompressResult:
    """What :func:`adaptzip.api.compress` returns. ``metrics`` are the manifest's metrics (weight
    errors, svd baseline, calibration figures); ``quant`` the storage summary (when quantised);
    ``auto`` the ``--to auto`` report; ``sharing`` whether a shared form shares anything
    (``{"sharing_used": bool, "why": str}``, None for forms without sharing); ``warnings`` what
    the user must know (e.g. a container larger than the lossless repack); ``extras`` result-only
    facts of a calibrated run
    (per-module output errors, Σ file, timings). ``to_json()``: the flat object that
    ``adaptzip compress --json`` prints."""

    output: str
    form: str
    config: dict
    state: dict
    dtype: str
    source_bytes: int
    bytes: int
    stored_params: int
    source_params: int
    metrics: dict[str, Any]
    seconds: float
    quant: dict | None = None
    auto: dict | None = None
    sharing: dict | None = None
    warnings: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Container bytes / source adapter bytes."""
        return self.bytes / self.source_bytes

    @property
    def rel_error(self) -> float | None:
        """Relative error of the stored form (Σ-weighted output error when calibrated)."""
        return self.metrics.get("rel_error")

    def to_json(self) -> dict:
        out: dict[str, Any] = {
            "output": self.output,
            "form": self.form,
            "config": self.config,
            "state": self.state,
            "dtype": self.dtype,
            "source_bytes": self.source_bytes,
            "bytes": self.bytes,
            "ratio": self.ratio,
            "stored_params": self.stored_params,
            "source_params": self.source_params,
            **self.metrics,
        }
        if self.quant is not None:
            out["quant"] = self.quant
        if self.auto is not None:
            out["auto"] = self.auto
        if self.sharing is not None:
            out["sharing_used"] = self.sharing["sharing_used"]
            out["sharing"] = self.sharing["why"]
        if self.warnings:
            out["warnings"] = self.warnings
        out.update(self.extras)
        out["seconds"] = self.seconds
        return out
