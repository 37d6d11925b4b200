"""Calibration inputs: text, the base model (+ the source LoRA as teacher), Σ statistics.

* :func:`read_texts` — a UTF-8 text file (one document per blank-line-separated paragraph; empty
  lines skipped) or JSONL with a ``text`` field; bad input raises :class:`CalibrationError`.
* :func:`load_base` — a local model directory (safetensors) or a local ``.gguf`` file
  (transformers' ``gguf_file=`` loading, which needs the ``gguf`` package), with its tokenizer;
  :func:`check_base` refuses a base that lacks an adapted module or has another shape, naming it.
* :func:`teacher_model` — ``PeftModel.from_pretrained`` of the source directory on the base, and
  :class:`Modes` to switch one loaded model between *teacher* (base + source LoRA), *base* (no
  adapter) and *student* (base + a :class:`~adaptzip.forms.base.Form` live, see :mod:`.distill`).
* :class:`SigmaHooks` — forward hooks accumulating every adapted module's input statistics
  Σ_m = E[x xᵀ], keyed by ``ModuleInfo.name``: by default a streamed sketch exact on the source's
  row space (:mod:`adaptzip.sigma`), or the exact in×in fp32 matrix (``sketch=None``);
  :func:`save_stats` / :func:`load_stats` store either in a safetensors file (formats/stats.md;
  modules that see the same input tensor, e.g. q/k/v, share one stored entry).

The distillation and the metrics live in :mod:`adaptzip.distill`. (Slightly over ~500 lines: the
four parts are the base-model side of calibration and share its loading and hooks.)
"""

from __future__ import annotations

import contextlib
import json
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from . import sigma as sg
from .adapter import Adapter, ModuleInfo
from .errors import BaseModelError, CalibrationError
from .fileio import atomic_file, save_tensors
from .forms.base import live_factors
from .progress import quiet_third_party
from .sigma import SigmaSketch

Tensor = torch.Tensor
STATS_FORMAT = "adaptzip-stats"
STATS_VERSION = 2


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


def pack(
    ids: Sequence[int], seq_len: int, n_tokens: int | None, path: Path | str | None, what: str, at_most: bool = False
) -> Tensor:
    """The first ``n_tokens`` tokens (all when None) as rows of ``seq_len``: (N, seq_len) int64.
    Raises CalibrationError when there are fewer tokens than asked (``at_most``: then all of
    them are used) or than one row."""
    if n_tokens is not None and at_most:
        n_tokens = min(n_tokens, len(ids))
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
    tokenizer, docs: Sequence[str], seq_len: int, n_tokens: int | None, path, what: str, at_most: bool = False
) -> tuple[Tensor, Tensor]:
    """Encoder inputs: every document cut into chunks wrapped in the tokenizer's special tokens
    ([CLS] … [SEP]), ``seq_len`` tokens at most, and padded: (ids, attention_mask), both (N, T).
    Chunks up to ``n_tokens`` tokens (None: all); fewer in the text is refused unless ``at_most``."""
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
    if n_tokens is not None and total < n_tokens and not at_most:
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
            B, A = live_factors(form, i, out.device.type)  # B (dim×k), A (k×vocab)
            d = nn.functional.embedding(args[0], A.T) @ B.T  # (…, dim)
            return out + d.to(out.dtype)
    else:

        def hook(mod, args, out):
            B, A = live_factors(form, i, out.device.type)  # B (out×k), A (k×in)
            x = args[0]  # (…, in)
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(A.dtype)  # (under autocast the product casts A, not a copy of x, to bf16)
            d = (x @ A.T) @ B.T  # (…, out)
            if bias is not None:
                d = d + bias
            return out + d.to(out.dtype)

    return hook


# ----------------------------------------------------------------------------------- Σ stats
@dataclass
class _Call:
    """One call of a slot's modules: the input's identity (``key`` while ``ref`` is alive: a live
    tensor's memory cannot be reused, so an equal key is the same input), its contribution
    (None while the slot is open: it is in the sums already) and the members that have seen it."""

    key: tuple
    ref: weakref.ReferenceType
    part: tuple | None
    seen: set[int] = field(default_factory=set)

    def same_input(self, key: tuple) -> bool:
        return self.key == key and self.ref() is not None


