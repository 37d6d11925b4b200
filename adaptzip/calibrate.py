"""Calibration inputs: text, the base model (+ the source LoRA as teacher), Σ statistics.

* :func:`read_texts` — a UTF-8 text file (one document per blank-line-separated paragraph; empty
  lines skipped) or JSONL with a ``text`` field; bad input raises :class:`CalibrationError`.
* :func:`load_base` — a local model directory (safetensors) or a local ``.gguf`` file
  (transformers' ``gguf_file=`` loading, which needs the ``gguf`` package), with its tokenizer;
  :func:`check_base` refuses a base that lacks an adapted module or has another shape, naming it.
* :func:`teacher_model` — ``PeftModel.from_pretrained`` of the source directory on the base, and
  :class:`Modes` to switch one loaded model between *teacher* (base + source LoRA), *base* (no
  adapter) and *student* (base + a :class:`~adaptzip.forms.base.Form` live, see :mod:`.distill`).
* :class:`SigmaHooks` — forward hooks accumulating Σ_m = E[x xᵀ] (in×in, fp32, streamed) of
  every adapted module's input, keyed by ``ModuleInfo.name``; :func:`save_stats` /
  :func:`load_stats` store them in a safetensors file (modules that see the same input tensor,
  e.g. q/k/v, share one stored matrix).

The distillation and the metrics live in :mod:`adaptzip.distill`. (Slightly over ~500 lines: the
four parts are the base-model side of calibration and share its loading and hooks.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import Adapter, ModuleInfo
from .errors import BaseModelError, CalibrationError
from .fileio import atomic_file
from .progress import quiet_third_party

Tensor = torch.Tensor
STATS_FORMAT = "adaptzip-stats"
# Embedding Σ is diag(token frequencies), stored dense (vocab×vocab) only up to this vocabulary.
MAX_EMBED_SIGMA_VOCAB = 16384


# --------------------------------------------------------------------------------------- text
def read_texts(path: str | Path) -> list[str]:
    """Documents of a calibration text file.

    ``.jsonl`` (or a file whose first non-blank line starts with ``{``): one JSON object per line
    with a string ``text`` field. Otherwise plain UTF-8 text: documents are separated by blank
    lines; lines are stripped and empty lines skipped. Raises CalibrationError (with the line or
    byte offset) for a missing file, invalid UTF-8, bad JSON or no text at all."""
    path = Path(path)
    if path.is_dir():
        raise CalibrationError(path, "is a folder (expected a UTF-8 text file or JSONL with a 'text' field)")
    if not path.is_file():
        raise CalibrationError(path, "no such file (expected a UTF-8 text file or JSONL with a 'text' field)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CalibrationError(path, f"cannot read: {(e.strerror or str(e)).lower()}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise CalibrationError(
            path, f"invalid UTF-8 at byte {e.start} (line {line}): calibration text must be UTF-8"
        ) from e
    text = text.lstrip("\ufeff")
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    docs: list[str] = []
    if path.suffix.lower() == ".jsonl" or first.startswith("{"):
        for no, ln in enumerate(text.splitlines(), 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except json.JSONDecodeError as e:
                raise CalibrationError(path, f"line {no}: invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise CalibrationError(path, f"line {no}: expected an object with a string 'text' field")
            if obj["text"].strip():
                docs.append(obj["text"].strip())
    else:
        cur: list[str] = []
        for ln in text.splitlines():
            if ln.strip():
                cur.append(ln.strip())
            elif cur:
                docs.append("\n".join(cur))
                cur = []
        if cur:
            docs.append("\n".join(cur))
    if not docs:
        raise CalibrationError(path, "contains no text (only empty lines)")
    return docs


def tokenize_stream(tokenizer, docs: Sequence[str]) -> list[int]:
    """All documents as one token stream, each followed by EOS when the tokenizer has one."""
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for d in docs:
        out.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            out.append(int(eos))
    return out


def pack(ids: Sequence[int], seq_len: int, n_tokens: int | None, path: Path | str | None, what: str) -> Tensor:
    """The first ``n_tokens`` tokens (all when None) as rows of ``seq_len``: (N, seq_len) int64.
    Raises CalibrationError when there are fewer tokens than asked (or than one row)."""
    if n_tokens is not None and len(ids) < n_tokens:
        raise CalibrationError(
            path,
            f"{what} has {len(ids)} tokens, fewer than the {n_tokens} asked "
            f"(give more text or a smaller --calib-tokens)",
        )
    n = len(ids) if n_tokens is None else n_tokens
    rows = n // seq_len
    if rows < 1:
        raise CalibrationError(path, f"{what} has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(list(ids[: rows * seq_len]), dtype=torch.long).view(rows, seq_len)  # (N, T)


def encoder_rows(
    tokenizer, docs: Sequence[str], seq_len: int, n_tokens: int | None, path, what: str
) -> tuple[Tensor, Tensor]:
    """Encoder inputs: every document cut into chunks wrapped in the tokenizer's special tokens
    ([CLS] … [SEP]), ``seq_len`` tokens at most, and padded: (ids, attention_mask), both (N, T)."""
    rows: list[list[int]] = []
    total = 0
    prefix, suffix = _special_wrap(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    for d in docs:
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        for j in range(0, len(ids), body):
            chunk = prefix + ids[j : j + body] + suffix
            rows.append(chunk)
            total += len(chunk)
            if n_tokens is not None and total >= n_tokens:
                break
        if n_tokens is not None and total >= n_tokens:
            break
    if n_tokens is not None and total < n_tokens:
        raise CalibrationError(
            path,
            f"{what} has {total} tokens, fewer than the {n_tokens} asked (give more text or a smaller --calib-tokens)",
        )
    if not rows:
        raise CalibrationError(path, f"{what} has no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids_t = torch.full((len(rows), seq_len), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for i, r in enumerate(rows):
        ids_t[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids_t, mask


def _special_wrap(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (BERT: [CLS] … [SEP])."""
    sp = list(tokenizer("", add_special_tokens=True)["input_ids"])
    front = {tokenizer.cls_token_id, tokenizer.bos_token_id} - {None}
    k = 0
    while k < len(sp) and sp[k] in front:
        k += 1
    if len(sp) == 2 and k == 0:
        k = 1
    return sp[:k], sp[k:]


# --------------------------------------------------------------------------------------- base
@dataclass
class Base:
    """A loaded base model with the source LoRA attached (a ``PeftModel``), its tokenizer and
    what it computes: ``task`` is ``lm`` (next-token distributions), ``cls`` (an encoder or
    decoder with a sequence-classification head carried by the adapter) or ``hidden`` (final
    hidden states only)."""

    path: Path
    model: nn.Module  # PeftModel
    tokenizer: object
    task: str
    device: torch.device
    layers: dict[str, nn.Module]  # ModuleInfo.name -> PEFT LoRA layer wrapping the base module

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0]) if self.task == "lm" else 0


