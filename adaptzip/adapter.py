"""Reading PEFT LoRA directories into a neutral model of the adapter.

An :class:`Adapter` knows, for every adapted module, its base-model name, layer, type, shapes,
rank, alpha and effective scale, and gives lazy access to its factors: ``A`` (r×in) and ``B``
(out×r), so that the module's update is ``ΔW = scale · B @ A`` (out×in). Tensors stay in the
memory-mapped safetensors file until asked for; nothing is held twice.

Everything in the weights file that is not a LoRA factor (``modules_to_save`` copies,
``lora_B.bias``, DoRA's ``lora_magnitude_vector``, embedding base layers saved by PEFT) is a
*carried* tensor: kept verbatim and restored on expand, with a role that says what it is.

Slightly over ~500 lines because it is the one reader of PEFT's format and enforces it whole
(dtypes, finite values, ranks, patterns, and PEFT's own target-module matching rule).
"""

from __future__ import annotations

import errno
import json
import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import AdapterError, UnsupportedAdapter
from .fileio import ST_DTYPE, ST_TORCH, check_not_truncated, file_sha256, tensor_index
from .runtime import single_thread

PREFIX = "base_model.model."
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
TORCH_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

# A layer index is the first number that follows one of these container names in a module path.
_LAYER_RE = re.compile(
    r"^(?P<stack>(?:.*?\.)?(?:layers|layer|h|blocks|block|decoder_layers|encoder_layers|transformer_blocks))\.(?P<idx>\d+)\.(?P<rest>.+)$"
)
_GENERIC_LAYER_RE = re.compile(r"^(?P<stack>(?:.*?\.)?[A-Za-z_][A-Za-z_0-9]*)\.(?P<idx>\d+)\.(?P<rest>.+)$")

_FACTOR_KEYS = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}


# PEFT config keys under which an adapter is more than "W x + scale·B A x on every token, in the
# modules its tensors name". The factors are still what adaptzip converts (`--to peft` keeps the
# key, so PEFT applies it as before); an export that cannot express it refuses it
# (:func:`runtime_features`), instead of writing an adapter or weights that behave otherwise.
RUNTIME_FEATURES = {
    "alora_invocation_tokens": "aLoRA (the update applies only after its invocation tokens)",
    "trainable_token_indices": "trainable tokens (embedding rows trained beside the LoRA)",
    "layer_replication": "layer replication (it adapts layers that PEFT first copies)",
    "use_qalora": "QA-LoRA (A reads group-pooled inputs)",
    "arrow_config": "Arrow routing (several LoRAs mixed per token)",
}


def runtime_features(config: dict) -> list[str]:
    """What of :data:`RUNTIME_FEATURES` the PEFT config sets, in words ([] for a plain LoRA)."""
    return [what for key, what in RUNTIME_FEATURES.items() if config.get(key)]


def split_layer(name: str) -> tuple[str | None, int | None, str]:
    """``model.layers.3.self_attn.q_proj`` → (``model.layers``, 3, ``self_attn.q_proj``).

    Modules without a layer index give (None, None, name)."""
    m = _LAYER_RE.match(name) or _GENERIC_LAYER_RE.match(name)
    if not m:
        return None, None, name
    return m["stack"], int(m["idx"]), m["rest"]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value of ``t`` is finite (True for integer tensors). A sum propagates any NaN
    or Inf and is several times faster than ``isfinite().all()``; only a non-finite sum (which a
    sum of huge finite values can also give) is confirmed element by element. On one torch thread:
    the tensors checked are small, and waking a second thread costs more than it saves (runtime.py)."""
    if not t.is_floating_point() or not t.numel():
        return True
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    with single_thread():
        return bool(torch.isfinite(torch.sum(t, dtype=acc))) or bool(torch.isfinite(t).all())


def pattern_key(pattern_keys, name: str) -> str | None:
    """PEFT's own rule (``peft.utils.other.get_pattern_key``): the first key that matches the end
    of the module name, as a regex, on a ``.`` boundary."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def _excluded(config: dict, name: str) -> bool:
    """PEFT's ``exclude_modules`` rule: a regex matching the whole name, or a list entry equal to
    the name or to a ``.``-separated suffix of it."""
    ex = config.get("exclude_modules")
    if not ex:
        return False
    if isinstance(ex, str):
        return re.fullmatch(ex, name) is not None
    return name in ex or any(name.endswith(f".{e}") for e in ex)