class SigmaHooks:
    """Forward pre-hooks that accumulate Σ_m = Σ_x x xᵀ / N of every adapted module's input over
    the tokens of every forward while active; ``mask`` (B, T) selects the tokens that count (None:
    all). :meth:`observe` is the hook's whole work: calling it with inputs directly (``base`` may
    then be None) goes through the same code.

    ``sketch``: the stored rank of each slot's Σ sketch (:mod:`adaptzip.sigma`: exact on the row
    space of ``rows``, the source's A factors, read from the base's LoRA layers by default), or
    None for the exact in×in fp32 Σ. A slot keeps the dense Σ anyway when it is no larger than its
    sketch; embeddings keep diag(token frequencies), exact. The sketch's Gaussian test matrices
    come from ``seed``: the same inputs and seed give the same statistics, bit for bit (on one
    machine and thread count).

    Sharing: modules fed the same input tensor on their first batch (q/k/v, gate/up) share one
    slot (one accumulator, one stored entry; the sketch is then exact on all their rows). A slot's
    batch contribution is added once every member has seen that input; a member fed another input
    later is split off exactly, with the sums before that contribution plus its own input. Inputs
    are identified by (address, shape, stride, device) while alive; none is kept alive here."""

    def __init__(
        self,
        base: Base | None,
        modules: Sequence[ModuleInfo],
        sketch: int | None = sg.SKETCH_RANK,
        *,
        rows: Sequence[Tensor | None] | None = None,
        seed: int = 0,
    ):
        self.modules = list(modules)
        self.base = base
        self.sketch = sketch
        self.seed = seed
        self.rows = list(rows) if rows is not None else [_lora_rows(base, m) for m in self.modules]
        self._gen = torch.Generator().manual_seed(seed)
        self.slot: dict[int, int] = {}  # module index -> slot
        self.acc: list[sg.Accumulator] = []
        self.members: list[list[int]] = []
        self._open: dict[int, None] = {}  # slots created this batch with one call so far: others may join
        self._call: dict[int, _Call] = {}  # slot -> its call in progress
        self.mask: Tensor | None = None
        self.handles: list = []

    def __enter__(self):
        for j, m in enumerate(self.modules):
            self.handles.append(self.base.layers[m.name].register_forward_pre_hook(self._hook(j)))
        return self

    def __exit__(self, *exc):
        self._end_batch()
        for h in self.handles:
            h.remove()
        self.handles = []

    def new_batch(self, mask: Tensor | None) -> None:
        self._end_batch()
        self.mask = mask

    def _hook(self, j: int):
        def hook(mod, args):
            self.observe(j, args[0])

        return hook

    def _inputs(self, m: ModuleInfo, x: Tensor) -> Tensor:
        """The counted tokens of x: ids (N,) for an embedding, else (N, in) fp32."""
        mask = self.mask
        if m.kind == "embedding":
            return x[mask.bool()] if mask is not None and x.shape == mask.shape else x.reshape(-1)
        x = x.detach().float()
        if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
            x = x[mask.bool()]  # (tokens, in): padding left out
        return x.reshape(-1, x.shape[-1])

    def observe(self, j: int, x: Tensor) -> None:
        """Module j is called with input x."""
        m = self.modules[j]
        key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()), str(x.device), m.kind)
        s = self.slot.get(j)
        if s is None:
            self._first(j, key, x)
            return
        c = self._call.get(s)
        if c is not None and j not in c.seen:
            if c.same_input(key):
                c.seen.add(j)
                self._commit_if_seen(s)
            else:
                self._split(j, s, x)
            return
        if c is not None:  # j runs again: its slot's previous call is over
            self._close(s)
        self._call[s] = _Call(key, weakref.ref(x), self.acc[s].part(self._inputs(m, x)), {j})
        self._commit_if_seen(s)

    def _first(self, j: int, key: tuple, x: Tensor) -> None:
        """Module j's first call: join the open slot fed this very input, or open a new one."""
        m = self.modules[j]
        for s in self._open:
            if self._call[s].same_input(key):
                self.slot[j] = s
                self.members[s].append(j)
                self._call[s].seen.add(j)
                self.acc[s].extend(self.rows[j], self._inputs(m, x))
                self.rows[j] = None
                return
        xs = self._inputs(m, x)
        acc = sg.accumulator(m.in_features, m.kind, self.rows[j], self.sketch, self._gen, xs.device)
        self.rows[j] = None  # the accumulator keeps its basis of the rows
        acc.add(acc.part(xs))
        s = len(self.acc)
        self.acc.append(acc)
        self.members.append([j])
        self.slot[j] = s
        self._open[s] = None
        self._call[s] = _Call(key, weakref.ref(x), None, {j})

    def _commit_if_seen(self, s: int) -> None:
        c = self._call[s]
        if s not in self._open and c.seen.issuperset(self.members[s]):
            self.acc[s].add(c.part)
            del self._call[s]

    def _new_slot(self, acc: sg.Accumulator, members: list[int]) -> None:
        t = len(self.acc)
        self.acc.append(acc)
        self.members.append(members)
        for j in members:
            self.slot[j] = t

    def _split(self, j: int, s: int, x: Tensor) -> None:
        """Member j of slot s is fed another input than the slot's call in progress: it leaves
        with the sums before that call (whose part is not added yet) plus its own input."""
        acc = self.acc[s].copy()
        acc.add(acc.part(self._inputs(self.modules[j], x)))
        self.members[s].remove(j)
        self._new_slot(acc, [j])
        self._commit_if_seen(s)

    def _close(self, s: int) -> None:
        """End slot s's call in progress: members that did not see its input leave (with the sums
        before it), then its part is added."""
        c = self._call.pop(s)
        if s in self._open:
            del self._open[s]  # the first call's part is in the sums already
            return
        missing = [j for j in self.members[s] if j not in c.seen]
        if missing:
            self.members[s] = [j for j in self.members[s] if j in c.seen]
            self._new_slot(self.acc[s].copy(), missing)
        self.acc[s].add(c.part)

    def _end_batch(self) -> None:
        for s in list(self._call):
            self._close(s)

    def result(self) -> tuple[dict[str, Tensor | SigmaSketch], dict]:
        """Σ per module name (one shared object per slot) on the CPU, and facts for the file.
        Releases the sums (call once, after the last batch)."""
        self._end_batch()
        for j, m in enumerate(self.modules):
            if j not in self.slot:
                raise CalibrationError(
                    None, f"module {m.name} never ran during calibration (is it used by the model's forward?)"
                )
        used = sorted(set(self.slot.values()))
        tokens = max((self.acc[s].count for s in used), default=0)
        sig = {s: self.acc[s].result() for s in used}
        out = {m.name: sig[self.slot[j]] for j, m in enumerate(self.modules)}
        return out, {"tokens": tokens, "sketch": self.sketch, "seed": self.seed}