def resolve_device(device: str | None) -> torch.device:
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:n]``."""
    d = (device or "auto").lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d.startswith("cuda") and not torch.cuda.is_available():
        raise CalibrationError(None, f"--device {device}: CUDA is not available on this machine")
    if d != "cpu" and not d.startswith("cuda"):
        raise CalibrationError(None, f"--device {device!r}: expected auto, cpu or cuda")
    return torch.device(d)


def _model_location(base: Path) -> tuple[Path, dict]:
    if base.is_file():
        if base.suffix.lower() != ".gguf":
            raise BaseModelError(base, "not a model directory or a .gguf file")
        try:
            import gguf  # noqa: F401
        except ImportError as e:
            raise BaseModelError(base, "loading a GGUF base needs the 'gguf' package (pip install gguf)") from e
        return base.parent, {"gguf_file": base.name}
    if not base.exists():
        raise BaseModelError(base, "no such file or directory")
    if not (base / "config.json").is_file():
        raise BaseModelError(base, "no config.json (expected a transformers model directory or a .gguf file)")
    return base, {}


def _num_labels(adapter: Adapter) -> int | None:
    """Output size of the classifier head the adapter carries in modules_to_save."""
    n = None
    for c in adapter.carried:
        if c.role == "modules_to_save" and c.key.endswith(".weight"):
            t = adapter.carried_tensor(c.key)
            if t.dim() == 2:
                n = int(t.shape[0])
    return n


def load_base(base: str | Path, adapter: Adapter, device: str | torch.device | None = "auto") -> Base:
    """Load the base model (fp32), check it against the adapter, attach the source LoRA.

    Raises BaseModelError (the base path and a one-line cause) when the model cannot be loaded,
    has no tokenizer, or does not match the adapter (see :func:`check_base`). transformers'
    loading bars and warnings are kept quiet (:func:`adaptzip.progress.quiet_third_party`)."""
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    base = Path(base)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    if adapter.uses_dora:
        raise CalibrationError(
            adapter.path,
            "DoRA adapters cannot be calibrated: DoRA rescales by the norm of the dense "
            "W+ΔŴ of every module; compress without --base-model",
        )
    where, kw = _model_location(base)
    with quiet_third_party():  # no loading bars or deprecation warnings before a one-line error
        try:
            config = AutoConfig.from_pretrained(where, **kw)
        except Exception as e:  # transformers raises many types: all mean "not loadable"
            raise BaseModelError(base, f"cannot read the model config: {_first_line(e)}") from e
        task_type = (adapter.config.get("task_type") or "").upper()
        archs = " ".join(getattr(config, "architectures", None) or [])
        causal = task_type == "CAUSAL_LM" or (not task_type and ("CausalLM" in archs or "LMHead" in archs))
        try:
            if task_type == "SEQ_CLS":
                n = _num_labels(adapter)
                if n is None:
                    raise CalibrationError(
                        adapter.path, "a SEQ_CLS adapter without a saved classifier head (modules_to_save)"
                    )
                model = AutoModelForSequenceClassification.from_pretrained(
                    where, num_labels=n, dtype=torch.float32, **kw
                )
                task = "cls"
            elif causal:
                model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kw)
                task = "lm"
            else:
                model = AutoModel.from_pretrained(where, dtype=torch.float32, **kw)
                task = "hidden"
        except CalibrationError:
            raise
        except Exception as e:
            raise BaseModelError(base, f"cannot load the model: {_first_line(e)}") from e
        check_base(model, adapter, base)
        try:
            tok = AutoTokenizer.from_pretrained(where, **kw)
        except Exception as e:
            files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
            if "gguf_file" not in kw and not any((where / f).is_file() for f in files):
                why = f"the folder has no tokenizer files ({', '.join(files[:3])}, ...)"
            else:
                why = _first_line(e)
            raise BaseModelError(
                base, f"no usable tokenizer (calibration needs the base model's tokenizer): {why}"
            ) from e
        model = teacher_model(model, adapter, base)
    model.to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    inner = model.base_model.model
    layers = {m.name: inner.get_submodule(m.name) for m in adapter.modules}
    if task == "lm" and tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return Base(base, model, tok, task, dev, layers)


def _first_line(e: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line: every line of the message joined (transformers often puts
    the cause on a later line), cut at a word near ``limit`` characters."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[:limit].rsplit(" ", 1)[0] + " …"
    return f"{type(e).__name__}: {msg}"


def check_base(model: nn.Module, adapter: Adapter, base: Path | str) -> None:
    """Every adapted module must exist in the base with the adapter's shapes: nn.Linear weight
    (out, in), transformers Conv1D weight (in, out), nn.Embedding weight (vocab, dim)."""
    for m in adapter.modules:
        try:
            mod = model.get_submodule(m.name)
        except AttributeError:
            raise BaseModelError(base, f"module {m.name} of the adapter is missing from the base model") from None
        w = getattr(mod, "weight", None)
        kind = type(mod).__name__
        if isinstance(mod, nn.Embedding):
            want, what = (m.in_features, m.out_features), "(vocab, dim)"
        elif kind == "Conv1D":
            want, what = (m.in_features, m.out_features), "(in, out) Conv1D"
        elif isinstance(mod, nn.Linear):
            want, what = (m.out_features, m.in_features), "(out, in)"
        else:
            raise BaseModelError(base, f"module {m.name} is a {kind}, not a Linear, Conv1D or Embedding")
        if w is None or tuple(w.shape) != want:
            got = None if w is None else tuple(w.shape)
            raise BaseModelError(base, f"module {m.name}: base weight has shape {got}, the adapter needs {want} {what}")


def teacher_model(model: nn.Module, adapter: Adapter, base: Path | str) -> nn.Module:
    """``PeftModel.from_pretrained`` of the source adapter directory on ``model`` (eval mode)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter.path), adapter_name="default", is_trainable=False)
    except Exception as e:
        raise BaseModelError(base, f"cannot attach the adapter {adapter.path}: {_first_line(e)}") from e


