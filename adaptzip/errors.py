"""One exception family. Every error carries the path it concerns and a one-line cause;
the CLI turns it into ``adaptzip: error: <path>: <cause>`` and exit code 2."""

from __future__ import annotations

from pathlib import Path


class AdaptzipError(Exception):
    """Base class: ``path`` (may be None) and a one-line ``cause``."""

    exit_code = 2

    def __init__(self, path: str | Path | None, cause: str):
        self.path = None if path is None else str(path)
        self.cause = " ".join(str(cause).split())  # one line, always
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.path}: {self.cause}" if self.path else self.cause


class AdapterError(AdaptzipError):
    """The input adapter directory is missing, corrupt, inconsistent or unsupported."""


class UnsupportedAdapter(AdapterError):
    """A valid adapter that adaptzip refuses (e.g. a PEFT type other than LORA)."""


class ContainerError(AdaptzipError):
    """A container whose header, manifest, shapes or hashes are wrong."""


class OutputExists(AdaptzipError):
    """The output path exists and --force was not given."""


class OutputError(AdaptzipError):
    """The output cannot be written: no space left on the device, permission denied, a read-only
    file system, a parent that is not a folder. ``path`` is the output (the file or folder the
    user named, or the file inside it that failed); nothing is left behind."""


class OptionError(AdaptzipError):
    """Bad or contradictory options (form hyperparameters, budgets, targets)."""


class ExportError(AdaptzipError):
    """An export target cannot represent this container (e.g. DoRA for vLLM)."""


class BaseModelError(AdaptzipError):
    """A base model that is missing or does not match the adapter."""


class CalibrationError(AdaptzipError):
    """Calibration text or statistics that cannot be used."""


def os_error(e: OSError) -> AdaptzipError | None:
    """An OSError that names its file (permission denied, a folder where a file was expected,
    too many symbolic links…) as the adaptzip error of that file, or None when it names none.
    Readers turn the errors they expect into their own error class; this covers the rest in
    one place (the CLI's error line, a batch row), so no such error surfaces as a raw exception."""
    if e.filename is None:
        return None
    s = e.strerror or " ".join(str(e).split())
    return AdaptzipError(e.filename, s[:1].lower() + s[1:])
