"""The adaptzip container: one ``.safetensors`` file whose ``__metadata__`` holds the manifest as
a JSON string under the single key ``adaptzip`` (see formats/container.md).

Tensor names: the form's own (e.g. ``A.3``, ``B.3``; documented per form in formats/forms/)
and ``carry.{j}`` for the j-th carried tensor of the source. Floats are stored in the container
dtype; integer tensors (indices) keep their integer dtype.

The writer (:func:`build`, :func:`write`) and the reader (:class:`Container`, :func:`open_container`)
of the spec live together — longer than ~500 lines — so that both enforce one definition of it.
The reader checks every invariant of formats/container.md §6 before any byte is used:
:func:`open_container` the header and the manifest (:func:`check_manifest`), and
:meth:`Container.load` — the one method that reads tensor bytes, behind every other accessor —
the tensors (specs, the payload hash taken while reading, finite values, quantised parts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from . import __version__, quant
from .adapter import DTYPE_NAMES, TORCH_DTYPES, Adapter, ModuleInfo, all_finite, natural_key, pattern_key
from .errors import AdaptzipError, ContainerError, OptionError
from .fileio import (
    ST_DTYPE,
    ST_TORCH,
    atomic_file,
    check_not_truncated,
    file_sha256,
    json_clean,
    safetensors_plan,
    safetensors_size,
    tensor_index,
)
from .forms.base import REGISTRY, Form, TensorSpecs, config_from_json, config_to_json, get_form
from .runtime import single_thread

FORMAT = "adaptzip"
FORMAT_VERSION = 1
META_KEY = "adaptzip"
#: The shared file's metadata key (formats/shared.md §3).
SHARED_META_KEY = "adaptzip_shared"
#: ``manifest.modules`` when the module table lives in the shared file (formats/shared.md §1).
TABLE_IN_SHARED = "shared"
SCHEMA_FILE = Path(__file__).resolve().parent / "manifest.schema.json"


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over tensors in name order: name, dtype, shape, then the raw little-endian bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(_hash_line(name, t.dtype, t.shape))
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


def validate_manifest(manifest: dict, path: Path | str | None = None) -> None:
    """The JSON Schema (formats/manifest.schema.json), all of it: ContainerError at the best match."""
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
    left out of the container and its payload hash, and the manifest references the file. With
    ``"modules": True`` in it, the module table is left to the shared file too (it MUST hold the
    form's table) and ``manifest.modules`` is ``"shared"``.

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
    table = [m.to_json() for m in form.modules_info]
    table_in_shared = shared is not None and bool(shared.get("modules"))
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
        "modules": TABLE_IN_SHARED if table_in_shared else table,
        "carried": carried,
        "payload_sha256": payload_sha256(tensors),
        "metrics": {**form.fit_info, **(metrics or {})},
        "command": command,
    }
    if shared is not None:
        manifest["shared"] = shared
    if storage is not None:
        manifest["storage"] = storage.to_json()
    check_manifest(manifest, table=table)
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


# ----------------------------------------------------------------------------- reading
def check_manifest(manifest: dict, path: Path | str | None = None, table: list | None = None) -> None:
    """The checks of a manifest on its own (formats/container.md §6, invariants 4–8):
    ``format_version`` (first: a newer version may follow another schema), the JSON Schema (the
    one cached validator), then the module table against the source config and the carried list.
    ``table``: the module table when ``manifest.modules`` is ``"shared"`` (read from the shared
    file). Raises :class:`ContainerError` naming ``path`` and the first problem."""
    _check_version_and_schema(manifest, path)
    if manifest["modules"] == TABLE_IN_SHARED:
        if "shared" not in manifest:
            raise ContainerError(path, 'manifest modules is "shared" but the manifest references no shared file')
        if table is None:
            raise ContainerError(path, 'manifest modules is "shared": the module table must come from the shared file')
        validate_manifest({**manifest, "modules": table}, path)
    _check_module_table(manifest, path, table if manifest["modules"] == TABLE_IN_SHARED else manifest["modules"])


def _check_version_and_schema(manifest: dict, path: Path | str | None) -> None:
    fv = manifest.get("format_version")
    if isinstance(fv, int) and not isinstance(fv, bool) and fv > FORMAT_VERSION:
        raise ContainerError(
            path, f"format_version {fv} is newer than this adaptzip reads ({FORMAT_VERSION}); upgrade adaptzip"
        )
    validate_manifest(manifest, path)


def _check_module_table(manifest: dict, path: Path | str | None, table: list) -> None:
    """Module names unique and in natural order; each module's rank and alpha those the source's
    ``adapter_config.json`` gives it (PEFT's rule, as the adapter reader applies it), its scale
    α/r (α/√r with rsLoRA) and its ``fan_in_fan_out`` the config's (linear layers only): an edited
    rank, alpha, scale or orientation is refused. Each carried tensor is
    ``carry.{j}``, and a bias or DoRA magnitude names a module of the table."""
    cfg = manifest["source"]["peft_config"]
    rp, ap = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    try:
        if not isinstance(rp, dict) or not isinstance(ap, dict):
            raise TypeError("rank_pattern and alpha_pattern must be objects")
        r_default, a_default = int(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    except (TypeError, ValueError) as e:
        raise ContainerError(path, f"source.peft_config cannot give the modules their ranks: {e}") from e
    rslora, fifo = bool(cfg.get("use_rslora", False)), bool(cfg.get("fan_in_fan_out", False))
    prev: str | None = None
    names: set[str] = set()
    for i, m in enumerate(table):
        name = m["name"]
        if name in names or (prev is not None and natural_key(name) < natural_key(prev)):
            raise ContainerError(
                path, f"modules/{i} {name} comes after {prev}: module names must be unique and in natural order"
            )
        prev = name
        names.add(name)
        try:
            rk, ak = pattern_key(rp, name), pattern_key(ap, name)
            r_cfg = int(rp[rk]) if rk is not None else r_default
            a_cfg = float(ap[ak]) if ak is not None else a_default
        except (re.error, TypeError, ValueError) as e:
            raise ContainerError(path, f"source.peft_config rank_pattern/alpha_pattern fail on {name}: {e}") from e
        r, alpha = m["rank"], m["alpha"]
        if r != r_cfg:
            raise ContainerError(
                path, f"modules/{i} ({name}) has rank {r} but the source's adapter_config.json gives it r={r_cfg}"
            )
        if not math.isclose(alpha, a_cfg, rel_tol=1e-9, abs_tol=1e-12):
            raise ContainerError(
                path,
                f"modules/{i} ({name}) has alpha {alpha} but the source's adapter_config.json gives it lora_alpha={a_cfg}",
            )
        want = alpha / math.sqrt(r) if rslora else alpha / r
        if not math.isclose(m["scale"], want, rel_tol=1e-9, abs_tol=1e-12):
            rule = "alpha/sqrt(rank) (use_rslora)" if rslora else "alpha/rank"
            raise ContainerError(path, f"modules/{i} ({name}) has scale {m['scale']} but {rule} is {want}")
        if m["fan_in_fan_out"] != (fifo and m["kind"] == "linear"):
            raise ContainerError(
                path,
                f"modules/{i} ({name}) has fan_in_fan_out {str(m['fan_in_fan_out']).lower()} but the source's "
                f"adapter_config.json gives its {m['kind']} layer {str(fifo and m['kind'] == 'linear').lower()}",
            )
    for j, c in enumerate(manifest["carried"]):
        if c["tensor"] != f"carry.{j}":
            raise ContainerError(path, f"carried/{j} names tensor {c['tensor']}, expected carry.{j}")
        if c["role"] in ("lora_bias", "dora_magnitude") and c["module"] not in names:
            raise ContainerError(
                path,
                f"carried/{j} ({c['role']} {c['key']}) belongs to module {c['module']}, which is not in the module table",
            )


def _hash_line(name: str, dtype: torch.dtype, shape) -> bytes:
    """The name line a tensor contributes to the payload hash (formats/container.md §5)."""
    return f"{name}\0{str(dtype).removeprefix('torch.')}\0{list(shape)}\0".encode()


class Container:
    """A container on disk. Use :func:`open_container`, which checks the header and the manifest.

    Every tensor comes through :meth:`load`, the one reader of tensor bytes: it checks the tensor
    names, shapes and dtypes against the form's ``tensor_specs``, reads every stored tensor once
    while hashing it (the payload hash, and the shared file's sha256), checks that every float is
    finite, that quantised parts are consistent and that the form accepts the values (e.g. VB-LoRA's
    index range), and caches the result. :meth:`tensors`,
    :meth:`tensor`, :meth:`carried_tensor`, :meth:`lora_factors`, :meth:`form` and :meth:`verify`
    all read from it, so no exporter can use a byte that was not checked."""

    def __init__(self, path: Path, manifest: dict, shapes: dict[str, tuple[tuple[int, ...], str]]):
        self.path = path
        self.manifest = manifest
        self._shapes = shapes
        self._loaded: dict[str, torch.Tensor] | None = None
        self._shared_checked: Path | None = None

    # ------------------------------------------------------------- facts
    @property
    def form_name(self) -> str:
        return self.manifest["form"]

    @cached_property
    def form_class(self) -> type[Form]:
        """The registered form of this container (ContainerError naming the file when unknown)."""
        try:
            return get_form(self.form_name)
        except OptionError as e:
            raise ContainerError(
                self.path,
                f"unknown form {self.form_name!r} (this adaptzip reads {', '.join(sorted(REGISTRY))}; "
                "a newer adaptzip may read it)",
            ) from e

    @cached_property
    def config(self) -> Any:
        """The form's Config decoded from the manifest's ``config``."""
        cls = self.form_class
        try:
            return config_from_json(cls, self.manifest["config"])
        except AdaptzipError as e:
            raise ContainerError(self.path, f"config does not fit form {self.form_name}: {e.cause}") from e
        except (TypeError, ValueError) as e:
            raise ContainerError(self.path, f"config does not fit form {self.form_name}: {e}") from e

    @cached_property
    def specs(self) -> TensorSpecs:
        """Names, shapes and dtypes of the form's logical tensors (``tensor_specs``)."""
        cls, config = self.form_class, self.config
        try:
            return cls.tensor_specs(self.modules, config, self.manifest["state"])
        except AdaptzipError as e:
            raise ContainerError(self.path, f"state does not fit form {self.form_name}: {e.cause}") from e
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ContainerError(self.path, f"state does not fit form {self.form_name}: {e!r}") from e

    @cached_property
    def modules(self) -> list[ModuleInfo]:
        return [ModuleInfo.from_json(m) for m in self.module_table]

    @property
    def table_in_shared(self) -> bool:
        """The module table lives in the shared file (``manifest.modules`` is ``"shared"``)."""
        return self.manifest["modules"] == TABLE_IN_SHARED

    @cached_property
    def module_table(self) -> list[dict]:
        """The module table (JSON objects): the manifest's, or the shared file's (its sha256
        checked first) when ``manifest.modules`` is ``"shared"``."""
        if not self.table_in_shared:
            return self.manifest["modules"]
        path = self.shared_path
        if path is None:
            raise ContainerError(self.path, 'manifest modules is "shared" but the manifest references no shared file')
        try:
            with safe_open(path, framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get(SHARED_META_KEY, "null"))
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise ContainerError(path, f"cannot read the shared file's metadata: {e}") from e
        table = meta.get("modules") if isinstance(meta, dict) else None
        if not isinstance(table, list):
            raise ContainerError(
                path, f'holds no module table, which {self.path.name} takes from it (its manifest modules is "shared")'
            )
        return table

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
        """Names of the tensors stored in this file (quantised ones as their parts)."""
        return sorted(self._shapes)

    def stored_shape(self, name: str) -> tuple[int, ...]:
        """The shape of a tensor stored in this file or in its shared file, from the headers."""
        if name in self._shapes:
            return tuple(self._shapes[name][0])
        if name in self.shared_names:
            return tuple(self.shared_shapes[name][0])
        raise ContainerError(self.path, f"no tensor {name} in this container")

    @cached_property
    def storage(self) -> quant.Storage | None:
        """The manifest's quantisation section (None: every float stored in the container dtype)."""
        return quant.Storage.from_json(self.manifest.get("storage"))

    def _quant_parts(self, name: str) -> tuple[quant.TensorQuant, tuple[int, ...], list[str]]:
        """(scheme, logical shape, stored part names) of quantised logical tensor ``name``."""
        specs = self.specs
        if name not in specs or specs[name][1] is not None:
            raise ContainerError(
                self.path, f"storage lists tensor {name}, which is not a float tensor of form {self.form_name}"
            )
        tq = self.storage.tensors[name]  # type: ignore[union-attr]
        shape = tuple(specs[name][0])
        try:
            parts = list(quant.stored_specs(name, shape, tq, self.dtype))
        except quant.QuantError as e:
            raise ContainerError(self.path, f"storage entry of tensor {name}: {e}") from e
        return tq, shape, parts

    # ------------------------------------------------------------- the one reader
    def load(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by its stored name (this file's, and the shared file's for names
        in ``shared.tensors``), checked (see the class docstring) and cached. Raises
        ContainerError naming the file and the first broken invariant. The tensors are shared
        with later calls: do not modify them in place."""
        if self._loaded is None:
            self._check_layout()
            out, bad = self._read_own()
            if bad is not None:
                raise ContainerError(self.path, f"tensor {bad} holds non-finite values (NaN or Inf)")
            shared = self._read_shared()
            bad = next((n for n in sorted(shared) if not all_finite(shared[n])), None)
            if bad is not None:
                raise ContainerError(self._find_shared(), f"tensor {bad} holds non-finite values (NaN or Inf)")
            out.update(shared)
            st = self.storage
            for n in sorted(st.tensors if st is not None else ()):
                try:
                    quant.check_parts(n, out, st.tensors[n], tuple(self.specs[n][0]), self.dtype)
                except quant.QuantError as e:
                    raise ContainerError(self.path, str(e)) from e
            self._loaded = out
            try:
                self._check_form()
            except BaseException:
                self._loaded = None
                raise
        return self._loaded

    def _check_form(self) -> None:
        """The form's own rules for its values (formats/forms/, e.g. VB-LoRA's top-k indices
        within the bank): the form is rebuilt from the checked tensors once, and discarded. A
        form whose stored tensors are its LoRA factors (``stored_lora_factors``) has no rule
        beyond the names, shapes, dtypes and finite values already checked, and is not rebuilt."""
        tensors = self.tensors(sorted(self.specs))
        cls = self.form_class
        if cls.stored_lora_factors(self.modules, self.config, self.manifest["state"], tensors) is not None:
            self._build(tensors)  # the form only wraps its factors (no copy needed): checks its state
            return
        with single_thread(), torch.no_grad():  # many small casts: one thread is fastest (runtime.py)
            self._build({k: v.clone() for k, v in tensors.items()})

    def release(self) -> None:
        """Forget the loaded tensors (a later read loads and checks them again)."""
        self._loaded = None

    def _expected(self) -> dict[str, tuple[tuple[int, ...], torch.dtype | None] | None]:
        """Every stored name the manifest implies → (shape, fixed dtype or None for the container
        dtype), or None for a carried tensor (any shape and dtype)."""
        specs = self.specs
        expected: dict = {n: (tuple(s), dt) for n, (s, dt) in specs.items()}
        for c in self.carried:
            expected[c["tensor"]] = None
        st = self.storage
        for n in sorted(st.tensors if st is not None else ()):
            tq, shape, _ = self._quant_parts(n)
            del expected[n]  # stored as its parts: names, shapes and dtypes from the scheme
            expected.update({k: (tuple(s), dt) for k, (s, dt) in quant.stored_specs(n, shape, tq, self.dtype).items()})
        return expected

    def _check_layout(self) -> None:
        """Invariants 10–17 of formats/container.md §6, from the headers alone (no tensor read)."""
        expected = self._expected()
        shared = self.shared_names
        if shared:
            both = sorted(shared & set(self._shapes))
            if both:
                raise ContainerError(
                    self.path, f"tensor {both[0]} is stored in the container and also referenced in the shared file"
                )
            gone = sorted(shared - set(self.shared_shapes))
            if gone:
                raise ContainerError(
                    self._find_shared(),
                    f"tensor {gone[0]} referenced by {self.path.name} is missing from the shared file",
                )
            if shared & set(self.storage.tensors if self.storage is not None else ()):
                n = sorted(shared & set(self.storage.tensors))[0]  # type: ignore[union-attr]
                raise ContainerError(self.path, f"storage lists tensor {n}, which lives in the shared file")
        names = set(self._shapes) | shared
        missing = sorted(set(expected) - names)
        if missing:
            raise ContainerError(self.path, f"tensor {missing[0]} listed by the manifest is missing")
        extra = sorted(names - set(expected))
        if extra:
            raise ContainerError(self.path, f"tensor {extra[0]} is not described by the manifest")
        want_float = ST_DTYPE[self.dtype]
        for n, spec in sorted(expected.items()):
            where = self.path if n in self._shapes else self._find_shared()
            got_shape, got_dt = self._shapes[n] if n in self._shapes else self.shared_shapes[n]
            if got_dt not in ST_TORCH:
                raise ContainerError(where, f"tensor {n} has dtype {got_dt}, which adaptzip does not read")
            if spec is None:
                continue
            shape, dt = spec
            if tuple(got_shape) != shape:
                raise ContainerError(
                    where, f"tensor {n} has shape {list(got_shape)} but the manifest implies {list(shape)}"
                )
            if dt is None and got_dt != want_float:
                raise ContainerError(where, f"tensor {n} has dtype {got_dt} but the container dtype is {want_float}")
            if dt is not None and got_dt != ST_DTYPE[dt]:
                raise ContainerError(where, f"tensor {n} has dtype {got_dt}, expected {ST_DTYPE[dt]}")

    def _read_own(self) -> tuple[dict[str, torch.Tensor], str | None]:
        """Every tensor of this file, each read once into memory of its own and hashed as it is
        read, in name order (formats/container.md §5). Returns the tensors and the first one that
        is not finite (None if all are), once the hash matched: a corrupted file is named as such."""
        h = hashlib.sha256()
        out: dict[str, torch.Tensor] = {}
        try:
            with open(self.path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
                names = sorted(k for k in header if k != "__metadata__")
                if set(names) != set(self._shapes):
                    raise ContainerError(self.path, "the file changed while it was being read")
                for name in names:
                    info = header[name]
                    dt, shape = ST_TORCH[info["dtype"]], tuple(info["shape"])
                    if (shape, info["dtype"]) != (tuple(self._shapes[name][0]), self._shapes[name][1]):
                        raise ContainerError(self.path, "the file changed while it was being read")
                    begin, end = info["data_offsets"]
                    h.update(_hash_line(name, dt, shape))
                    buf = torch.empty(end - begin, dtype=torch.uint8)
                    if end > begin:
                        f.seek(8 + n + begin)
                        view = memoryview(buf.numpy())
                        if f.readinto(view) != end - begin:
                            raise ContainerError(self.path, f"truncated safetensors file: tensor {name} is cut short")
                        h.update(view)
                    out[name] = buf.view(dt).reshape(shape)
        except OSError as e:
            raise ContainerError(self.path, f"cannot read tensors: {e}") from e
        actual, want = h.hexdigest(), self.manifest["payload_sha256"]
        if actual != want:
            raise ContainerError(
                self.path,
                f"payload sha256 {actual[:12]}… does not match the manifest's {want[:12]}… (corrupted or edited)",
            )
        with single_thread():  # hundreds of small reductions: one thread is fastest (runtime.py)
            return out, next((k for k in names if not all_finite(out[k])), None)

    def _read_shared(self) -> dict[str, torch.Tensor]:
        """The tensors this container takes from its shared file, read in one pass that also
        checks the file's sha256 (formats/shared.md)."""
        want = sorted(self.shared_names)
        if not want:
            return {}
        path = self._find_shared()
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ContainerError(path, f"cannot read: {e}") from e
        self._check_shared_sha(path, hashlib.sha256(data).hexdigest())
        try:
            ts = load_safetensors_bytes(data)
        except (SafetensorError, ValueError) as e:
            raise ContainerError(path, f"not a readable safetensors file: {e}") from e
        self._shared_checked = path
        return {n: ts[n] for n in want}

    # ------------------------------------------------------------- tensors
    def tensors(self, names=None) -> dict[str, torch.Tensor]:
        """Checked tensors by name (default: every tensor stored in this file); names listed in
        the manifest's ``shared`` section come from the (hash-checked) shared file. A quantised
        logical tensor (listed in the manifest's ``storage``) comes back dequantised, fp32.
        Do not modify the returned tensors in place (they are cached)."""
        loaded = self.load()
        names = self.tensor_names if names is None else list(names)
        st = self.storage
        out = {}
        for n in names:
            if st is not None and n in st.tensors:
                tq, shape, _ = self._quant_parts(n)
                try:
                    out[n] = quant.decode(n, loaded, tq, shape, self.dtype)
                except (quant.QuantError, RuntimeError) as e:
                    raise ContainerError(self.path, f"cannot dequantise tensor {n}: {e}") from e
            elif n in loaded:
                out[n] = loaded[n]
            else:
                raise ContainerError(self.path, f"no tensor {n} in this container")
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """One checked tensor: a stored one as stored, or a quantised logical one dequantised (fp32)."""
        return self.tensors([name])[name]

    def carried_tensor(self, j: int) -> torch.Tensor:
        return self.tensor(self.carried[j]["tensor"])

    # ------------------------------------------------------------- zoo-level shared file
    @property
    def shared_names(self) -> frozenset[str]:
        """Names of the form tensors that live in the referenced shared file (empty if none)."""
        return frozenset((self.manifest.get("shared") or {}).get("tensors", ()))

    def _find_shared(self) -> Path | None:
        """The shared file this container references, looked up beside the container and in each
        parent directory (its hash not checked here); None if the container references none."""
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
        return path

    def _check_shared_sha(self, path: Path, got: str) -> None:
        want = self.manifest["shared"]["sha256"]
        if got != want:
            raise ContainerError(
                path,
                f"sha256 {got[:12]}… does not match {want[:12]}… that {self.path.name} references: the shared file was modified or corrupted",
            )

    @cached_property
    def shared_path(self) -> Path | None:
        """The shared file this container references (``manifest.shared``), checked against its
        sha256; None if the container references none. Raises ContainerError when it is missing
        or altered."""
        path = self._find_shared()
        if path is not None and path != self._shared_checked:
            self._check_shared_sha(path, file_sha256(path))
        return path

    @cached_property
    def shared_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Shapes and dtypes of the tensors in the referenced shared file ({} if none), from its header."""
        path = self._find_shared()
        if path is None:
            return {}
        check_not_truncated(path, ContainerError)
        try:
            with safe_open(path, framework="pt") as f:
                return tensor_index(f)
        except (SafetensorError, OSError) as e:
            raise ContainerError(path, f"not a readable safetensors file: {e}") from e

    # ------------------------------------------------------------- the form
    def lora_factors(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(B, A, scale) per module with ΔŴ = scale · B @ A, as a PEFT LoRA stores them: the
        stored tensors themselves when the form's tensors are LoRA factors, else the rebuilt
        form's :meth:`~adaptzip.forms.base.Form.lora_factors` (fp32)."""
        tensors = self.tensors(sorted(self.specs))
        fast = self.form_class.stored_lora_factors(self.modules, self.config, self.manifest["state"], tensors)
        if fast is not None:
            return fast
        form = self._build(tensors)
        out = []
        with torch.no_grad():
            for i in range(len(self.modules)):
                B, A, scale = form.lora_factors(i)
                out.append((B.detach(), A.detach(), scale))
        return out

    def form(self) -> Form:
        """Rebuild the stored form (its factors then give ΔŴ exactly as stored); its parameters
        are copies, free to change."""
        return self._build({k: v.clone() for k, v in self.tensors(sorted(self.specs)).items()})

    def _build(self, tensors: dict[str, torch.Tensor]) -> Form:
        try:
            form = self.form_class.from_tensors(self.modules, self.config, self.manifest["state"], tensors)
        except AdaptzipError as e:
            raise ContainerError(self.path, e.cause) from e
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise ContainerError(self.path, f"cannot rebuild form {self.form_name} from its tensors: {e}") from e
        state, stored = json.loads(json.dumps(json_clean(form.state_info))), self.manifest["state"]
        if state != stored:  # a redundant or unknown entry that the tensors contradict (formats rule 22)
            k = next(k for k in sorted(set(state) | set(stored)) if state.get(k) != stored.get(k))
            raise ContainerError(
                self.path,
                f"state does not fit form {self.form_name}: {k} is {stored.get(k, 'absent')!r}, "
                f"its tensors give {state.get(k, 'absent')!r}",
            )
        form.fit_info = dict(self.manifest.get("metrics") or {})
        form.eval()
        return form

    # ------------------------------------------------------------- checks
    def verify(self) -> dict:
        """Every invariant of formats/container.md §6: the manifest (checked on opening), the
        tensors (:meth:`load`: names, shapes, dtypes, payload hash, finite values, quantised
        parts, the shared file, the form's own value rules). Raises ContainerError naming the
        first problem; returns a summary when all is well."""
        self.load()
        m = self.manifest
        res = {
            "path": str(self.path),
            "ok": True,
            "form": m["form"],
            "format_version": m["format_version"],
            "tensors": len(set(self._shapes) | self.shared_names),
            "bytes": self.bytes,
            "payload_sha256": m["payload_sha256"],
        }
        if self.shared_names:
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
    """Open a container, checking its header and manifest: a complete safetensors file, the
    manifest (format, version, schema, module table) and a form this adaptzip knows whose config
    and state it can decode. Tensors are checked when first read (:meth:`Container.load`)."""
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
    c = Container(path, manifest, shapes)
    if manifest.get("modules") == TABLE_IN_SHARED:
        _check_version_and_schema(manifest, path)  # the shared reference is well formed before it is followed
        check_manifest(manifest, path, table=c.module_table)
    else:
        check_manifest(manifest, path)
    c.specs  # noqa: B018  (the form is known and its config and state decode)
    return c
