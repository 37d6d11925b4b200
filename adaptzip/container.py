"""The adaptzip container: one ``.safetensors`` file whose ``__metadata__`` holds the manifest as
a JSON string under the single key ``adaptzip`` (see formats/container.md).

Tensor names: the form's own (e.g. ``A.3``, ``B.3``; documented per form in formats/forms/)
and ``carry.{j}`` for the j-th carried tensor of the source. Floats are stored in the container
dtype; integer tensors (indices) keep their integer dtype.
"""
from __future__ import annotations

import functools
import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .adapter import DTYPE_NAMES, TORCH_DTYPES, Adapter, Carried, ModuleInfo
from .errors import ContainerError
from .fileio import atomic_file
from .forms.base import Form, config_from_json, config_to_json, get_form

FORMAT = "adaptzip"
FORMAT_VERSION = 1
META_KEY = "adaptzip"
SCHEMA_FILE = Path(__file__).resolve().parent / "manifest.schema.json"


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order: name, dtype, shape, then the raw little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{str(t.dtype).removeprefix('torch.')}\0{list(t.shape)}\0".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@functools.cache
def manifest_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate_manifest(manifest: dict, path: Path | str | None = None) -> None:
    try:
        jsonschema.validate(manifest, manifest_schema())
    except jsonschema.ValidationError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ContainerError(path, f"manifest does not match the schema at {where}: {e.message}") from e