def peft_targets(config: dict, name: str, kind: str = "linear") -> bool:
    """Whether PEFT, given this LoRA config, adapts the module ``name`` (its path in the base
    model): PEFT's own rule (``peft.tuners.tuners_utils.check_target_module_exists``) —
    ``exclude_modules`` and ``modules_to_save`` win; ``target_modules`` as a string is a regex
    that must match the whole name (``all-linear``: every linear layer), as a list an entry
    equal to the name or to a ``.``-separated suffix of it; with ``layers_to_transform`` the
    module's layer index must be listed."""
    if _excluded(config, name):
        return False
    for m in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", name):
            return False
    tm = config.get("target_modules")
    if isinstance(tm, str):
        return kind == "linear" if tm == "all-linear" else re.fullmatch(tm, name) is not None
    if tm is None:
        return False
    if name in tm:
        return True
    if not any(name.endswith(f".{t}") for t in tm):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    pattern = config.get("layers_pattern")
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pat in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){pat}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match["idx"])
    return idx == layers if isinstance(layers, int) else idx in layers


@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module. ``in_features``/``out_features`` are those of the update ΔW (out×in);
    for an embedding LoRA ``in`` is the vocabulary size and ``out`` the embedding width, and its
    dense update is transposed like a Conv1D (``fan_in_fan_out``)."""

    name: str
    stack: str | None
    layer: int | None
    type: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    scale: float
    kind: str = "linear"  # "linear" | "embedding"
    fan_in_fan_out: bool = False

    @property
    def group(self) -> tuple[str | None, int | None]:
        """The layer this module belongs to (stack, index); (None, None) when it has none."""
        return (self.stack, self.layer)

    @property
    def type_key(self) -> str:
        """Module type within its stack, e.g. ``model.layers.*.self_attn.q_proj``."""
        return f"{self.stack}.*.{self.type}" if self.stack is not None else self.type

    @property
    def dense_transposed(self) -> bool:
        """True when the base weight is stored (in, out): Conv1D with fan_in_fan_out, embeddings."""
        return self.fan_in_fan_out or self.kind == "embedding"

    def to_json(self) -> dict:
        d = asdict(self)
        d["in"] = d.pop("in_features")
        d["out"] = d.pop("out_features")
        return d

    @classmethod
    def from_json(cls, d: dict) -> ModuleInfo:
        d = dict(d)
        d["in_features"] = d.pop("in")
        d["out_features"] = d.pop("out")
        return cls(**d)


@dataclass(frozen=True)
class Carried:
    """A tensor carried verbatim: its key in the PEFT weights file and what it is."""

    key: str
    role: str  # modules_to_save | lora_bias | dora_magnitude | embedding_base | other
    module: str | None = None  # the adapted module it belongs to (bias, magnitude)


def natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _role_of(key: str, module_names: set[str]) -> Carried:
    name = key.removeprefix(PREFIX)
    for suffix, role in (
        (".lora_B.bias", "lora_bias"),
        (".lora_magnitude_vector", "dora_magnitude"),
        (".lora_magnitude_vector.weight", "dora_magnitude"),
    ):
        if name.endswith(suffix):
            mod = name[: -len(suffix)]
            return Carried(key, role, mod if mod in module_names else None)
    if name.endswith(".base_layer.weight"):
        return Carried(key, "embedding_base", name[: -len(".base_layer.weight")])
    if ".modules_to_save." in name or ".original_module." in name:
        return Carried(key, "modules_to_save")
    if any(part.startswith("lora_") for part in name.split(".")):
        return Carried(key, "other")
    return Carried(key, "modules_to_save")


class Adapter:
    """A PEFT LoRA adapter on disk, read lazily. Use :func:`load_adapter`."""

    def __init__(self, path: Path, config: dict, weights_file: Path, keys: dict[str, tuple]):
        self.path = path
        self.config = config
        self.weights_file = weights_file
        self._shapes = keys  # key -> (shape, dtype)
        self._state: dict | None = None  # tensors held in memory: a .bin file's, or kept (keep_in_memory)
        self.modules: list[ModuleInfo] = []
        self.carried: list[Carried] = []
        self._keys: dict[str, tuple[str, str]] = {}  # module name -> (key A, key B)
        self._finite: set[str] = set()  # keys whose values were checked finite
        self._parse()

    # ----------------------------------------------------------------- parsing
    def _parse(self) -> None:
        cfg = self.config
        pairs: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        for key in self._shapes:
            for suffix, (kind, which) in _FACTOR_KEYS.items():
                if key.endswith(suffix):
                    name = key[: -len(suffix)]
                    name = name.removeprefix(PREFIX)
                    pairs.setdefault(name, {})[which] = key
                    kinds[name] = kind
                    break
        if not pairs:
            raise AdapterError(self.weights_file, "no LoRA tensors (lora_A/lora_B) found")
        use_rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False))
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        r_default = int(cfg.get("r", 8))
        alpha_default = float(cfg.get("lora_alpha", 8))
        for name in sorted(pairs, key=natural_key):
            p = pairs[name]
            if set(p) != {"A", "B"}:
                missing = "lora_B" if "B" not in p else "lora_A"
                raise AdapterError(self.weights_file, f"module {name} has no {missing} tensor")
            (sa, _), (sb, _) = self._shapes[p["A"]], self._shapes[p["B"]]
            if len(sa) != 2 or len(sb) != 2:
                raise UnsupportedAdapter(
                    self.weights_file, f"module {name}: {len(sa)}-D LoRA factors (convolution LoRA) are not supported"
                )
            for key in (p["A"], p["B"]):
                dt = self._shapes[key][1]
                if not dt.is_floating_point:
                    raise AdapterError(
                        self.weights_file,
                        f"tensor {key} has dtype {ST_DTYPE.get(dt, str(dt))}: LoRA factors must be floating point (F32, F16, BF16)",
                    )
            r, n_in = sa
            n_out, r_b = sb
            if r != r_b:
                raise AdapterError(self.weights_file, f"module {name}: lora_A has rank {r} but lora_B has rank {r_b}")
            if r == 0:
                raise AdapterError(
                    self.weights_file,
                    f"module {name} has rank 0 ({p['A']} is {list(sa)}): a rank-0 module carries no update; "
                    "remove it from the adapter",
                )
            rk = pattern_key(rank_pattern, name)
            r_cfg = int(rank_pattern[rk]) if rk is not None else r_default
            if r != r_cfg:
                raise AdapterError(
                    self.weights_file, f"module {name}: tensors have rank {r} but adapter_config.json says r={r_cfg}"
                )
            ak = pattern_key(alpha_pattern, name)
            alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
            scale = alpha / (r**0.5) if use_rslora else alpha / r
            stack, layer, mtype = split_layer(name)
            kind = kinds[name]
            self.modules.append(
                ModuleInfo(
                    name=name,
                    stack=stack,
                    layer=layer,
                    type=mtype,
                    in_features=int(n_in),
                    out_features=int(n_out),
                    rank=int(r),
                    alpha=alpha,
                    scale=float(scale),
                    kind=kind,
                    fan_in_fan_out=fifo and kind == "linear",
                )
            )
            self._keys[name] = (p["A"], p["B"])
        factor_keys = {k for ab in self._keys.values() for k in ab}
        names = set(self._keys)
        self.carried = [_role_of(k, names) for k in sorted(self._shapes, key=natural_key) if k not in factor_keys]
        other = [c.key for c in self.carried if c.role == "other"]
        if other:
            raise UnsupportedAdapter(
                self.weights_file, f"unrecognised LoRA tensor {other[0]} (a LoRA variant adaptzip does not know)"
            )
        if cfg.get("use_dora"):
            need = {m.name for m in self.modules}
            have = {c.module for c in self.carried if c.role == "dora_magnitude"}
            if need - have:
                raise AdapterError(
                    self.weights_file,
                    f"use_dora is set but module {min(need - have, key=natural_key)} has no lora_magnitude_vector",
                )

    # ----------------------------------------------------------------- facts
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def peft_version(self) -> str | None:
        return self.config.get("peft_version")

    @cached_property
    def bytes(self) -> int:
        """Bytes of the weights file on disk."""
        return self.weights_file.stat().st_size

    @cached_property
    def sha256(self) -> str:
        """sha256 of the weights file's bytes."""
        return file_sha256(self.weights_file)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the LoRA factors (the most common one)."""
        counts: dict[torch.dtype, int] = {}
        for a, b in self._keys.values():
            for k in (a, b):
                counts[self._shapes[k][1]] = counts.get(self._shapes[k][1], 0) + 1
        return max(counts, key=counts.get)

    @property
    def n_params(self) -> int:
        return sum(m.rank * (m.in_features + m.out_features) for m in self.modules)

    @property
    def uses_dora(self) -> bool:
        return bool(self.config.get("use_dora"))

    def module(self, name: str) -> ModuleInfo:
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(name)

    # ----------------------------------------------------------------- tensors
    def _get(self, key: str) -> torch.Tensor:
        """A tensor of the weights file; a float one is checked finite the first time it is read
        (a NaN or Inf would otherwise surface as a failed SVD deep inside a fit)."""
        if self._state is not None:
            t = self._state[key]
        else:
            try:
                with safe_open(self.weights_file, framework="pt") as f:
                    t = f.get_tensor(key)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise AdapterError(self.weights_file, f"cannot read tensor {key}: {e}") from e
        if key not in self._finite:
            if not all_finite(t):
                raise AdapterError(self.weights_file, f"tensor {key} holds non-finite values (NaN or Inf)")
            self._finite.add(key)
        return t

    def keep_in_memory(self) -> None:
        """Read the weights file once and serve every later read from memory (for work that reads
        the factors many times, e.g. zoo sharing); values are still checked finite when first used."""
        if self._state is not None:
            return
        try:
            with safe_open(self.weights_file, framework="pt") as f:
                self._state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no iterator)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise AdapterError(self.weights_file, f"cannot read its tensors: {e}") from e

    def lora_A(self, name: str) -> torch.Tensor:
        """The stored A (r×in) of a module, in its file dtype."""
        return self._get(self._keys[name][0])

    def lora_B(self, name: str) -> torch.Tensor:
        """The stored B (out×r) of a module, in its file dtype."""
        return self._get(self._keys[name][1])

    def factors(self, m: ModuleInfo | str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale·B, A) in ``dtype``: ΔW = (scale·B) @ A, out×in."""
        m = self.module(m) if isinstance(m, str) else m
        return self.lora_B(m.name).to(dtype) * m.scale, self.lora_A(m.name).to(dtype)

    def iter_factors(
        self, dtype: torch.dtype = torch.float32
    ) -> Iterator[tuple[ModuleInfo, torch.Tensor, torch.Tensor]]:
        for m in self.modules:
            B, A = self.factors(m, dtype)
            yield m, B, A

    def carried_tensor(self, key: str) -> torch.Tensor:
        return self._get(key)

    @cached_property
    def config_mismatch(self) -> dict | None:
        """Where ``adapter_config.json`` and the tensors disagree about which modules are adapted,
        by PEFT's own matching rule (``target_modules`` as a regex or a list of names/suffixes,
        ``layers_to_transform``/``layers_pattern``, ``exclude_modules``, ``modules_to_save``):
        ``in_tensors_not_in_config`` are modules with factors that PEFT, loading this adapter,
        would not adapt (their update is silently dropped); ``in_config_not_in_tensors`` are
        ``target_modules`` entries that name none of the modules with factors (PEFT gives the
        modules they match fresh factors); ``message`` says it in one line. None when they agree
        (or when the config has no ``target_modules`` to compare)."""
        tm = self.config.get("target_modules")
        if tm is None or not isinstance(tm, (str, list)):
            return None
        names = [m.name for m in self.modules]
        try:
            dropped = [m.name for m in self.modules if not peft_targets(self.config, m.name, m.kind)]
            if isinstance(tm, str):
                unused = [] if tm == "all-linear" or any(re.fullmatch(tm, n) for n in names) else [tm]
            else:
                # an entry that exclude_modules removes is not unused: PEFT writes all-linear as the
                # list of every linear name, beside the excluded ones
                unused = [
                    t
                    for t in tm
                    if not any(n == t or n.endswith(f".{t}") for n in names) and not _excluded(self.config, f"_.{t}")
                ]
        except (re.error, TypeError) as e:
            return {
                "in_config_not_in_tensors": [],
                "in_tensors_not_in_config": [],
                "message": f"adapter_config.json target_modules cannot be matched against the tensors: {e}",
            }
        if not dropped and not unused:
            return None
        parts = []
        if dropped:
            types = sorted({m.type for m in self.modules if m.name in set(dropped)})
            parts.append(
                f"{len(dropped)} of {len(names)} modules with LoRA tensors ({', '.join(types)}) are not in its "
                "target_modules: PEFT loading this adapter drops their update"
            )
        if unused:
            parts.append(f"target_modules {', '.join(map(str, unused))} match no module with LoRA tensors")
        return {
            "in_config_not_in_tensors": unused,
            "in_tensors_not_in_config": dropped,
            "message": "adapter_config.json disagrees with the weights: " + "; ".join(parts),
        }

    def summary(self) -> dict:
        return {
            "path": str(self.path),
            "base_model": self.base_model,
            "peft_version": self.peft_version,
            "weights_file": self.weights_file.name,
            "bytes": self.bytes,
            "dtype": DTYPE_NAMES.get(self.dtype, str(self.dtype)),
            "n_modules": len(self.modules),
            "n_params": self.n_params,
            "use_rslora": bool(self.config.get("use_rslora")),
            "use_dora": self.uses_dora,
            "fan_in_fan_out": bool(self.config.get("fan_in_fan_out")),
            "carried": [{"key": c.key, "role": c.role} for c in self.carried],
            "config_mismatch": self.config_mismatch,
        }