def _lora_rows(base: Base | None, m: ModuleInfo) -> Tensor | None:
    """The A factor (r×in) of module m's attached LoRA layer (None for embeddings or no layer)."""
    if base is None or m.kind == "embedding":
        return None
    lora_A = getattr(base.layers.get(m.name), "lora_A", None)
    if lora_A is None or "default" not in lora_A:
        return None
    return lora_A["default"].weight.detach().float().cpu()


def save_stats(path: Path, stats: dict[str, Tensor | SigmaSketch], info: dict) -> None:
    """Write Σ statistics (formats/stats.md, version 2): per distinct Σ object a slot j, stored as
    ``sigma.{j}`` (full, in×in fp32) or ``sketch.{j}.L`` / ``.U`` / ``.d`` (fp32), and the
    ``adaptzip-stats`` JSON metadata mapping module names to slots (atomic; the same statistics
    give the same bytes)."""
    uniq: dict[int, int] = {}
    tensors: dict[str, Tensor] = {}
    names: dict[str, int] = {}
    slots: list[str] = []
    for name, t in stats.items():
        if id(t) not in uniq:
            j = uniq[id(t)] = len(uniq)
            if isinstance(t, SigmaSketch):
                slots.append("sketch")
                for part, v in t.tensors().items():
                    tensors[f"sketch.{j}.{part}"] = v.float().contiguous()
            else:
                slots.append("full")
                tensors[f"sigma.{j}"] = t.float().contiguous()
        names[name] = uniq[id(t)]
    meta = {**info, "format": STATS_FORMAT, "version": STATS_VERSION, "modules": names, "slots": slots}
    with atomic_file(Path(path)) as tmp:
        save_tensors(tmp, tensors, metadata={STATS_FORMAT: json.dumps(meta, sort_keys=True)})


