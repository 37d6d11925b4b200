"""The adaptzip container: one ``.safetensors`` file whose ``__metadata__`` holds the manifest as
a JSON string under the single key ``adaptzip`` (see formats/container.md).

Tensor names: the form's own (e.g. ``A.3``, ``B.3``; documented per form in formats/forms/)
and ``carry.{j}`` for the j-th carried tensor of the source. Floats are stored in the container
dtype; integer tensors (indices) keep their integer dtype.

The writer (:func:`build`, :func:`write`) and the reader (:class:`Container`, :func:`open_container`)
of the spec live together — longer than ~500 lines — so that both enforce one definition of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from functools import cached_property
from pathlib import Path

import jsonschema
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__, quant
from .adapter import DTYPE_NAMES, TORCH_DTYPES, Adapter, ModuleInfo
from .errors import ContainerError
from .fileio import (
    ST_DTYPE,
    atomic_file,
    check_not_truncated,
    file_sha256,
    safetensors_plan,
    safetensors_size,
    tensor_index,
)
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
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))  # no bytes copy
    return h.hexdigest()


@functools.cache
def manifest_schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


@functools.cache
def _validator():
    """One validator per process. ``jsonschema.validate`` re-checks the schema itself on every
    call (~0.2 s, several calls per compress); the shipped schema is a constant, to be checked
    once by a test (``validator_for(s).check_schema(s)``)."""
    schema = manifest_schema()
    return jsonschema.validators.validator_for(schema)(schema)


_MODULE_TYPES = {
    "name": str,
    "stack": (str, type(None)),
    "layer": (int, type(None)),
    "type": str,
    "in": int,
    "out": int,
    "rank": int,
    "alpha": (int, float),
    "scale": (int, float),
    "kind": str,
    "fan_in_fan_out": bool,
}


def _quick_validate(manifest: dict, path: Path | str | None) -> None:
    """Opening a container: the JSON Schema on everything but the module table (one entry of it),
    the other entries by keys and types — the full check costs ~0.1 s on a 7B adapter's 224-entry
    table and is what ``verify`` runs."""
    mods = manifest.get("modules")
    validate_manifest({**manifest, "modules": mods[:1] if isinstance(mods, list) else mods}, path)
    for i, m in enumerate(mods):
        if (
            not isinstance(m, dict)
            or set(m) != set(_MODULE_TYPES)
            or not all(
                isinstance(m[k], t) and not (t is int and isinstance(m[k], bool)) for k, t in _MODULE_TYPES.items()
            )
        ):
            raise ContainerError(path, f"manifest does not match the schema at modules/{i}")


def validate_manifest(manifest: dict, path: Path | str | None = None) -> None:
    e = jsonschema.exceptions.best_match(_validator().iter_errors(manifest))
    if e is not None:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        raise ContainerError(path, f"manifest does not match the schema at {where}: {e.message}")


def encode_tensors(form: Form, dtype: torch.dtype, storage: quant.Storage | None = None) -> dict[str, torch.Tensor]:
    """The form's tensors as stored: a tensor whose ``tensor_specs`` entry names a dtype gets that
    dtype (e.g. VB-LoRA's fp16 mixing weights); a float tensor listed in ``storage`` becomes its
    quantised parts (``T.q``, ``T.scale`` [, ``T.zero``]: formats/quantization.md); other floats
    the container dtype; integers unchanged."""
    specs = form.tensor_specs(form.modules_info, form.config, form.state_info)
    qt = storage.tensors if storage is not None else {}
    out = {}
    for name, t in form.tensors().items():
        t = t.detach().cpu()
        want = specs[name][1] if name in specs else None
        if name in qt:
            if want is not None or not t.is_floating_point():
                raise ContainerError(
                    None,
                    f"tensor {name} of form {form.name} is not a container-dtype float tensor and cannot be quantised",
                )
            try:
                out.update(quant.encode(name, t, qt[name], dtype))
            except quant.QuantError as e:
                raise ContainerError(None, f"cannot quantise tensor {name}: {e}") from e
            continue
        if want is not None:
            t = t.to(want)
        elif t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.contiguous()
    return out


def build(
    form: Form,
    adapter: Adapter,
    dtype: torch.dtype,
    *,
    metrics: dict | None = None,
    command: str | None = None,
    shared: dict | None = None,
    storage: quant.Storage | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and manifest of a container (nothing written).

    ``shared``: ``{"file": "_shared/<sha256>.safetensors", "sha256": ..., "tensors": [names]}``
    when some of the form's tensors live in a zoo-level shared file (formats/shared.md): those are
    left out of the container and its payload hash, and the manifest references the file.

    ``storage``: the quantisation of the form's float tensors (:mod:`adaptzip.quant`), recorded as
    the manifest's ``storage`` section (default: ``form.quant_storage``, set once chosen,
    e.g. during quantisation-aware distillation); tensors in a shared file are never quantised."""
    if storage is None:
        storage = form.quant_storage
    if storage is not None and shared is not None:
        storage = quant.Storage(
            storage.scheme,
            storage.group_size,
            {k: v for k, v in storage.tensors.items() if k not in set(shared["tensors"])},
            storage.allocation,
        )
    tensors = encode_tensors(form, dtype, storage)
    if shared is not None:
        shared = {"file": shared["file"], "sha256": shared["sha256"], "tensors": sorted(shared["tensors"])}
        for n in shared["tensors"]:
            tensors.pop(n)
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
    if shared is not None:
        manifest["shared"] = shared
    if storage is not None:
        manifest["storage"] = storage.to_json()
    validate_manifest(manifest)
    return tensors, manifest


def storage_plan(form: Form, scheme: str, group_size: int, dtype: torch.dtype) -> quant.Storage | None:
    """The storage of a form under a fixed scheme (``none``, ``int8``, ``int4``, ``int4-asym``):
    every float tensor stored in the container dtype (``tensor_specs`` dtype None) is quantised
    when that makes it smaller, grouped along ``form.quant_axis(name, shape)`` when the form
    declares one, else along the axis :func:`adaptzip.quant.choose_axis` finds best (:func:`adaptzip.quant.group_axis`)."""
    if scheme == "none":
        return None
    specs = form.tensor_specs(form.modules_info, form.config, form.state_info)
    tensors = {n: t for n, t in form.tensors().items() if n in specs and specs[n][1] is None}
    try:
        return quant.plan_uniform(tensors, scheme, group_size, dtype, form.quant_axis)
    except quant.QuantError as e:
        raise ContainerError(None, str(e)) from e


def decoded_form(form: Form, tensors: dict[str, torch.Tensor], manifest: dict) -> Form:
    """The form exactly as a reader of this (built, maybe unwritten) container rebuilds it:
    quantised tensors dequantised, other floats as cast to the container dtype. Use it to measure
    what is stored rather than what was fitted."""
    cls = type(form)
    specs = cls.tensor_specs(form.modules_info, form.config, form.state_info)
    st = quant.Storage.from_json(manifest.get("storage"))
    dtype = TORCH_DTYPES[manifest["dtype"]]
    own = form.tensors()
    dec = {}
    for n, (shape, _) in specs.items():
        if st is not None and n in st.tensors:
            dec[n] = quant.decode(n, tensors, st.tensors[n], tuple(shape), dtype)
        else:
            dec[n] = tensors[n] if n in tensors else own[n].detach()
    out = cls.from_tensors(form.modules_info, form.config, form.state_info, dec)
    out.fit_info = dict(form.fit_info)
    out.eval()
    return out


def _header_metadata(manifest: dict, allow_nan: bool = False) -> dict[str, str]:
    """The safetensors ``__metadata__`` of a container: the manifest as compact, key-sorted JSON."""
    return {META_KEY: json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=allow_nan)}