def _broken_link(p: Path) -> str | None:
    """Why ``p`` is a symbolic link that leads nowhere (a loop, or a missing target), else None."""
    if not p.is_symlink():
        return None
    try:
        p.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "is a symbolic link that loops back on itself"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops back on itself"
        return "is a symbolic link to a missing target"
    return None


def _read_config(path: Path) -> dict:
    cfg_file = path / "adapter_config.json"
    for p in (path, cfg_file):
        why = _broken_link(p)
        if why is not None:
            raise AdapterError(p, why)
    if not path.exists():
        raise AdapterError(path, "no such directory")
    if not path.is_dir():
        raise AdapterError(path, "not a directory (expected a PEFT adapter directory)")
    if not cfg_file.is_file():
        raise AdapterError(path, "no adapter_config.json (not a PEFT adapter directory)")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(cfg_file, f"invalid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise AdapterError(cfg_file, "not a JSON object")
    ptype = cfg.get("peft_type")
    if ptype != "LORA":
        raise UnsupportedAdapter(cfg_file, f"peft_type {ptype!r} is not supported (only LORA)")
    if cfg.get("target_parameters"):
        raise UnsupportedAdapter(
            cfg_file, "target_parameters (LoRA on nn.Parameter, e.g. MoE experts) is not supported"
        )
    for key in ("r", "lora_alpha"):
        if key in cfg:
            _check_number(cfg_file, key, cfg[key])
    for key in ("rank_pattern", "alpha_pattern"):
        pat = cfg.get(key)
        if pat is None:
            continue
        if not isinstance(pat, dict):
            raise AdapterError(cfg_file, f"{key} must be an object, got {pat!r}")
        for k, v in pat.items():
            try:
                re.compile(k)
            except re.error as e:
                raise AdapterError(cfg_file, f"{key} key {k!r} is not a valid regular expression: {e}") from e
            _check_number(cfg_file, f"{key}[{k!r}]", v)
    return cfg


def _check_number(cfg_file: Path, label: str, v: object) -> None:
    """A rank or alpha of the config must be a finite number (JSON as Python reads it also
    admits NaN and Infinity, which would only fail later, inside a decomposition)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise AdapterError(cfg_file, f"{label} must be a number, got {v!r}")
    if not math.isfinite(v):
        raise AdapterError(cfg_file, f"{label} must be finite, got {v!r}")


def load_adapter(path: str | Path) -> Adapter:
    """Read a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors`` or
    ``adapter_model.bin``). Raises :class:`AdapterError` with the file and cause on bad input."""
    path = Path(path)
    cfg = _read_config(path)
    st, binf = path / "adapter_model.safetensors", path / "adapter_model.bin"
    for p in (st, binf):
        why = _broken_link(p)
        if why is not None:
            raise AdapterError(p, why)
    if st.is_file():
        check_not_truncated(st, AdapterError)
        try:
            with safe_open(st, framework="pt") as f:
                keys = {k: (shape, _st_dtype(dt, st, k)) for k, (shape, dt) in tensor_index(f).items()}
        except SafetensorError as e:
            raise AdapterError(st, f"corrupt safetensors file: {e}") from e
        except OSError as e:
            raise AdapterError(st, f"cannot read: {e}") from e
        return Adapter(path, cfg, st, keys)
    if binf.is_file():
        try:
            state = torch.load(binf, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises many types here: all mean "refused"
            raise UnsupportedAdapter(
                binf, f"refused: not loadable with torch.load(weights_only=True) ({type(e).__name__})"
            ) from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterError(binf, "not a state dict of tensors")
        ad = Adapter(path, cfg, binf, {k: (tuple(v.shape), v.dtype) for k, v in state.items()})
        ad._state = state
        return ad
    raise AdapterError(path, "no adapter_model.safetensors or adapter_model.bin")


def _st_dtype(name: str, path: Path, key: str) -> torch.dtype:
    if name not in ST_TORCH:
        raise UnsupportedAdapter(path, f"tensor {key} has unsupported dtype {name}")
    return ST_TORCH[name]