# ------------------------------------------------------------------------------------ modes
class Modes:
    """Switches one loaded PeftModel between teacher, base and student.

    * ``teacher()``: the source LoRA active (PEFT's own forward: exact, with lora_bias and heads).
    * ``base()``: every adapter part disabled (``PeftModel.disable_adapter``).
    * ``student(form)``: the LoRA layers disabled, ``modules_to_save`` copies (heads) kept, and a
      forward hook on every adapted module adds the form's update computed on the fly from
      ``(B, A) = form.factors(i)``: ``y += (x @ Aᵀ) @ Bᵀ`` for Linear/Conv1D (x (…, in)), and
      ``y += embedding(ids, Aᵀ) @ Bᵀ`` for embeddings — never a dense ΔŴ. A LoRA bias carried by
      the source is added as PEFT does (``scale · bias``).
    """

    def __init__(self, base: Base, modules: Sequence[ModuleInfo]):
        self.base = base
        self.modules = list(modules)
        self.layers = [base.layers[m.name] for m in self.modules]

    def _lora_enabled(self, on: bool) -> None:
        for layer in self.layers:
            layer.enable_adapters(on)
            for name in layer.adapter_layer_names:
                for p in getattr(layer, name).parameters():
                    p.requires_grad_(False)

    @contextlib.contextmanager
    def teacher(self) -> Iterator[None]:
        self._lora_enabled(True)
        yield

    @contextlib.contextmanager
    def base_only(self) -> Iterator[None]:
        self._lora_enabled(True)
        with self.base.model.disable_adapter():
            yield

    @contextlib.contextmanager
    def student(self, form) -> Iterator[None]:
        self._lora_enabled(False)
        handles = []
        try:
            for i, (m, layer) in enumerate(zip(self.modules, self.layers)):
                handles.append(layer.register_forward_hook(_delta_hook(form, i, m, layer)))
            yield
        finally:
            for h in handles:
                h.remove()
            self._lora_enabled(True)