def write(path: Path, tensors: dict[str, torch.Tensor], manifest: dict) -> int:
    """Atomically write a container; returns its size in bytes."""
    meta = _header_metadata(manifest)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path.stat().st_size


def serialized_size(tensors: dict[str, torch.Tensor], manifest: dict) -> int:
    """Exact size the container file will have (header + payload), without writing it: the
    layout ``save_file`` uses (:func:`adaptzip.fileio.safetensors_plan`; offsets change digit
    counts, so the order matters)."""
    return safetensors_size(safetensors_plan(tensors), _header_metadata(manifest, allow_nan=True))


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

    @cached_property
    def storage(self) -> quant.Storage | None:
        """The manifest's quantisation section (None: every float stored in the container dtype)."""
        return quant.Storage.from_json(self.manifest.get("storage"))

    def _quant_parts(self, name: str) -> tuple[quant.TensorQuant, tuple[int, ...], list[str]]:
        """(scheme, logical shape, stored part names) of quantised logical tensor ``name``."""
        cls = get_form(self.form_name)
        specs = cls.tensor_specs(self.modules, config_from_json(cls, self.manifest["config"]), self.manifest["state"])
        if name not in specs:
            raise ContainerError(self.path, f"storage lists tensor {name}, which form {self.form_name} does not store")
        tq = self.storage.tensors[name]  # type: ignore[union-attr]
        shape = tuple(specs[name][0])
        try:
            parts = list(quant.stored_specs(name, shape, tq, self.dtype))
        except quant.QuantError as e:
            raise ContainerError(self.path, f"storage entry of tensor {name}: {e}") from e
        return tq, shape, parts

    # ------------------------------------------------------------- tensors
    def tensor(self, name: str) -> torch.Tensor:
        """One tensor: a stored one as stored, or a quantised logical one dequantised (fp32)."""
        if self.storage is not None and name in self.storage.tensors:
            return self.tensors([name])[name]
        try:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ContainerError(self.path, f"cannot read tensor {name}: {e}") from e

    def tensors(self, names=None) -> dict[str, torch.Tensor]:
        """Tensors by name (default: every tensor stored in this file); names listed in the
        manifest's ``shared`` section are read from the (hash-checked) shared file. A quantised
        logical tensor (listed in the manifest's ``storage``) comes back dequantised, fp32."""
        names = self.tensor_names if names is None else names
        st = self.storage
        if st is not None and any(n in st.tensors for n in names):
            logical = {n: self._quant_parts(n) for n in names if n in st.tensors}
            out = self.tensors([n for n in names if n not in st.tensors])
            parts = self.tensors([p for _, _, ps in logical.values() for p in ps])
            for n, (tq, shape, _) in logical.items():
                try:
                    out[n] = quant.decode(n, parts, tq, shape, self.dtype)
                except (quant.QuantError, RuntimeError) as e:
                    raise ContainerError(self.path, f"cannot dequantise tensor {n}: {e}") from e
            return out
        shared = self.shared_names
        try:
            with safe_open(self.path, framework="pt") as f:
                out = {n: f.get_tensor(n) for n in names if n not in shared}
        except (SafetensorError, OSError) as e:
            raise ContainerError(self.path, f"cannot read tensors: {e}") from e
        want = [n for n in names if n in shared]
        if want:
            path = self.shared_path
            try:
                with safe_open(path, framework="pt") as f:
                    out.update({n: f.get_tensor(n) for n in want})
            except (SafetensorError, OSError) as e:
                raise ContainerError(path, f"cannot read shared tensors: {e}") from e
        return out

    # ------------------------------------------------------------- zoo-level shared file
    @property
    def shared_names(self) -> frozenset[str]:
        """Names of the form tensors that live in the referenced shared file (empty if none)."""
        return frozenset((self.manifest.get("shared") or {}).get("tensors", ()))

    @cached_property
    def shared_path(self) -> Path | None:
        """The shared file this container references (``manifest.shared``), looked up beside the
        container and in each parent directory, and checked against its sha256; None if the
        container references none. Raises ContainerError when it is missing or altered."""
        s = self.manifest.get("shared")
        if s is None:
            return None
        if Path(s["file"]).name != f"{s['sha256']}.safetensors":
            raise ContainerError(
                self.path, f"manifest shared.file {s['file']} does not carry its sha256 {s['sha256'][:12]}… in its name"
            )
        path = find_shared(self.path, s["file"])
        if path is None:
            raise ContainerError(
                self.path,
                f"shared file {s['file']} referenced by the manifest is missing "
                "(looked beside the container and in every parent directory; keep the zoo's _shared/ folder with its containers)",
            )
        got = file_sha256(path)
        if got != s["sha256"]:
            raise ContainerError(
                path,
                f"sha256 {got[:12]}… does not match {s['sha256'][:12]}… that {self.path.name} references: the shared file was modified or corrupted",
            )
        return path

    @cached_property
    def shared_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shapes and dtypes of the tensors in the referenced shared file ({} if none)."""
        path = self.shared_path
        if path is None:
            return {}
        try:
            with safe_open(path, framework="pt") as f:
                return tensor_index(f)
        except (SafetensorError, OSError) as e:
            raise ContainerError(path, f"not a readable safetensors file: {e}") from e

    def carried_tensor(self, j: int) -> torch.Tensor:
        return self.tensor(self.carried[j]["tensor"])

    def _form_parts(self):
        cls = get_form(self.form_name)
        config = config_from_json(cls, self.manifest["config"])
        specs = cls.tensor_specs(self.modules, config, self.manifest["state"])
        return cls, config, self.tensors(sorted(specs))

    def lora_factors(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(B, A, scale) per module with ΔŴ = scale · B @ A, as a PEFT LoRA stores them: the
        stored tensors themselves when the form's tensors are LoRA factors, else the rebuilt
        form's :meth:`~adaptzip.forms.base.Form.lora_factors` (fp32)."""
        cls, config, tensors = self._form_parts()
        fast = cls.stored_lora_factors(self.modules, config, self.manifest["state"], tensors)
        if fast is not None:
            return fast
        form = self._build(cls, config, tensors)
        out = []
        with torch.no_grad():
            for i in range(len(self.modules)):
                B, A, scale = form.lora_factors(i)
                out.append((B.detach(), A.detach(), scale))
        return out

    def form(self) -> Form:
        """Rebuild the stored form (its factors then give ΔŴ exactly as stored)."""
        return self._build(*self._form_parts())

    def _build(self, cls, config, tensors) -> Form:
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
            raise ContainerError(
                self.path,
                f"format_version {m['format_version']} is newer than this adaptzip reads ({FORMAT_VERSION}); upgrade adaptzip",
            )
        try:
            cls = get_form(m["form"])
        except Exception as e:
            raise ContainerError(self.path, f"unknown form {m['form']!r}") from e
        config = config_from_json(cls, m["config"])
        specs = cls.tensor_specs(self.modules, config, m["state"])
        expected = {n: (tuple(s), dt) for n, (s, dt) in specs.items()}
        for c in m["carried"]:
            expected[c["tensor"]] = None  # any shape: carried verbatim
        st = self.storage
        for n in sorted(st.tensors if st is not None else ()):
            if n not in specs or specs[n][1] is not None:
                raise ContainerError(
                    self.path, f"storage lists tensor {n}, which is not a float tensor of form {m['form']}"
                )
            self._quant_parts(n)  # checks the entry against the form's specs
            del expected[n]  # stored as its parts: names, shapes and dtypes from the scheme
            expected.update(
                {
                    k: (tuple(s), dt)
                    for k, (s, dt) in quant.stored_specs(n, specs[n][0], st.tensors[n], self.dtype).items()
                }
            )
        shared = self.shared_names
        if shared:  # resolves and hash-checks the shared file
            both = sorted(shared & set(self._shapes))
            if both:
                raise ContainerError(
                    self.path, f"tensor {both[0]} is stored in the container and also referenced in the shared file"
                )
            gone = sorted(shared - set(self.shared_shapes))
            if gone:
                raise ContainerError(
                    self.shared_path, f"tensor {gone[0]} referenced by {self.path.name} is missing from the shared file"
                )
        names = set(self._shapes) | shared
        missing = sorted(set(expected) - names)
        if missing:
            raise ContainerError(self.path, f"tensor {missing[0]} listed by the manifest is missing")
        extra = sorted(names - set(expected))
        if extra:
            raise ContainerError(self.path, f"tensor {extra[0]} is not described by the manifest")
        float_st = {"F16", "BF16", "F32"}
        want_float = ST_DTYPE[self.dtype]
        for n, spec in sorted(expected.items()):
            if spec is None:
                continue
            shape, dt = spec
            got_shape, got_dt = self._shapes[n] if n in self._shapes else self.shared_shapes[n]
            if tuple(got_shape) != shape:
                raise ContainerError(
                    self.path, f"tensor {n} has shape {list(got_shape)} but the manifest implies {list(shape)}"
                )
            if dt is None and (got_dt not in float_st or got_dt != want_float):
                raise ContainerError(
                    self.path, f"tensor {n} has dtype {got_dt} but the container dtype is {want_float}"
                )
            if dt is not None and got_dt != ST_DTYPE[dt]:
                raise ContainerError(self.path, f"tensor {n} has dtype {got_dt}, expected {ST_DTYPE[dt]}")
        stored = self.tensors()
        for n in sorted(st.tensors if st is not None else ()):
            try:
                quant.check_parts(n, stored, st.tensors[n], tuple(specs[n][0]), self.dtype)
            except quant.QuantError as e:
                raise ContainerError(self.path, str(e)) from e
        actual = payload_sha256(stored)
        if actual != m["payload_sha256"]:
            raise ContainerError(
                self.path,
                f"payload sha256 {actual[:12]}… does not match the manifest's {m['payload_sha256'][:12]}… (corrupted or edited)",
            )
        res = {
            "path": str(self.path),
            "ok": True,
            "form": m["form"],
            "format_version": m["format_version"],
            "tensors": len(names),
            "bytes": self.bytes,
            "payload_sha256": actual,
        }
        if shared:
            res["shared"] = str(self.shared_path)
        return res


def find_shared(container: Path, rel: str) -> Path | None:
    """``rel`` (``_shared/<sha256>.safetensors``) in the container's directory or the nearest
    parent directory that has it; None when none has it."""
    for d in Path(container).absolute().parents:
        p = d / rel
        if p.is_file():
            return p
    return None


def open_container(path: str | Path) -> Container:
    """Open a container, checking that it is one (not truncated; its header and manifest parse)."""
    path = Path(path)
    if not path.exists():
        raise ContainerError(path, "no such file")
    if not path.is_file():
        raise ContainerError(path, "not a file (expected an adaptzip .safetensors container)")
    check_not_truncated(path, ContainerError)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = tensor_index(f)
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
    _quick_validate(manifest, path)
    return Container(path, manifest, shapes)