def encode_tensors(form: Form, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The form's tensors as stored: floats cast to the container dtype, integers unchanged."""
    out = {}
    for name, t in form.tensors().items():
        t = t.detach().cpu()
        out[name] = t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()
    return out


def build(form: Form, adapter: Adapter, dtype: torch.dtype, *, metrics: dict | None = None,
          command: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and manifest of a container (nothing written)."""
    tensors = encode_tensors(form, dtype)
    carried = []
    for j, c in enumerate(adapter.carried):
        name = f"carry.{j}"
        tensors[name] = adapter.carried_tensor(c.key).contiguous()
        carried.append({"tensor": name, "key": c.key, "role": c.role, "module": c.module})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adaptzip_version": __version__,
        "form": form.name,
        "config": config_to_json(form.config),
        "state": form.state_info,
        "dtype": DTYPE_NAMES[dtype],
        "source": {
            "name": adapter.name,
            "weights_file": adapter.weights_file.name,
            "sha256": adapter.sha256,
            "bytes": adapter.bytes,
            "dtype": DTYPE_NAMES.get(adapter.dtype, str(adapter.dtype)),
            "base_model": adapter.base_model,
            "peft_version": adapter.peft_version,
            "peft_config": adapter.config,
        },
        "modules": [m.to_json() for m in form.modules_info],
        "carried": carried,
        "payload_sha256": payload_sha256(tensors),
        "metrics": {**form.fit_info, **(metrics or {})},
        "command": command,
    }
    validate_manifest(manifest)
    return tensors, manifest


def write(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> int:
    """Atomically write a container; returns its size in bytes."""
    meta = {META_KEY: json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)}
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path.stat().st_size


def serialized_size(tensors: dict[str, torch.Tensor], manifest: dict) -> int:
    """Exact size the container file will have (header + payload), without writing it."""
    header: dict[str, Any] = {"__metadata__": {META_KEY: json.dumps(manifest, sort_keys=True, separators=(",", ":"))}}
    off = 0
    for name in sorted(tensors):
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    hb = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + hb + (-hb % 8) + off


class Container:
    """A container on disk, read lazily. Use :func:`open_container`."""

    def __init__(self, path: Path, manifest: dict, shapes: dict[str, tuple[tuple[int, ...], str]]):
        self.path = path
        self.manifest = manifest
        self._shapes = shapes

    # ------------------------------------------------------------- facts
    @property
    def form_name(self) -> str:
        return self.manifest["form"]

    @cached_property
    def modules(self) -> list[ModuleInfo]:
        return [ModuleInfo.from_json(m) for m in self.manifest["modules"]]

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.manifest["dtype"]]

    @property
    def carried(self) -> list[dict]:
        return self.manifest["carried"]

    @property
    def source_config(self) -> dict:
        return self.manifest["source"]["peft_config"]

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    @property
    def tensor_names(self) -> list[str]:
        return sorted(self._shapes)

    def carried_as(self, role: str) -> list[Carried]:
        return [Carried(c["key"], c["role"], c.get("module")) for c in self.carried if c["role"] == role]

    # ------------------------------------------------------------- tensors
    def tensor(self, name: str) -> torch.Tensor:
        try:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ContainerError(self.path, f"cannot read tensor {name}: {e}") from e

    def tensors(self, names=None) -> dict[str, torch.Tensor]:
        names = self.tensor_names if names is None else names
        try:
            with safe_open(self.path, framework="pt") as f:
                return {n: f.get_tensor(n) for n in names}
        except (SafetensorError, OSError) as e:
            raise ContainerError(self.path, f"cannot read tensors: {e}") from e

    def carried_tensor(self, j: int) -> torch.Tensor:
        return self.tensor(self.carried[j]["tensor"])

    def form(self) -> Form:
        """Rebuild the stored form (its factors then give ΔŴ exactly as stored)."""
        cls = get_form(self.form_name)
        config = config_from_json(cls, self.manifest["config"])
        specs = cls.tensor_specs(self.modules, config, self.manifest["state"])
        tensors = self.tensors(sorted(specs))
        form = cls.from_tensors(self.modules, config, self.manifest["state"], tensors)
        form.fit_info = dict(self.manifest.get("metrics") or {})
        form.eval()
        return form

    # ------------------------------------------------------------- checks
    def verify(self) -> dict:
        """Schema, tensor names/shapes/dtypes against the form's spec, payload hash. Raises
        ContainerError naming the first problem; returns a summary when all is well."""
        validate_manifest(self.manifest, self.path)
        m = self.manifest
        if m["format_version"] > FORMAT_VERSION:
            raise ContainerError(self.path, f"format_version {m['format_version']} is newer than this adaptzip reads ({FORMAT_VERSION}); upgrade adaptzip")
        try:
            cls = get_form(m["form"])
        except Exception as e:
            raise ContainerError(self.path, f"unknown form {m['form']!r}") from e
        config = config_from_json(cls, m["config"])
        specs = cls.tensor_specs(self.modules, config, m["state"])
        expected = {n: (tuple(s), dt) for n, (s, dt) in specs.items()}
        for c in m["carried"]:
            expected[c["tensor"]] = None  # any shape: carried verbatim
        names = set(self._shapes)
        missing = sorted(set(expected) - names)
        if missing:
            raise ContainerError(self.path, f"tensor {missing[0]} listed by the manifest is missing")
        extra = sorted(names - set(expected))
        if extra:
            raise ContainerError(self.path, f"tensor {extra[0]} is not described by the manifest")
        float_st = {"F16", "BF16", "F32"}
        want_float = _st_name(self.dtype)
        for n, spec in sorted(expected.items()):
            if spec is None:
                continue
            shape, dt = spec
            got_shape, got_dt = self._shapes[n]
            if tuple(got_shape) != shape:
                raise ContainerError(self.path, f"tensor {n} has shape {list(got_shape)} but the manifest implies {list(shape)}")
            if dt is None and (got_dt not in float_st or got_dt != want_float):
                raise ContainerError(self.path, f"tensor {n} has dtype {got_dt} but the container dtype is {want_float}")
            if dt is not None and got_dt != _st_name(dt):
                raise ContainerError(self.path, f"tensor {n} has dtype {got_dt}, expected {_st_name(dt)}")
        actual = payload_sha256(self.tensors())
        if actual != m["payload_sha256"]:
            raise ContainerError(self.path, f"payload sha256 {actual[:12]}… does not match the manifest's {m['payload_sha256'][:12]}… (corrupted or edited)")
        return {"path": str(self.path), "ok": True, "form": m["form"], "format_version": m["format_version"],
                "tensors": len(names), "bytes": self.bytes, "payload_sha256": actual}


def _st_name(dtype: torch.dtype) -> str:
    from .fileio import ST_DTYPE
    return ST_DTYPE[dtype]


def open_container(path: str | Path) -> Container:
    """Open a container, checking that it is one (its header and manifest parse)."""
    path = Path(path)
    if not path.exists():
        raise ContainerError(path, "no such file")
    if not path.is_file():
        raise ContainerError(path, "not a file (expected an adaptzip .safetensors container)")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ContainerError(path, f"not a readable safetensors file: {e}") from e
    if META_KEY not in meta:
        raise ContainerError(path, "no adaptzip manifest in the header (not an adaptzip container)")
    try:
        manifest = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise ContainerError(path, f"manifest is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ContainerError(path, "manifest format is not 'adaptzip'")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > path.stat().st_size:
        raise ContainerError(path, f"truncated: payload needs {8 + n + end} bytes, file has {path.stat().st_size}")
    validate_manifest(manifest, path)
    return Container(path, manifest, shapes)