def _delta_hook(form, i: int, m: ModuleInfo, layer: nn.Module):
    lb = layer.lora_B["default"] if m.kind == "linear" and "default" in getattr(layer, "lora_B", {}) else None
    bias = None if lb is None or getattr(lb, "bias", None) is None else lb.bias.detach() * layer.scaling["default"]

    if m.kind == "embedding":

        def hook(mod, args, out):
            B, A = form.factors(i)  # B (dim×k), A (k×vocab)
            d = nn.functional.embedding(args[0], A.T) @ B.T  # (…, dim)
            return out + d.to(out.dtype)
    else:

        def hook(mod, args, out):
            B, A = form.factors(i)  # B (out×k), A (k×in)
            x = args[0]  # (…, in)
            d = (x.to(A.dtype) @ A.T) @ B.T  # (…, out)
            if bias is not None:
                d = d + bias
            return out + d.to(out.dtype)

    return hook


# ----------------------------------------------------------------------------------- Σ stats
class SigmaHooks:
    """Forward pre-hooks that accumulate Σ_m = Σ_x x xᵀ (fp32, on the model's device) over the
    tokens of every forward while active; modules fed the same input tensor (q/k/v, gate/up)
    share one accumulator. ``mask`` (B, T) selects the tokens that count (None: all)."""

    def __init__(self, base: Base, modules: Sequence[ModuleInfo]):
        self.modules = list(modules)
        self.base = base
        self.slot: dict[int, int] = {}  # module index -> accumulator index
        self.acc: list[Tensor] = []
        self.count: list[int] = []
        self.mask: Tensor | None = None
        self._batch: dict[tuple, tuple] = {}  # this batch's (xᵀx, tokens, x) by input identity
        self._leader_key: dict[int, tuple] = {}  # slot -> the input identity its leader saw this batch
        self.handles: list = []

    def __enter__(self):
        for j, m in enumerate(self.modules):
            self.handles.append(self.base.layers[m.name].register_forward_pre_hook(self._hook(j, m)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        self._batch = {}

    def new_batch(self, mask: Tensor | None) -> None:
        self.mask = mask
        self._batch = {}
        self._leader_key = {}

    def _xtx(self, m: ModuleInfo, x: Tensor) -> tuple[Tensor, int]:
        if m.kind == "embedding":
            ids = x[self.mask.bool()] if self.mask is not None and x.shape == self.mask.shape else x
            cnt = torch.bincount(ids.reshape(-1), minlength=m.in_features).float()
            return cnt, int(ids.numel())
        x = x.detach().float()
        if self.mask is not None and tuple(x.shape[:-1]) == tuple(self.mask.shape):
            x = x[self.mask.bool()]  # (tokens, in): padding left out
        x = x.reshape(-1, x.shape[-1])  # (tokens, in)
        return x.T @ x, int(x.shape[0])

    def _hook(self, j: int, m: ModuleInfo):
        def hook(mod, args):
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape), m.kind)
            if key not in self._batch:
                # keep x alive for the batch: its memory cannot be reused by a later input,
                # so equal keys really mean the same tensor
                self._batch[key] = (*self._xtx(m, x), x)
            xtx, n, _ = self._batch[key]
            if j not in self.slot:
                # first batch: share the accumulator of a module that ran before on the same tensor
                for s_, k_ in self._leader_key.items():
                    if k_ == key:
                        self.slot[j] = s_
                        return
                self.slot[j] = len(self.acc)
                self.acc.append(xtx.clone())
                self.count.append(n)
                self._leader_key[self.slot[j]] = key
                return
            s = self.slot[j]
            if s not in self._leader_key:  # this module leads its slot
                self._leader_key[s] = key
                self.acc[s] += xtx
                self.count[s] += n
            elif self._leader_key[s] != key:
                # the sharing seen on the first batch does not hold: split this module off,
                # exactly (its slot holds the leader's sum, the leader's batch part included)
                lead_xtx, lead_n, _ = self._batch[self._leader_key[s]]
                self.slot[j] = len(self.acc)
                self.acc.append(self.acc[s] - lead_xtx + xtx)
                self.count.append(self.count[s] - lead_n + n)
                self._leader_key[self.slot[j]] = key

        return hook

    def result(self) -> tuple[dict[str, Tensor], dict]:
        """Σ per module name (shared tensors where shared) on the CPU, and facts for the file."""
        sig: list[Tensor | None] = []
        for a, n in zip(self.acc, self.count):
            sig.append(a.double().div(max(n, 1)).float().cpu())
        out: dict[str, Tensor] = {}
        omitted: list[str] = []
        for j, m in enumerate(self.modules):
            if j not in self.slot:
                raise CalibrationError(
                    None, f"module {m.name} never ran during calibration (is it used by the model's forward?)"
                )
            s = sig[self.slot[j]]
            if m.kind == "embedding":
                if m.in_features > MAX_EMBED_SIGMA_VOCAB:
                    omitted.append(m.name)
                    continue
                s = torch.diag(s)  # one-hot inputs: Σ = diag(token frequencies)
            out[m.name] = s
        return out, {"omitted": omitted, "tokens": max(self.count, default=0)}


