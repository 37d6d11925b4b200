"""Calibration distillation and behavioural metrics: convert by behaviour, not by weights.

:func:`prepare` loads the base model with the source LoRA (the teacher), tokenises the
calibration text into three splits — *train* (Σ statistics and distillation batches), *held-out*
(early stopping) and *eval* (``--eval`` text, or a third split of the calibration text) — and
caches the teacher's outputs on them in one pass per split:

* causal LMs (``task='lm'``): the teacher's top-k next-token log-probabilities (k=64 for train and
  held-out, 256 for eval; the full distribution when the vocabulary is ≤ 2k). KL(p_t‖p_s) is taken
  over the teacher's top-k tokens plus one bucket for the rest of the vocabulary (exact when the
  cache holds the full distribution, a tight lower bound otherwise);
* encoders (``task='cls'`` / ``'hidden'``): final hidden states (relative MSE) and, when the
  adapter carries a classifier head, its logits (KL over classes).

:meth:`Calibration.distil` then trains a form's parameters inside the base model (the form live via
forward hooks, :class:`adaptzip.calibrate.Modes`) to minimise that divergence: AdamW, cosine
schedule with warm-up, gradient clipping, early stopping on the held-out split, the best state
kept, ``form.finalize()`` at the end. :meth:`Calibration.measure` is the whole step for one form:
metrics before, distillation, metrics after. (What to distil and when — the compress pipeline —
is :mod:`adaptzip.pipeline`; this module is the session alone, longer than ~500 lines because its data, teacher
caches, divergences and training loop belong together.)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import calibrate as cb
from . import fit, trainer
from .adapter import Adapter
from .errors import CalibrationError
from .fileio import json_clean
from .forms.base import FitContext, Form
from .options import CALIB_TOKENS
from .progress import progress_bar
from .sigma import SKETCH_RANK

Tensor = torch.Tensor
TRAIN_TOPK = 64
EVAL_TOPK = 256
PASS_TOKENS = 2048  # tokens per batch of the passes without gradient (teacher caches, Σ, checks, metrics)


PRECISIONS = ("auto", "fp32", "bf16")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """(``fp32`` or ``bf16``, why) for the training passes. ``auto`` picks bf16 where the hardware
    computes it natively — a CUDA device with bf16 support, or a CPU with AVX-512-BF16 or AMX
    (bf16 matrix products at about twice the fp32 rate; elsewhere bf16 is emulated and slower)."""
    if precision not in PRECISIONS:
        raise CalibrationError(None, f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, "asked"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} computes bf16 natively"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no native bf16"
    cpu = torch.cpu
    if cpu._is_amx_tile_supported() or cpu._is_avx512_bf16_supported():
        return "bf16", "this CPU has " + ("AMX" if cpu._is_amx_tile_supported() else "AVX-512-BF16")
    return "fp32", "this CPU has neither AVX-512-BF16 nor AMX (bf16 would be emulated)"


@dataclass
class Split:
    """Token rows and the teacher's cached outputs on them.

    ids, mask: (N, T); lm: t_logp (N, T, k) teacher log-probs of tokens t_idx (N, T, k) (t_idx None:
    the full vocabulary, k = V); encoders: t_hidden (N, T, H), t_logits (N, C) or None, and
    t_hidden_var, E‖t − μ‖² over the split's valid tokens (μ their mean): the scale of the relative
    hidden-state error, one constant per split, so no figure depends on how the split is batched."""

    ids: Tensor
    mask: Tensor | None = None
    t_idx: Tensor | None = None
    t_logp: Tensor | None = None
    t_hidden: Tensor | None = None
    t_logits: Tensor | None = None
    loss_source: float | None = None  # teacher next-token CE (lm)
    loss_base: float | None = None  # base next-token CE (lm)
    base_objective: float | None = None  # divergence of the base model from the teacher (encoders)
    t_hidden_var: float | None = None  # encoders: the teacher's hidden variance per valid token, split-wide

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.ids.numel() if self.mask is None else self.mask.sum())


@dataclass
class Calibration:
    """One calibration session for one adapter (see the module docstring)."""

    adapter: Adapter
    base: cb.Base
    modes: cb.Modes
    train: Split
    heldout: Split
    eval: Split
    eval_source: str  # "eval" (the --eval text) or "calib" (a held-out part of --calib)
    stats: dict[str, Tensor] | None
    stats_info: dict = field(default_factory=dict)
    batch_size: int = 4
    seed: int = 0
    progress: bool = False
    timings: dict = field(default_factory=dict)
    precision: str = "fp32"  # of the student's training steps
    precision_reason: str = "asked"

    def fast(self) -> contextlib.AbstractContextManager:
        """The precision of the training steps: bf16 autocast (matrix products in bf16;
        reductions, the form's parameters, its optimiser state and every loss in fp32), or nothing
        for fp32. Teacher caches and Σ (one pass each) and every measurement — held-out checks
        and eval metrics — are computed in fp32, so targets, statistics, the choice of the best
        state and reported metrics do not depend on it."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(self.base.device.type, dtype=torch.bfloat16)

    # ----------------------------------------------------------------- forward passes
    @property
    def task(self) -> str:
        return self.base.task

    def _forward(self, ids: Tensor, mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """(logits, hidden): lm → ((B, T, V), None); cls → ((B, C), (B, T, H)); hidden → (None, (B, T, H))."""
        dev = self.base.device
        ids = ids.to(dev)
        m = self.base.model
        if self.task == "lm":
            # no KV cache (nothing is generated); bf16 logits in a bf16 step: the log-softmax upcasts them
            return m(input_ids=ids, use_cache=False).logits, None
        mk = None if mask is None else mask.to(dev)
        if self.task == "cls":
            out = m(input_ids=ids, attention_mask=mk, output_hidden_states=True)
            return out.logits.float(), out.hidden_states[-1].float()
        out = m(input_ids=ids, attention_mask=mk)
        return None, out.last_hidden_state.float()

    def _batches(self, sp: Split):
        """Slices of a split for a pass without gradient: :data:`PASS_TOKENS` tokens per batch (at
        least ``batch_size`` rows). Larger than a training batch: fewer, larger matrix products."""
        bs = max(self.batch_size, PASS_TOKENS // max(sp.ids.shape[1], 1), 1)
        for s in range(0, sp.n, bs):
            yield slice(s, min(s + bs, sp.n))

    # ----------------------------------------------------------------- teacher caches
    @torch.no_grad()
    def _cache(
        self, sp: Split, topk: int, label: str, sigma: cb.SigmaHooks | None = None, base_pass: bool = False
    ) -> None:
        """Fill the teacher outputs of a split (and Σ when ``sigma``; the base loss when
        ``base_pass``). Always in fp32: one pass per split, so Σ and the targets are exact."""
        lp_k, idx_k, hid, lgt = [], [], [], []
        ce_t = ce_b = 0.0
        n_ce = 0
        ob_num = kl_b = 0.0
        with progress_bar(self.progress, label, sp.n) as bar:
            for sl in self._batches(sp):
                ids = sp.ids[sl]
                mask = None if sp.mask is None else sp.mask[sl]
                with self.modes.teacher():
                    if sigma is not None:
                        sigma.new_batch(None if mask is None else mask.to(self.base.device))
                    logits, hidden = self._forward(ids, mask)
                if self.task == "lm":
                    logp = _log_probs(logits)  # (B, T, V)
                    ce_t += float(_next_token_ce(logp, ids.to(logp.device))) * ids[:, 1:].numel()
                    n_ce += ids[:, 1:].numel()
                    if topk >= logp.shape[-1]:
                        lp_k.append(logp.cpu())
                    else:
                        v, i = logp.topk(topk, -1)
                        lp_k.append(v.cpu())
                        idx_k.append(i.to(torch.int32).cpu())
                    if base_pass:
                        with self.modes.base_only():
                            lb, _ = self._forward(ids, mask)
                        ce_b += float(_next_token_ce(_log_probs(lb), ids.to(lb.device))) * ids[:, 1:].numel()
                else:
                    hid.append(hidden.cpu())
                    if logits is not None:
                        lgt.append(logits.cpu())
                    if base_pass:
                        with self.modes.base_only():
                            lb, hb = self._forward(ids, mask)
                        ob_num += float(_hidden_sq_err(hb, hidden, mask))
                        if logits is not None:
                            kl_b += float(_class_kl(torch.log_softmax(logits, -1), lb).sum())
                bar(sl.stop - sl.start)
        if self.task == "lm":
            sp.t_logp = torch.cat(lp_k)
            sp.t_idx = torch.cat(idx_k) if idx_k else None
            sp.loss_source = ce_t / max(n_ce, 1)
            if base_pass:
                sp.loss_base = ce_b / max(n_ce, 1)
        else:
            sp.t_hidden = torch.cat(hid)
            sp.t_logits = torch.cat(lgt) if lgt else None
            sp.t_hidden_var = _hidden_var(sp.t_hidden, sp.mask)
            if base_pass:
                sp.base_objective = ob_num / max(sp.tokens * sp.t_hidden_var, 1e-30) + (kl_b / sp.n if lgt else 0.0)

    # ----------------------------------------------------------------- divergence
    def _divergence(
        self, sp: Split, sl: slice, logits: Tensor | None, hidden: Tensor | None, train: bool = False
    ) -> dict[str, Tensor]:
        """Per-batch sums against the teacher cache: kl (lm: over tokens; cls: over sequences),
        top1 (agreements), n (count), hnum/hden (hidden-state error), ce (next-token CE sum).
        ``train``: only what the objective needs (lm: kl and n). The student's log-probs come from
        one fused fp32 log-softmax (:func:`_log_probs`, as the teacher's), read at the teacher's top-k."""
        dev = self.base.device
        out: dict[str, Tensor] = {}
        if self.task == "lm":
            logp = _log_probs(logits)  # (B, T, V) fp32
            t_logp = sp.t_logp[sl].to(dev)
            t_idx = None if sp.t_idx is None else sp.t_idx[sl].to(dev).long()
            out["kl"] = _topk_kl(logp, t_logp, t_idx).sum()
            out["n"] = torch.tensor(float(logits.shape[0] * logits.shape[1]))
            if train:
                return out
            t_top = t_logp.argmax(-1) if t_idx is None else t_idx[..., 0]
            out["top1"] = (logits.argmax(-1) == t_top).sum()
            ids = sp.ids[sl].to(dev)
            out["ce"] = _next_token_ce(logp, ids) * ids[:, 1:].numel()
            out["n_ce"] = torch.tensor(float(ids[:, 1:].numel()))
            return out
        mask = None if sp.mask is None else sp.mask[sl].to(dev)
        out["hnum"] = _hidden_sq_err(hidden, sp.t_hidden[sl].to(dev), mask)
        valid = float(hidden.shape[0] * hidden.shape[1]) if mask is None else float(mask.sum())
        out["hden"] = torch.tensor(valid * sp.t_hidden_var, device=dev)
        out["n"] = torch.tensor(float(hidden.shape[0]))
        if logits is not None and sp.t_logits is not None:
            t = torch.log_softmax(sp.t_logits[sl].to(dev), -1)
            out["kl"] = _class_kl(t, logits).sum()
            out["top1"] = (logits.argmax(-1) == t.argmax(-1)).sum()
        return out

    def _objective(self, d: dict[str, Tensor]) -> Tensor:
        """What distillation minimises: mean KL (lm); relative hidden MSE (+ mean class KL) (encoders)."""
        if self.task == "lm":
            return d["kl"] / d["n"]
        obj = d["hnum"] / d["hden"].clamp_min(1e-30)
        if "kl" in d:
            obj = obj + d["kl"] / d["n"]
        return obj

    @torch.no_grad()
    def evaluate(self, form: Form | None, split: str = "eval", objective_only: bool = False) -> dict[str, float]:
        """Divergence of the student (``form`` live; None: the base model) from the teacher on a
        split, in fp32: ``kl`` (nats per token, lm; per sequence over classes, cls), ``top1`` agreement,
        ``loss`` (lm next-token CE), ``objective``, ``hidden_rel_mse`` (encoders).
        ``objective_only``: lm ``kl`` and ``objective`` alone (the held-out checks; the same values,
        without the top-1 and CE passes over the logits)."""
        sp = getattr(self, split)
        tot: dict[str, float] = {}
        for sl in self._batches(sp):
            mask = None if sp.mask is None else sp.mask[sl]
            ctxm = self.modes.base_only() if form is None else self.modes.student(form)
            with ctxm:
                logits, hidden = self._forward(sp.ids[sl], mask)
            for k, v in self._divergence(sp, sl, logits, hidden, train=objective_only).items():
                tot[k] = tot.get(k, 0.0) + float(v)
        res: dict[str, float] = {}
        if self.task == "lm" and objective_only:
            res["kl"] = res["objective"] = tot["kl"] / tot["n"]
        elif self.task == "lm":
            res["kl"] = tot["kl"] / tot["n"]
            res["top1"] = tot["top1"] / tot["n"]
            res["loss"] = tot["ce"] / max(tot["n_ce"], 1.0)
            res["objective"] = res["kl"]
        else:
            res["hidden_rel_mse"] = tot["hnum"] / max(tot["hden"], 1e-30)
            res["objective"] = res["hidden_rel_mse"]
            if "kl" in tot:
                res["kl"] = tot["kl"] / tot["n"]
                res["top1"] = tot["top1"] / tot["n"]
                res["objective"] += res["kl"]
        return res

    def improvement_kept(self, ev: dict[str, float]) -> float | None:
        """(loss_base − loss_compressed)/(loss_base − loss_source) on the eval split (lm); for
        encoders 1 − d(compressed)/d(base), d = the divergence from the teacher. None when the
        adapter does not change the eval loss (the ratio is undefined)."""
        sp = self.eval
        if self.task == "lm":
            gain = sp.loss_base - sp.loss_source
            if abs(gain) < 1e-9:
                return None
            return (sp.loss_base - ev["loss"]) / gain
        if not sp.base_objective:
            return None
        return 1.0 - ev["objective"] / sp.base_objective

    # ----------------------------------------------------------------- distillation
    def train_step(
        self, form: Form, opt: torch.optim.Optimizer, rows: Tensor, params: list[Tensor], clip: float = 1.0
    ) -> float:
        """One optimiser step of ``form`` on the train rows ``rows`` (in :attr:`precision`):
        the student's forward with the form live, the divergence from the cached teacher,
        backward, gradient-norm clipping of ``params`` (0: none), ``opt.step()``. Returns the loss."""
        view = _Rows(self.train, rows)
        with self.modes.student(form), self.fast():
            logits, hidden = self._forward(view.ids, view.mask)
        loss = self._objective(self._divergence(view, slice(None), logits, hidden, train=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return float(loss.detach())

    def distil(
        self,
        form: Form,
        *,
        steps: int,
        lr: float | None = None,
        seconds: float | None = None,
        most_steps: int | None = None,
        clip: float = 1.0,
        weight_decay: float = 0.0,
        reductions: int = 2,
        label: str = "distil",
    ) -> dict:
        """Train ``form``'s parameters (``form.trainable_groups()``) to imitate the teacher.

        AdamW (no weight decay by default), gradient-norm clipping, batches of ``batch_size``
        random train rows (seeded), the training passes in :attr:`precision`. The schedule and the
        stops are :class:`adaptzip.trainer.Loop`'s: a probe of learning rates when ``lr`` is None,
        a plateau schedule on the held-out objective, the best state (the start included) kept, and
        a stop by convergence, at the step cap ``steps`` — which grows up to ``most_steps`` while the
        run still improves (None: fixed) — or before ``seconds`` of wall-clock time
        (``reductions``: falls of the rate before the convergence stop). Then
        ``form.finalize()``. Returns what happened (``distill_*``, ``heldout_*``)."""
        t0 = time.perf_counter()
        form.to(self.base.device)
        form.train()
        groups = [
            {**g, "params": [p for p in g["params"] if p.requires_grad]}
            for g in form.trainable_groups()
            if any(p.requires_grad for p in g["params"])
        ]
        params = [p for g in groups for p in g["params"]]
        g = torch.Generator().manual_seed(self.seed)
        bs = min(self.batch_size, self.train.n)

        def step(opt: torch.optim.Optimizer, rows: Tensor) -> float:
            return self.train_step(form, opt, rows, params, clip)

        with progress_bar(self.progress, f"{label} {form.name}", steps) as bar:
            loop = trainer.Loop(
                module=form,
                groups=groups,
                step=step,
                heldout=lambda: self.evaluate(form, "heldout", objective_only=True)["objective"],
                draw=lambda: torch.randint(self.train.n, (bs,), generator=g),
                tick=lambda **fields: bar(1, **fields),
                grown=bar.set_total,
                weight_decay=weight_decay,
                reductions=reductions,
            )
            res = loop.run(steps=steps if params else 0, lr=lr, seconds=seconds, most=most_steps)
        if res["steps"]:
            form.finalize()
        form.eval()
        secs = time.perf_counter() - t0
        info: dict[str, Any] = {
            "distill_steps": res["steps"],
            "distill_lr": res.get("lr"),
            "distill_lr_final": res.get("lr_final"),
            "distill_lr_probe": res.get("probe"),
            "distill_stop": res["stop"],
            "distill_best_step": res["best_step"],
            "distill_precision": self.precision,
            "heldout_before": res["heldout_before"],
            "heldout_after": self.evaluate(form, "heldout", objective_only=True)["objective"]
            if res["steps"]
            else res["heldout_before"],
            "distill_seconds": secs,
            "distill_tokens_per_s": res["steps"] * bs * self.train.ids.shape[1] / max(secs, 1e-9),
        }
        return info

    # ----------------------------------------------------------------- the whole step
    def measure(
        self,
        form: Form,
        ctx: FitContext,
        dtype: torch.dtype,
        *,
        steps: int,
        lr: float | None = None,
        seconds: float | None = None,
        most_steps: int | None = None,
        prefix: str = "",
    ) -> dict[str, Any]:
        """Metrics of ``form`` before distillation, distillation in place (a cap of ``steps`` steps
        that may grow to ``most_steps``, and ``seconds``; ``lr`` None: probed), metrics after. The form's floats are rounded to the container ``dtype`` before each measurement
        so the numbers describe what is stored. Keys (with ``prefix``): kl_before, kl_after,
        top1_agreement_before, top1_agreement, improvement_kept_before, improvement_kept,
        ppl_compressed_before, ppl_compressed, output_rel_error_before, output_rel_error,
        worst_module_output_rel_error, worst_module, distill_* and, for encoders,
        objective_before/after and hidden_rel_mse_before/after."""
        round_to(form, dtype)
        form.cpu()
        rep0 = fit.evaluate(form, self.adapter, ctx)  # Σ-weighted: ‖(ΔW−ΔŴ)X‖/‖ΔW X‖ on the calibration X
        form.to(self.base.device)
        ev0 = self.evaluate(form)
        info = self.distil(
            form,
            steps=steps,
            lr=lr,
            seconds=seconds,
            most_steps=most_steps,
            label=f"distil{'' if not prefix else ' ' + prefix.rstrip('_')}",
        )
        round_to(form, dtype)
        ev1 = self.evaluate(form) if info["distill_steps"] else ev0
        form.cpu()
        rep1 = fit.evaluate(form, self.adapter, ctx)
        m: dict[str, Any] = {
            "kl_before": ev0.get("kl"),
            "kl_after": ev1.get("kl"),
            "top1_agreement_before": ev0.get("top1"),
            "top1_agreement": ev1.get("top1"),
            "improvement_kept_before": self.improvement_kept(ev0),
            "improvement_kept": self.improvement_kept(ev1),
            "objective_before": ev0["objective"],
            "objective_after": ev1["objective"],
            "output_rel_error_before": rep0.rel_error,
            "output_rel_error": rep1.rel_error,
            "worst_module_output_rel_error": rep1.worst_module_rel_error,
            "worst_module": rep1.worst_module,
            **{k: v for k, v in info.items() if k.startswith("distill_") or k.startswith("heldout_")},
        }
        if self.task == "lm":
            m["ppl_compressed_before"] = math.exp(min(ev0["loss"], 700))
            m["ppl_compressed"] = math.exp(min(ev1["loss"], 700))
        else:
            m["hidden_rel_mse_before"] = ev0["hidden_rel_mse"]
            m["hidden_rel_mse_after"] = ev1["hidden_rel_mse"]
        return {prefix + k: json_clean(v) for k, v in m.items()}

    def reference_metrics(self) -> dict[str, Any]:
        """Facts about the calibration itself: tokens, base/source perplexity on the eval split."""
        m: dict[str, Any] = {
            "task": self.task,
            "calib_tokens": self.train.tokens + self.heldout.tokens,
            "heldout_tokens": self.heldout.tokens,
            "eval_tokens": self.eval.tokens,
            "eval_text": self.eval_source,
            "weighted": self.stats is not None,
            "precision": self.precision,
        }
        if self.task == "lm":
            m["ppl_base"] = math.exp(min(self.eval.loss_base, 700))
            m["ppl_source"] = math.exp(min(self.eval.loss_source, 700))
            m["loss_base"] = self.eval.loss_base
            m["loss_source"] = self.eval.loss_source
        else:
            m["base_objective"] = self.eval.base_objective
        return {k: json_clean(v) for k, v in m.items()}


class _Rows:
    """A view of a Split at given rows (for random training batches)."""

    def __init__(self, sp: Split, rows: Tensor):
        self.ids = sp.ids[rows]
        self.mask = None if sp.mask is None else sp.mask[rows]
        self.t_idx = None if sp.t_idx is None else sp.t_idx[rows]
        self.t_logp = None if sp.t_logp is None else sp.t_logp[rows]
        self.t_hidden = None if sp.t_hidden is None else sp.t_hidden[rows]
        self.t_logits = None if sp.t_logits is None else sp.t_logits[rows]
        self.t_hidden_var = sp.t_hidden_var


# --------------------------------------------------------------------------------- prepare
def prepare(
    adapter: Adapter,
    base_model: str | Path,
    calib: str | Path,
    *,
    calib_tokens: int | None = None,
    eval_text: str | Path | None = None,
    eval_tokens: int = 8192,
    stats: dict[str, Tensor] | None = None,
    stats_file: str | Path | None = None,
    save_stats_to: str | Path | None = None,
    device: str | None = "auto",
    seq_len: int = 128,
    batch_size: int = 4,
    heldout: float = 0.1,
    progress: bool = False,
    seed: int = 0,
    weighted: bool = True,
    precision: str = "auto",
    sketch_rank: int | None = SKETCH_RANK,
) -> Calibration:
    """Load the base + teacher, tokenise, compute Σ (or reuse ``stats`` / ``stats_file``) and the
    teacher caches. ``calib_tokens`` tokens of ``calib`` are used (None: up to
    :data:`adaptzip.options.CALIB_TOKENS`, all of a shorter text; a number the text does not
    hold is refused): a ``heldout`` fraction for early stopping, the same fraction for
    evaluation when no ``eval_text`` is given, the rest for training. Σ is saved to ``save_stats_to`` when computed here. ``precision`` (auto, fp32,
    bf16; see :func:`resolve_precision`) is that of the distillation steps; teacher caches, Σ
    and every measurement are computed in fp32. ``sketch_rank``: Σ is kept as a sketch of that
    rank per shared input (:class:`adaptzip.sigma.SigmaSketch`; None: the exact in×in Σ). This one session — one model load,
    one Σ + teacher pass per split — serves every form a compress distils or measures."""
    t0 = time.perf_counter()
    if seq_len < 8:
        raise CalibrationError(None, f"sequence length {seq_len} is too short (≥ 8)")
    docs = cb.read_texts(calib)
    base = cb.load_base(base_model, adapter, device)
    t_load = time.perf_counter() - t0
    modes = cb.Modes(base, adapter.modules)
    tok = base.tokenizer
    seq = seq_len
    max_pos = getattr(base.model.config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and max_pos > 0:
        seq = min(seq, max_pos)

    def rows(docs_: list[str], n_tok: int | None, path, what, at_most=False) -> tuple[Tensor, Tensor | None]:
        if base.task == "lm":
            return cb.pack(cb.tokenize_stream(tok, docs_), seq, n_tok, path, what, at_most), None
        return cb.encoder_rows(tok, docs_, seq, n_tok, path, what, at_most)

    n_calib = CALIB_TOKENS if calib_tokens is None else calib_tokens
    ids, mask = rows(docs, n_calib, calib, "--calib text", at_most=calib_tokens is None)
    n = ids.shape[0]
    n_hold = max(1, int(round(heldout * n)))
    n_eval = 0 if eval_text is not None else n_hold
    if n - n_hold - n_eval < 1:
        raise CalibrationError(
            calib,
            f"{n} sequences of {seq} tokens are too few to split into train/held-out"
            f"{'' if eval_text else '/eval'} (give more text or a larger --calib-tokens)",
        )
    # deterministic split: held-out and eval rows spread over the text (every k-th row)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    hold_rows, eval_rows, train_rows = perm[:n_hold], perm[n_hold : n_hold + n_eval], perm[n_hold + n_eval :]

    def take(r: Tensor) -> Split:
        r = r.sort().values
        return Split(ids[r], None if mask is None else mask[r])

    train, hold = take(train_rows), take(hold_rows)
    if eval_text is not None:
        e_ids, e_mask = rows(cb.read_texts(eval_text), None, eval_text, "--eval text")
        e_ids = e_ids[: max(1, eval_tokens // seq)]
        e_mask = None if e_mask is None else e_mask[: e_ids.shape[0]]
        ev, src = Split(e_ids, e_mask), "eval"
    else:
        ev, src = take(eval_rows), "calib"
    prec, why = resolve_precision(precision, base.device)
    cal = Calibration(
        adapter,
        base,
        modes,
        train,
        hold,
        ev,
        src,
        None,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        precision=prec,
        precision_reason=why,
    )
    vocab = base.vocab_size
    k_train = vocab if vocab and vocab <= 2 * TRAIN_TOPK else TRAIN_TOPK
    k_eval = vocab if vocab and vocab <= 2 * EVAL_TOPK else EVAL_TOPK
    t1 = time.perf_counter()
    info: dict[str, Any] = {}
    if stats is None and stats_file is not None and Path(stats_file).is_file():
        stats, info = cb.load_stats(stats_file, adapter)
    if stats is None and weighted:
        hooks = cb.SigmaHooks(base, adapter.modules, sketch_rank, seed=seed)
        with hooks:
            cal._cache(train, k_train, "Σ statistics + teacher", sigma=hooks)
        stats, info = hooks.result()
        info.update({"base_model": str(base_model), "adapter_sha256": adapter.sha256, "seq_len": seq})
        target = save_stats_to if save_stats_to is not None else stats_file
        if target is not None:
            cb.save_stats(Path(target), stats, info)
            info["saved_to"] = str(target)
    else:
        cal._cache(train, k_train, "teacher (train)")
    t2 = time.perf_counter()
    cal._cache(hold, k_train, "teacher (held-out)")
    cal._cache(ev, k_eval, "teacher + base (eval)", base_pass=True)
    cal.stats = stats
    cal.stats_info = info
    train_tokens = train.tokens
    cal.timings = {
        "load_seconds": t_load,
        "stats_seconds": t2 - t1,
        "stats_tokens_per_s": train_tokens / max(t2 - t1, 1e-9),
        "prepare_seconds": time.perf_counter() - t0,
        "teacher_tokens": train.tokens + hold.tokens + ev.tokens,
    }
    return cal


# ------------------------------------------------------------------------------------ math
def _log_probs(logits: Tensor) -> Tensor:
    """Log-probabilities in fp32, one fused log-softmax (bf16 logits are upcast inside it; its
    backward is fused too: fewer passes over the (B, T, V) logits than logits − logsumexp).
    Teacher and student both go through it, so a student equal to the teacher has a KL of 0,
    not of rounding."""
    return torch.log_softmax(logits, -1, dtype=torch.float32)


def _next_token_ce(logp: Tensor, ids: Tensor) -> Tensor:
    """Mean CE of predicting ids[:, 1:] from logp[:, :-1]: logp (B, T, V), ids (B, T)."""
    return -logp[:, :-1].gather(-1, ids[:, 1:, None]).mean()


def _topk_kl(logp: Tensor, t_logp: Tensor, t_idx: Tensor | None) -> Tensor:
    """KL(p_t‖p_s) per token (B, T). logp: student log-probs (B, T, V) (:func:`_log_probs`);
    t_logp: teacher log-probs (B, T, k) of tokens t_idx (B, T, k), or of the
    whole vocabulary when t_idx is None. With a top-k cache the rest of the vocabulary is one bucket
    on both sides."""
    if t_idx is None:
        return (t_logp.exp() * (t_logp - logp)).sum(-1)
    s_k = logp.gather(-1, t_idx)  # (B, T, k)
    p_k = t_logp.exp()
    kl = (p_k * (t_logp - s_k)).sum(-1)
    rest_t = (1 - p_k.sum(-1)).clamp_min(1e-12)
    rest_s = (1 - s_k.exp().sum(-1)).clamp_min(1e-12)
    return kl + rest_t * (rest_t.log() - rest_s.log())


def _class_kl(t_logp: Tensor, s_logits: Tensor) -> Tensor:
    """KL over classes per sequence: t_logp (B, C) teacher log-probs, s_logits (B, C)."""
    s = torch.log_softmax(s_logits.float(), -1)
    return (t_logp.exp() * (t_logp - s)).sum(-1)


def _hidden_sq_err(h: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
    """Σ‖h − t‖² over valid tokens: h, t (B, T, H), mask (B, T)."""
    w = torch.ones(h.shape[:2], device=h.device) if mask is None else mask.to(h.device).float()
    return ((h - t) ** 2).sum(-1).mul(w).sum()


def _hidden_var(t: Tensor, mask: Tensor | None, chunk: int = 64) -> float:
    """E‖t − μ‖² over the valid tokens of t (N, T, H) (mask (N, T)), μ their mean; two passes in
    float64 over chunks of rows (no copy of t)."""
    w = torch.ones(t.shape[:2]) if mask is None else mask.float()
    n = float(w.sum())
    if n == 0:
        return 0.0
    mu = sum((t[s : s + chunk].double() * w[s : s + chunk, :, None]).sum((0, 1)) for s in range(0, t.shape[0], chunk))
    mu = mu / n
    sq = sum(
        ((t[s : s + chunk].double() - mu) ** 2).sum(-1).mul(w[s : s + chunk]).sum() for s in range(0, t.shape[0], chunk)
    )
    return float(sq) / n


@torch.no_grad()
def round_to(form: Form, dtype: torch.dtype) -> None:
    """Round the form's float parameters through the container dtype (what will be stored)."""
    if dtype == torch.float32:
        return
    for p in form.parameters():
        if p.is_floating_point():
            p.copy_(p.to(dtype).float())