def load_stats(path: str | Path, adapter: Adapter | None = None) -> tuple[dict[str, Tensor | SigmaSketch], dict]:
    """Read a stats file (version 1: full Σ only; version 2: full or sketch per slot). Every
    stored Σ must be well formed: finite values, a full Σ square with a non-negative diagonal, a
    sketch's L, U, d of one size n with d ≥ 0 and U's columns orthonormal. With ``adapter``, every
    module must have Σ of size in_features (version-1 embeddings omitted for size excepted).
    Raises CalibrationError naming the file and the first missing or bad module."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(path, "no such statistics file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(STATS_FORMAT, "null"))
            if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
                raise CalibrationError(path, "not an adaptzip statistics file (no adaptzip-stats metadata)")
            version = meta.get("version", 1)
            if version not in (1, STATS_VERSION):
                raise CalibrationError(
                    path, f"statistics file version {version} (this adaptzip reads versions 1 and {STATS_VERSION})"
                )
            kinds = meta["slots"] if version >= 2 else None
            keys = set(f.keys())
            cache: dict[int, Tensor | SigmaSketch] = {}
            stats: dict[str, Tensor | SigmaSketch] = {}
            for name, j in meta["modules"].items():
                if j not in cache:
                    kind = "full" if kinds is None else kinds[j]
                    want = [f"sigma.{j}"] if kind == "full" else [f"sketch.{j}.{p}" for p in ("L", "U", "d")]
                    if kind not in ("full", "sketch"):
                        raise CalibrationError(path, f"module {name}: unknown statistics kind {kind!r}")
                    absent = [k for k in want if k not in keys]
                    if absent:
                        raise CalibrationError(path, f"module {name}: tensor {absent[0]} is missing")
                    got = [f.get_tensor(k).float() for k in want]
                    cache[j] = got[0] if kind == "full" else _sketch_or_none(*got)
                stats[name] = cache[j]
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
        raise CalibrationError(path, f"unreadable statistics file: {_first_line(e)}") from e
    order = [m.name for m in adapter.modules] if adapter is not None else list(stats)
    sizes = {m.name: m.in_features for m in adapter.modules} if adapter is not None else {}
    omitted = set(meta.get("omitted", []))
    checked: set[int] = set()
    for name in order:
        if name not in stats:
            if name in omitted:
                continue
            raise CalibrationError(path, f"no statistics for module {name} (computed for another adapter or base?)")
        S = stats[name]
        bad = _bad_sigma(S, sizes.get(name), id(S) in checked)
        if bad:
            raise CalibrationError(path, f"module {name}: {bad}")
        checked.add(id(S))
    return stats, meta


def _sketch_or_none(L: Tensor, U: Tensor, d: Tensor) -> SigmaSketch | tuple:
    """A SigmaSketch of the stored parts, or the parts themselves when their shapes disagree
    (reported by :func:`_bad_sigma` with the module's name)."""
    try:
        return SigmaSketch(L, U, d)
    except ValueError:
        return (L, U, d)


def _bad_sigma(S, n: int | None, values_checked: bool) -> str | None:
    """What is wrong with a stored Σ (None: nothing): shapes (against ``n`` = in_features when
    given), then, unless already checked for another module of the slot, its values."""
    if isinstance(S, tuple):
        return "Σ sketch parts " + ", ".join(f"{k} {tuple(t.shape)}" for k, t in zip("LUd", S)) + " do not agree"
    size = S.shape[0]
    if isinstance(S, Tensor) and (S.dim() != 2 or S.shape[0] != S.shape[1]):
        return f"Σ has shape {tuple(S.shape)}, expected a square matrix"
    if n is not None and size != n:
        what = f"({n}, {n})" if isinstance(S, Tensor) else f"size {n}"
        return f"Σ has shape {tuple(S.shape)}, expected {what}"
    if values_checked:
        return None
    parts = {"Σ": S} if isinstance(S, Tensor) else {f"Σ sketch {k}": t for k, t in S.tensors().items()}
    for what, t in parts.items():
        if not bool(torch.isfinite(t).all()):
            return f"{what} has non-finite values (NaN or inf)"
    if isinstance(S, Tensor):
        if bool((S.diagonal() < 0).any()):
            return "Σ has negative diagonal entries (a second moment has none)"
        return None
    if bool((S.d < 0).any()):
        return "Σ sketch d has negative entries (must be ≥ 0)"
    p = S.U.shape[1]
    if p and float((S.U.T @ S.U - torch.eye(p)).abs().max()) > 1e-3:
        return "Σ sketch U does not have orthonormal columns"
    return None