def save_stats(path: Path, stats: dict[str, Tensor], info: dict) -> None:
    """Write Σ statistics: tensors ``sigma.{j}`` (in×in fp32; one per distinct tensor) and the
    ``adaptzip-stats`` JSON metadata mapping module names to them (atomic)."""
    uniq: dict[int, int] = {}
    tensors: dict[str, Tensor] = {}
    names: dict[str, int] = {}
    for name, t in stats.items():
        if id(t) not in uniq:
            uniq[id(t)] = len(uniq)
            tensors[f"sigma.{uniq[id(t)]}"] = t.contiguous()
        names[name] = uniq[id(t)]
    meta = {"format": STATS_FORMAT, "version": 1, "modules": names, **info}
    with atomic_file(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={STATS_FORMAT: json.dumps(meta, sort_keys=True)})


def load_stats(path: str | Path, adapter: Adapter | None = None) -> tuple[dict[str, Tensor], dict]:
    """Read a stats file; with ``adapter``, check that every module has Σ of shape (in, in)
    (embeddings whose Σ was omitted for size excepted). Raises CalibrationError naming the
    file and the first missing or mismatched module."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(path, "no such statistics file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(STATS_FORMAT, "null"))
            if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
                raise CalibrationError(path, "not an adaptzip statistics file (no adaptzip-stats metadata)")
            cache: dict[int, Tensor] = {}
            stats = {}
            for name, j in meta["modules"].items():
                if j not in cache:
                    cache[j] = f.get_tensor(f"sigma.{j}").float()
                stats[name] = cache[j]
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
        raise CalibrationError(path, f"unreadable statistics file: {_first_line(e)}") from e
    if adapter is not None:
        omitted = set(meta.get("omitted", []))
        for m in adapter.modules:
            if m.name not in stats:
                if m.name in omitted:
                    continue
                raise CalibrationError(
                    path, f"no statistics for module {m.name} (computed for another adapter or base?)"
                )
            if tuple(stats[m.name].shape) != (m.in_features, m.in_features):
                raise CalibrationError(
                    path,
                    f"module {m.name}: Σ has shape {tuple(stats[m.name].shape)}, expected ({m.in_features}, {m.in_features})",
                )
    return stats, meta
