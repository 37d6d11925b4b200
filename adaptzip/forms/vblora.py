"""``vblora``: VB-LoRA (Li et al., NeurIPS 2024; PEFT's ``VBLORA``) — every length-b sub-vector of
every A row and B column is a convex mix of k vectors from one shared bank.

Shapes, per module i (r the global rank, n_in = in/b, n_out = out/b):

* bank (h×b), shared by all modules;
* A_i (r×in): sub-vector (j, t) = A_i[j, t·b:(t+1)·b] = Σ_{s<k} w[j,t,s] · bank[idx[j,t,s]]
  — mixes (r, n_in, b) reshaped to (r, in);
* B_i (out×r): sub-vector (t, j) = B_i[t·b:(t+1)·b, j] — mixes (n_out, r, b) transposed to
  (n_out, b, r) and reshaped to (out, r), exactly as PEFT's ``Linear._get_lora_matrices``;
* ΔŴ_i = B_i @ A_i, no scale (PEFT's VB-LoRA has none): the magnitude lives in the bank.

Two modes share ``factors``:

* **soft** (training): logits (r, n_in, h) and (n_out, r, h) per module, PEFT's formula
  ``w = softmax(topk(logits))`` over the top-k, so the selection may change as logits move;
* **hard** (after ``freeze``/``finalize``, and when loaded from a container): fixed indices
  (…, k) and trainable weight logits (…, k), w = softmax.

Stored (formats/forms/vblora.md): ``bank`` (h×b, container dtype), ``topk_indices`` (N×k, uint8
when h ≤ 256 else int16) and ``topk_weights`` (N×(k−1), fp16: the k−1 smallest weights; the
largest is 1 − their sum), N = Σ_i r·(in_i + out_i)/b sub-vectors in module order, A's (row-major
(r, n_in)) before B's ((n_out, r)).

Fit (weight space, Σ-weighted when ctx has statistics): rank-r balanced factors of each source
update from the factored SVD, rescaled so A and B sub-vectors carry the same RMS (the gauge
B A = (B c)(A / c)); bank initialised by a weighted, sign-invariant gain-shape k-means of those
sub-vectors (bank = ±g_m·d_m, so a k=2 convex mix reaches any t·d_m with |t| ≤ g_m; weights are
the partner factor's squared norms, which make sub-vector errors first-order ΔW errors), refined
by alternating the best convex code of every sub-vector (any segment between two bank vectors)
with a weighted least-squares bank; then Adam on the factored objective: bank + logits (soft, the
top-k may change), freeze the top-k, bank + weights (hard), weights rounded to their fp16 grid.
``fit_info`` records the init, soft and final hard errors. A random start (``init='random'``,
PEFT's) is kept for comparison. The fit runs on one thread (:func:`adaptzip.runtime.single_thread`).

One form, one file (hence over ~500 lines): the bank fit (k-means, convex codes,
least squares, the soft and hard phases) is part of the form and kept beside its layout.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .. import fit as fitter
from ..adapter import Adapter, ModuleInfo
from ..errors import ContainerError, OptionError
from ..runtime import single_thread
from . import svd as svd_form
from .base import FitContext, Form, TensorSpecs, register

Tensor = torch.Tensor
INIT_METHODS = ("kmeans", "random")
MAX_BANK = 2**15  # int16 indices
MIN_WEIGHT = 2.0**-24  # smallest fp16 subnormal: stored weights stay > 0, so their logs are finite
SOFT_LIMIT = 1 << 26  # most soft logits (N·h, fp32) the fit allocates; beyond, the top-k is fixed by the init


@dataclass
class VbloraConfig:
    bank: int = field(
        default=256, metadata={"help": "vectors in the shared bank h (indices are uint8 when h ≤ 256, else int16)"}
    )
    vector_len: int | None = field(
        default=None,
        metadata={
            "help": "sub-vector length b; must divide every module's in and out features (default: the largest such length ≤ 256, the paper's b)"
        },
    )
    topk: int = field(default=2, metadata={"help": "bank vectors mixed per sub-vector k (k−1 fp16 weights stored)"})
    rank: int | None = field(
        default=None,
        metadata={
            "help": "rank r of every module (default: the source's largest module rank; one global r as in PEFT)"
        },
    )
    init: str = field(
        default="kmeans",
        metadata={"help": "bank start: kmeans (gain-shape k-means of the balanced sub-vectors) or random (PEFT-like)"},
    )
    steps: int = field(default=150, metadata={"help": "max Adam steps with trainable top-k selection (soft logits)"})
    refit_steps: int = field(
        default=150, metadata={"help": "max Adam steps on bank + weights after freezing the top-k"}
    )
    lr: float = field(
        default=0.02,
        metadata={
            "help": "Adam learning rate of the fit (the bank is fitted at unit RMS, so one rate serves bank and logits)"
        },
    )

    def __post_init__(self):
        if not 1 <= self.topk:
            raise ValueError(f"topk must be ≥ 1, got {self.topk}")
        if not (max(2, self.topk) <= self.bank <= MAX_BANK):
            raise ValueError(f"bank must be between max(2, topk)={max(2, self.topk)} and {MAX_BANK}, got {self.bank}")
        if self.vector_len is not None and self.vector_len < 1:
            raise ValueError(f"vector_len must be ≥ 1, got {self.vector_len}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be ≥ 1, got {self.rank}")
        if self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {', '.join(INIT_METHODS)}, got {self.init!r}")
        if self.steps < 0 or self.refit_steps < 0:
            raise ValueError(f"steps and refit_steps must be ≥ 0, got {self.steps}, {self.refit_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def index_dtype(h: int) -> torch.dtype:
    """uint8 when every index < 256 fits, else int16 (h ≤ 2**15)."""
    return torch.uint8 if h <= 256 else torch.int16


def _divisors_desc(n: int) -> list[int]:
    return sorted((d for d in range(2, n + 1) if n % d == 0), reverse=True)


def check_vector_len(modules: Sequence[ModuleInfo], b: int, path=None) -> None:
    """OptionError naming the first module whose in or out features b does not divide, with the
    vector lengths that divide every module's dimensions."""
    for m in modules:
        if m.in_features % b or m.out_features % b:
            g = 0
            for x in modules:
                g = math.gcd(g, math.gcd(x.in_features, x.out_features))
            ok = _divisors_desc(g)[:6]
            hint = (
                f"values that divide every module's dimensions: {', '.join(map(str, ok))}"
                if ok
                else "no vector length > 1 divides every module's dimensions"
            )
            raise OptionError(
                path,
                f"vblora: --vector-len {b} does not divide module {m.name} "
                f"(in {m.in_features}, out {m.out_features}); {hint}",
            )


def resolve_vector_len(modules: Sequence[ModuleInfo], config: VbloraConfig, path=None) -> VbloraConfig:
    """The config with a concrete b: the given one (checked), or the largest length ≤ 256 that
    divides every module's in and out features (256 for Llama-7B/Mistral shapes, as in the paper;
    192 for SmolLM2-135M and MiniLM). The manifest records the concrete value."""
    if config.vector_len is not None:
        check_vector_len(modules, config.vector_len, path)
        return config
    g = 0
    for m in modules:
        g = math.gcd(g, math.gcd(m.in_features, m.out_features))
    ok = [d for d in _divisors_desc(g) if d <= 256]
    if not ok:
        raise OptionError(
            path,
            "vblora: no sub-vector length > 1 divides every module's in and out features "
            f"(their gcd is {g}); VB-LoRA cannot tile these modules",
        )
    return dataclasses.replace(config, vector_len=ok[0])


def default_rank(modules: Sequence[ModuleInfo], config: VbloraConfig) -> int:
    return config.rank if config.rank is not None else max(m.rank for m in modules)


def n_subvectors(modules: Sequence[ModuleInfo], r: int, b: int) -> int:
    """N = Σ_i r·(in_i + out_i)/b."""
    return sum(r * (m.in_features + m.out_features) // b for m in modules)


def stored_bytes(n_sub: int, h: int, b: int, k: int, float_bytes: float) -> int:
    """Payload bytes: bank h·b floats (``float_bytes`` each; fractional when quantised) + N·k
    indices + N·(k−1) fp16 weights."""
    ib = torch.empty(0, dtype=index_dtype(h)).element_size()
    return math.ceil(h * b * float_bytes) + n_sub * k * ib + n_sub * (k - 1) * 2


def _bank_step(h: int) -> int:
    """Granularity of a budget-chosen bank size: 2^(⌊log2 h⌋ − 5), at least 1 (1 below 64)."""
    return max(1, 2 ** (int(h).bit_length() - 1 - 5))


def _pow2_scale(x: Tensor) -> float:
    """A power of two near the RMS of x (1.0 for a zero tensor): dividing and multiplying by it is
    exact, so the fit's unit-RMS bank round-trips bit for bit."""
    rms = float(x.double().pow(2).mean().sqrt()) if x.numel() else 0.0
    return 2.0 ** round(math.log2(rms)) if rms > 0 and math.isfinite(rms) else 1.0


def mixed_factors(bank: Tensor, ia: Tensor, wa: Tensor, ib: Tensor, wb: Tensor, m: ModuleInfo) -> tuple[Tensor, Tensor]:
    """(B out×r, A r×in) of module m from the bank (h×b), its A indices and weights (r, n_in, k)
    and B ones (n_out, r, k): each sub-vector is Σ_s w_s · bank[idx_s]; A's mixes (r, n_in, b) are
    reshaped to (r, in), B's (n_out, r, b) transposed to (n_out, b, r) and reshaped to (out, r)."""
    A = (wa.unsqueeze(-1) * bank[ia]).sum(-2).reshape(ia.shape[0], m.in_features)
    B = (wb.unsqueeze(-1) * bank[ib]).sum(-2).transpose(1, 2).reshape(m.out_features, ib.shape[1])
    return B, A


class CompactVblora(nn.Module):
    """A vblora container's tensors as they are stored, for serving (:mod:`adaptzip.peft`): the
    bank (h×b), ``topk_indices`` (N×k, uint8/int16 buffer) and ``topk_weights`` (N×(k−1), the
    k−1 smallest; the largest is 1 − their sum) — nothing per module is expanded. ``factors(i)``
    mixes module i's sub-vectors by :func:`mixed_factors`, the form's own code. Bank and weights
    are trainable with the top-k selection fixed (PEFT's own VB-LoRA, ``expand --to
    peft-vblora``, trains the dense logits)."""

    def __init__(self, modules: Sequence[ModuleInfo], config: VbloraConfig, state: dict, tensors: dict[str, Tensor]):
        super().__init__()
        self.modules_info = list(modules)
        self.rank, self.b, self.k = int(state["rank"]), config.vector_len, config.topk
        self.vector_bank = nn.Parameter(tensors["bank"].detach().float().clone().contiguous())
        self.register_buffer("topk_indices", tensors["topk_indices"].detach().clone().contiguous())
        w = tensors["topk_weights"] if self.k > 1 else torch.zeros(self.topk_indices.shape[0], 0)
        self.topk_weights = nn.Parameter(w.detach().float().clone().contiguous())
        self._offsets = []
        off = 0
        for m in self.modules_info:
            na, nb = self.rank * (m.in_features // self.b), (m.out_features // self.b) * self.rank
            self._offsets.append((off, na, nb))
            off += na + nb

    def _weights(self, lo: int, n: int) -> Tensor:
        head = self.topk_weights[lo : lo + n]
        return torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1)

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        m, (off, na, nb) = self.modules_info[i], self._offsets[i]
        r, k = self.rank, self.k
        idx = self.topk_indices[off : off + na + nb].long()  # this module's rows only
        ia, ib = idx[:na].reshape(r, -1, k), idx[na:].reshape(-1, r, k)
        wa = self._weights(off, na).reshape(r, -1, k)
        wb = self._weights(off + na, nb).reshape(-1, r, k)
        return mixed_factors(self.vector_bank, ia, wa, ib, wb, m)


@register
class VbloraForm(Form):
    name = "vblora"
    summary = "VB-LoRA: A/B sub-vectors are top-k convex mixes of one shared vector bank (PEFT VBLORA export)"
    Config = VbloraConfig
    native_tuner = "vblora"

    @classmethod
    def sharing(cls, modules, config, state, metrics):
        return {
            "sharing_used": True,
            "why": f"every sub-vector mixes {config.topk} of one bank of {config.bank} vectors",
        }

    @classmethod
    def native_exports(cls):
        from .vblora_peft import to_peft_vblora  # PEFT's own VB-LoRA layout: loaded only when asked for

        return {**super().native_exports(), "peft-vblora": to_peft_vblora}

    def __init__(
        self,
        modules: Sequence[ModuleInfo],
        config: VbloraConfig,
        rank: int,
        bank: Tensor,
        *,
        logits: list[tuple[Tensor, Tensor]] | None = None,
        topk: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None,
    ):
        """``bank`` (h×b). Soft mode: ``logits`` [(L_A (r, n_in, h), L_B (n_out, r, h))] per module.
        Hard mode: ``topk`` [(idx_A (r, n_in, k), wlog_A, idx_B (n_out, r, k), wlog_B)]."""
        super().__init__(modules, config)
        self.rank = int(rank)
        self.b = config.vector_len
        self.k = config.topk
        self.vector_bank = nn.Parameter(bank.float().contiguous())  # (h, b); × bank_scale (1 outside the fit)
        self.bank_scale = 1.0
        self.logits_A = nn.ParameterList()
        self.logits_B = nn.ParameterList()
        self.wlog_A = nn.ParameterList()
        self.wlog_B = nn.ParameterList()
        self.state_info = {"rank": self.rank, "subvectors": n_subvectors(modules, self.rank, self.b)}
        self.timings: dict[str, float] = {}  # wall seconds of the fit's phases (not stored: not deterministic)
        if logits is not None:
            self._set_soft(logits)
        elif topk is not None:
            self._set_hard(topk)
        else:
            raise ValueError("VbloraForm needs logits (soft) or top-k indices and weights (hard)")

    # ------------------------------------------------------------------ modes
    @property
    def soft(self) -> bool:
        return len(self.logits_A) > 0

    def _set_soft(self, logits: list[tuple[Tensor, Tensor]]) -> None:
        self._clear()
        for la, lb in logits:
            self.logits_A.append(nn.Parameter(la.float().contiguous()))
            self.logits_B.append(nn.Parameter(lb.float().contiguous()))

    def _set_hard(self, topk: list[tuple[Tensor, Tensor, Tensor, Tensor]]) -> None:
        self._clear()
        for i, (ia, wa, ib, wb) in enumerate(topk):
            self.register_buffer(f"idx_A_{i}", ia.long().contiguous())
            self.register_buffer(f"idx_B_{i}", ib.long().contiguous())
            self.wlog_A.append(nn.Parameter(wa.float().contiguous()))
            self.wlog_B.append(nn.Parameter(wb.float().contiguous()))

    def _clear(self) -> None:
        self.logits_A = nn.ParameterList()
        self.logits_B = nn.ParameterList()
        self.wlog_A = nn.ParameterList()
        self.wlog_B = nn.ParameterList()
        for name in [n for n in self._buffers if n.startswith(("idx_A_", "idx_B_"))]:
            del self._buffers[name]

    def idx(self, i: int) -> tuple[Tensor, Tensor]:
        """Hard-mode indices of module i: (r, n_in, k) and (n_out, r, k)."""
        return self._buffers[f"idx_A_{i}"], self._buffers[f"idx_B_{i}"]

    @torch.no_grad()
    def freeze(self) -> None:
        """Soft → hard: keep each sub-vector's top-k of its logits (and their logits as weights)."""
        if not self.soft:
            return
        topk = []
        for la, lb in zip(self.logits_A, self.logits_B):
            va, ia = la.topk(self.k, dim=-1)
            vb, ib = lb.topk(self.k, dim=-1)
            topk.append((ia, va, ib, vb))
        self._set_hard(topk)

    @torch.no_grad()
    def unfreeze(self, margin: float = 4.0) -> None:
        """Hard → soft (e.g. before distillation that may change the selection): full logits with
        the selected entries at log w and every other entry ``margin`` below the sub-vector's
        smallest selected logit, so the forward pass is unchanged."""
        if self.soft:
            return
        h = self.vector_bank.shape[0]
        logits = []
        for i in range(len(self.modules_info)):
            pair = []
            for idx, wl in zip(self.idx(i), (self.wlog_A[i], self.wlog_B[i])):
                lw = torch.log_softmax(wl, -1)
                full = (lw.min(-1, keepdim=True).values - margin).expand(*idx.shape[:-1], h).clone()
                pair.append(full.scatter_(-1, idx, lw))
            logits.append(tuple(pair))
        self._set_soft(logits)

    @torch.no_grad()
    def finalize(self) -> None:
        """Freeze the top-k (if soft) and put the weights on the stored grid: sorted ascending,
        the k−1 smallest rounded to fp16 (≥ 2⁻²⁴), the largest = 1 − their sum; weight logits
        become log w, so this form and one read back from the container agree bit for bit."""
        self.freeze()
        for i in range(len(self.modules_info)):
            ia, ib = self.idx(i)
            for idx, wl, name in ((ia, self.wlog_A[i], f"idx_A_{i}"), (ib, self.wlog_B[i], f"idx_B_{i}")):
                w, order = torch.softmax(wl, -1).sort(dim=-1, stable=True)
                self._buffers[name] = idx.gather(-1, order).contiguous()
                wl.copy_(_grid_weights(w[..., :-1]).log())

    # ------------------------------------------------------------------ use
    def bank(self) -> Tensor:
        """The bank (h×b), differentiable in ``vector_bank``."""
        return self.vector_bank if self.bank_scale == 1.0 else self.vector_bank * self.bank_scale

    @torch.no_grad()
    def _rescale(self, scale: float) -> None:
        """Store the bank as ``vector_bank`` × ``scale`` (powers of two: exact). The fit runs at a
        unit-RMS scale so one Adam learning rate serves bank and logits; it ends at 1, so the
        stored bank is the parameter itself (what quantisation-aware training hooks onto)."""
        self.vector_bank.mul_(self.bank_scale / scale)
        self.bank_scale = scale

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        if self.soft:
            va, ia = self.logits_A[i].topk(self.k, dim=-1)
            vb, ib = self.logits_B[i].topk(self.k, dim=-1)
        else:
            (ia, ib), va, vb = self.idx(i), self.wlog_A[i], self.wlog_B[i]
        return mixed_factors(self.bank(), ia, torch.softmax(va, -1), ib, torch.softmax(vb, -1), self.modules_info[i])

    @classmethod
    def live(cls, modules, config, state, tensors) -> CompactVblora:
        return CompactVblora(modules, config, state, tensors)

    def trainable_groups(self) -> list[dict]:
        """Two groups: the bank, with ``lr_scale`` = its RMS (Adam steps are absolute, the bank's
        values are small: the run's learning rate then moves it as it moves the O(1) logits), and
        the logits (soft) or top-k weight logits (hard)."""
        logits = list(self.logits_A) + list(self.logits_B) if self.soft else list(self.wlog_A) + list(self.wlog_B)
        ids = {id(p) for p in logits}
        bank = [p for p in self.parameters() if id(p) not in ids]  # the leaf also under a QAT parametrisation
        rms = float(self.bank().detach().double().pow(2).mean().sqrt()) or 1.0
        return [{"params": bank, "name": "vblora_bank", "lr_scale": rms}, {"params": logits, "name": "vblora_logits"}]

    def topk_arrays(self) -> tuple[Tensor, Tensor]:
        """(indices (N×k) long, weights (N×k) fp32) in stored order, from the hard mode (weights
        = softmax of the weight logits; after ``finalize`` they lie on the stored grid)."""
        if self.soft:
            raise RuntimeError("vblora: call finalize() before reading the top-k arrays")
        idx, w = [], []
        for i in range(len(self.modules_info)):
            ia, ib = self.idx(i)
            for ix, wl in ((ia, self.wlog_A[i]), (ib, self.wlog_B[i])):
                idx.append(ix.reshape(-1, self.k))
                w.append(torch.softmax(wl.detach(), -1).reshape(-1, self.k))
        return torch.cat(idx), torch.cat(w)

    def tensors(self) -> dict[str, Tensor]:
        """bank, topk_indices, topk_weights; finalizes first (idempotent), so what is stored is
        exactly what this form computes."""
        self.finalize()
        idx, w = self.topk_arrays()
        h = self.vector_bank.shape[0]
        out = {"bank": self.bank().detach(), "topk_indices": idx.to(index_dtype(h)).contiguous()}
        if self.k > 1:
            out["topk_weights"] = w[:, :-1].to(torch.float16).contiguous()
        return out

    # ------------------------------------------------------------------ storage
    @classmethod
    def tensor_specs(cls, modules, config, state) -> TensorSpecs:
        n, h, k = int(state["subvectors"]), config.bank, config.topk
        specs: TensorSpecs = {"bank": ((h, config.vector_len), None), "topk_indices": ((n, k), index_dtype(h))}
        if k > 1:
            specs["topk_weights"] = ((n, k - 1), torch.float16)
        return specs

    @classmethod
    def from_tensors(cls, modules, config, state, tensors) -> VbloraForm:
        r, b, k, h = int(state["rank"]), config.vector_len, config.topk, config.bank
        idx = tensors["topk_indices"].long()
        if k > 1:
            w = _grid_weights(tensors["topk_weights"])
        else:
            w = torch.ones(idx.shape[0], 1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= h):
            raise ContainerError(None, f"vblora: top-k index out of range [0, {h}) (max {int(idx.max())})")
        if k > 1 and bool((idx.sort(1).values.diff(dim=1) == 0).any()):
            raise ContainerError(None, "vblora: a sub-vector repeats a bank index among its top-k")
        topk, off = [], 0
        for m in modules:
            na, nb = r * (m.in_features // b), (m.out_features // b) * r
            ia, wa = idx[off : off + na].reshape(r, -1, k), w[off : off + na].reshape(r, -1, k).log()
            off += na
            ib, wb = idx[off : off + nb].reshape(-1, r, k), w[off : off + nb].reshape(-1, r, k).log()
            off += nb
            topk.append((ia, wa, ib, wb))
        return cls(modules, config, r, tensors["bank"].float(), topk=topk)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def config_for_budget(
        cls, adapter: Adapter, config: VbloraConfig, budget_bytes: int, float_bytes: int, ctx: FitContext
    ) -> VbloraConfig:
        """The largest bank h (up to 2¹⁵ and to N·k, the top-k slots there are) whose payload fits,
        at the configured rank (lowered, down to 1, only when even a bank of max(2, k) vectors
        does not fit); b (as :func:`resolve_vector_len` gives it) and k stay as given. h is
        rounded down to a multiple of :func:`_bank_step` (≤ 1/32 of h), so that the few hundred
        header bytes ``fit_to_budget`` gives back after a first fit rarely change it (a change
        costs a second fit). The choice is reported as ``budget_choice``."""
        config = resolve_vector_len(adapter.modules, config, adapter.path)
        b, k = config.vector_len, config.topk
        r0 = default_rank(adapter.modules, config)
        for r in range(r0, 0, -1):
            n = n_subvectors(adapter.modules, r, b)
            best = None
            for lo, hi in ((max(2, k), 256), (257, MAX_BANK)):
                fixed = stored_bytes(n, lo, b, k, float_bytes) - lo * b * float_bytes
                h = int(
                    min(hi, n * k, (budget_bytes - fixed) // (b * float_bytes))
                )  # > N·k vectors could never all be used
                if h >= lo:
                    best = h
            if best is not None:
                step = _bank_step(best)
                best = max(best // step * step, max(2, k))
                ctx.cache[("vblora", "budget", id(adapter))] = {
                    "bank": best,
                    "rank": r,
                    "vector_len": b,
                    "topk": k,
                    "payload_bytes": stored_bytes(n, best, b, k, float_bytes),
                    "budget_payload_bytes": int(budget_bytes),
                    "next_bank_payload_bytes": stored_bytes(n, best + step, b, k, float_bytes)
                    if best + step <= MAX_BANK
                    else None,
                }
                return dataclasses.replace(config, bank=best, rank=r)
        need = stored_bytes(n_subvectors(adapter.modules, 1, b), max(2, k), b, k, float_bytes)
        raise OptionError(
            adapter.path,
            f"vblora: a payload of {budget_bytes} bytes is too small: rank 1 with a bank of "
            f"{max(2, k)} vectors of length {b} needs {need}; raise --budget or --vector-len",
        )

    @classmethod
    def fit(cls, adapter: Adapter, config: VbloraConfig, ctx: FitContext) -> VbloraForm:
        """Balanced sub-vectors → k-means + convex-code alternation (``init='kmeans'``) or PEFT's
        random start → Adam on bank + logits (soft; skipped when N·h > ``SOFT_LIMIT``) → freeze
        the top-k → Adam on bank + weights → weights on their fp16 grid. Runs on one thread (see
        :func:`adaptzip.runtime.single_thread`); ``timings`` gets the phases' wall seconds."""
        with single_thread():  # also makes the reductions, so the bytes, independent of the caller's threads
            return cls._fit(adapter, config, ctx)

    @classmethod
    def _fit(cls, adapter: Adapter, config: VbloraConfig, ctx: FitContext) -> VbloraForm:
        t0 = time.perf_counter()
        modules = adapter.modules
        config = resolve_vector_len(modules, config, adapter.path)
        b, k, h = config.vector_len, config.topk, config.bank
        r = default_rank(modules, config)
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            parts = [_balanced_subvectors(s, m, r, b) for s, m in zip(svd_form.spectra(adapter, ctx), modules)]
            X = torch.cat([x for p in parts for x in (p[0], p[2])])  # (N, b)
            wts = torch.cat([w for p in parts for w in (p[1], p[3])])  # (N,)
            soft = config.steps > 0 and X.shape[0] * h <= SOFT_LIMIT
            if config.init == "kmeans":
                bank, idx, wt, init_info = _kmeans_start(X, wts, h, k, gen)
                codes = _logits_from_codes(X, bank, idx, wt, k, full=soft)
            else:
                bank, codes = _random_start(X, h, k, gen, full=soft)
                init_info = {}
            del X, wts
        sizes = [n for p in parts for n in (p[0].shape[0], p[2].shape[0])]
        shapes = [s for m in modules for s in ((r, m.in_features // b), (m.out_features // b, r))]
        del parts
        if soft:
            L = [x.reshape(*sh, h) for x, sh in zip(codes.split(sizes), shapes)]
            form = cls(modules, config, r, bank, logits=list(zip(L[0::2], L[1::2])))
        else:
            I = [x.reshape(*sh, k) for x, sh in zip(codes[0].split(sizes), shapes)]
            V = [x.reshape(*sh, k) for x, sh in zip(codes[1].split(sizes), shapes)]
            form = cls(modules, config, r, bank, topk=list(zip(I[0::2], V[0::2], I[1::2], V[1::2])))
        del codes
        form._rescale(_pow2_scale(bank))  # unit RMS while fitting
        info: dict = {"init": config.init, "rank": r, **init_info}
        tg = fitter.targets(adapter, ctx)
        batched = None if any(t.Sigma is not None for t in tg) else _Batched(form, tg)

        def rel() -> float:
            if batched is None:
                return fitter.evaluate(form, adapter, ctx).rel_error
            with torch.no_grad():
                return math.sqrt(max(float(batched()), 0.0))

        info["init_rel_error"] = rel()
        form.timings = {"init": time.perf_counter() - t0}
        if soft:
            hist = fitter.optimise(
                form, adapter, ctx, lr=config.lr, max_steps=config.steps, label="vblora soft", loss_fn=batched
            )
            info["soft_steps"] = len(hist)
            info["soft_rel_error"] = rel()
        else:
            info["soft_steps"] = 0
            info["soft_rel_error"] = None
            if config.steps > 0:
                info["soft_skipped"] = (
                    f"N·h = {sum(sizes)}·{h} soft logits exceed {SOFT_LIMIT}; top-k fixed by the init"
                )
        form.timings["soft"] = time.perf_counter() - t0 - form.timings["init"]
        form.freeze()
        hist = fitter.optimise(
            form, adapter, ctx, lr=config.lr, max_steps=config.refit_steps, label="vblora hard", loss_fn=batched
        )
        info["hard_steps"] = len(hist)
        form.finalize()
        form._rescale(1.0)
        info["hard_rel_error"] = rel()
        form.timings["hard"] = time.perf_counter() - t0 - form.timings["init"] - form.timings["soft"]
        note = ctx.cache.get(("vblora", "budget", id(adapter)))
        if note is not None and (note["bank"], note["rank"]) == (h, r):
            info["budget_choice"] = note
        form.fit_info = info
        return form


class _Batched:
    """The relative factored objective Σ_m ‖ΔW_m − B̂_m Â_m‖² / Σ_m ‖ΔW_m‖² of a form (no Σ),
    computed for all modules at once: every sub-vector is mixed by one ``embedding_bag`` over
    the codes concatenated group by group, and modules of the same (in, out) are stacked so their
    Gram products are batched matmuls. Same value as ``fit.module_sq_errors`` (up to rounding),
    a few hundred small ops fewer per step."""

    def __init__(self, form: VbloraForm, tg: list):
        self.form = form
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, m in enumerate(form.modules_info):
            by_shape.setdefault((m.in_features, m.out_features), []).append(i)
        r, b = form.rank, form.b
        self.groups, self.sizes, n2 = [], [], 0.0
        for (n_in, n_out), ids in by_shape.items():
            rt = max(tg[i].A.shape[0] for i in ids)
            Bt = torch.zeros(len(ids), n_out, rt)
            At = torch.zeros(len(ids), rt, n_in)
            for g, i in enumerate(ids):
                Bt[g, :, : tg[i].B.shape[1]] = tg[i].B
                At[g, : tg[i].A.shape[0]] = tg[i].A
            n2 += sum(tg[i].norm2 for i in ids)
            self.groups.append((ids, n_in, n_out, Bt.transpose(1, 2).contiguous(), At.transpose(1, 2).contiguous()))
            self.sizes += [len(ids) * r * (n_in // b), len(ids) * (n_out // b) * r]
        self.n2 = n2
        self.total = max(n2, 1e-30)

    def _codes(self) -> tuple[Tensor, Tensor]:
        """(indices, logits) of every sub-vector, (N, k) each, in group order (soft mode: the
        top-k of each module's logits, taken per module so the (N, h) logits are never copied)."""
        f, k = self.form, self.form.k
        idx, val = [], []
        for ids, *_ in self.groups:
            for part in (0, 1):
                for i in ids:
                    if f.soft:
                        v, ix = (f.logits_A, f.logits_B)[part][i].topk(k, dim=-1)
                    else:
                        ix, v = f.idx(i)[part], (f.wlog_A, f.wlog_B)[part][i]
                    idx.append(ix.reshape(-1, k))
                    val.append(v.reshape(-1, k))
        return torch.cat(idx), torch.cat(val)

    def __call__(self) -> Tensor:
        f, r, b = self.form, self.form.rank, self.form.b
        idx, val = self._codes()
        mixed = F.embedding_bag(idx, f.bank(), per_sample_weights=torch.softmax(val, -1), mode="sum")  # (N, b)
        pieces = mixed.split(self.sizes)
        err = mixed.new_tensor(self.n2)
        for g, (ids, n_in, n_out, BtT, AtT) in enumerate(self.groups):
            G = len(ids)
            A = pieces[2 * g].view(G, r, n_in)  # (G, r, n_in/b, b) → (G, r, in)
            B = pieces[2 * g + 1].view(G, n_out // b, r, b).transpose(2, 3).reshape(G, n_out, r)  # (G, out, r)
            inner = ((BtT @ B) * (A @ AtT).transpose(1, 2)).sum()  # Σ tr(Btᵀ B̂ · Â Atᵀ)
            own = ((B.transpose(1, 2) @ B) * (A @ A.transpose(1, 2))).sum()  # Σ ‖B̂ Â‖²
            err = err - 2 * inner + own
        return err / self.total


# ---------------------------------------------------------------------- helpers
def _grid_weights(w_head: Tensor) -> Tensor:
    """The k stored weights from the k−1 smallest: rounded to fp16 (≥ 2⁻²⁴) and read back in fp32,
    the largest = 1 − their sum. w_head (..., k−1) → (..., k) fp32."""
    head = w_head.float().clamp_min(MIN_WEIGHT).to(torch.float16).float()
    return torch.cat([head, 1 - head.sum(-1, keepdim=True)], -1)


def _balanced_subvectors(s, m: ModuleInfo, r: int, b: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rank-r balanced factors of module m's update cut into sub-vectors, with their weights.

    B = U√S·c, A = √S·Vh/c with c = (out/in)^¼, so that A and B sub-vectors have the same RMS
    (‖b_j‖ = ‖a_j‖ before the rescale). Returns X_A (r·n_in, b) in (r, n_in) order, w_A (r·n_in,),
    X_B (n_out·r, b) in (n_out, r) order, w_B: a sub-vector's weight is the squared norm of its
    partner (the B column for an A row, the A row for a B column), so weighted sub-vector errors
    are first-order ΔW errors."""
    B, A = s.truncate(r)  # (out, k'), (k', in), k' = min(r, rank of the update)
    if B.shape[1] < r:  # pad the directions the source does not have with zeros
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1)
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])], 0)
    c = (m.out_features / m.in_features) ** 0.25
    B, A = B * c, A / c
    xa = A.reshape(r, m.in_features // b, b).reshape(-1, b)  # (r·n_in, b)
    xb = B.reshape(m.out_features // b, b, r).transpose(1, 2).reshape(-1, b)  # (n_out, b, r) → (n_out·r, b)
    wa = B.pow(2).sum(0)[:, None].expand(r, m.in_features // b).reshape(-1)  # ‖b_j‖² for A row j
    wb = A.pow(2).sum(1)[None, :].expand(m.out_features // b, r).reshape(-1)  # ‖a_j‖² for B column j
    return xa.float(), wa.float(), xb.float(), wb.float()


def _gain_shape_kmeans(X: Tensor, w: Tensor, M: int, gen: torch.Generator, iters: int = 12) -> Tensor:
    """Weighted, sign-invariant gain-shape k-means: M unit directions D (M×b) maximising
    Σ_n w_n max_m ⟨x_n, d_m⟩². Seeds drawn ∝ w‖x‖²; each update is one power step of the
    cluster's weighted scatter (d_m ∝ Σ w t x); empty clusters are re-seeded with the worst-coded
    sub-vectors. Returns D (min(M, N)×b)."""
    N, b = X.shape
    energy = w.double() * X.double().pow(2).sum(1)
    p = energy + max(float(energy.max()), 1e-300) * 1e-12
    M = min(M, N)
    D = X[torch.multinomial(p, M, replacement=False, generator=gen)]
    D = D / D.norm(dim=1, keepdim=True).clamp_min(1e-30)
    for _ in range(iters):
        S = X @ D.T  # (N, M)
        a = S.abs().argmax(1)
        t = S.gather(1, a[:, None]).squeeze(1)
        Dn = torch.zeros_like(D).index_add_(0, a, (w * t)[:, None] * X)
        nrm = Dn.norm(dim=1)
        dead = nrm <= 1e-30
        if bool(dead.any()):
            resid = w * (X.pow(2).sum(1) - t * t)
            Dn[dead] = X[resid.topk(int(dead.sum())).indices]
            nrm = Dn.norm(dim=1)
        D = Dn / nrm[:, None].clamp_min(1e-30)
    return D


def _kmeans_start(
    X: Tensor,
    w: Tensor,
    h: int,
    k: int,
    gen: torch.Generator,
    tol: float = 1e-3,
    sample: int = 16384,
    work: int = 1 << 18,
) -> tuple[Tensor, Tensor, Tensor, dict]:
    """Bank (h×b) and convex codes (idx, wt: (N×k'), k' = min(k, 2)) of the balanced sub-vectors
    X (N×b) with weights w (N,).

    1. Gain-shape k-means for h//2 directions (on a seeded subset of ``sample`` rows when N is
       larger); every row goes to its best direction m with gain t, bank = [g_m d_m; −g_m d_m]
       (zero rows when h is odd or > 2N) with g_m the largest |t| of cluster m, so every row lies
       on the segment between a ± pair.
    2. Alternate on all rows (the weighted sub-vector objective Σ w‖x − Σ_s wt_s bank[i_s]‖² never
       rises): best convex code per row (:func:`_convex_codes`: any segment between two bank
       vectors for k ≥ 2), then the bank by weighted least squares (:func:`_bank_lstsq`); at most
       min(12, max(2, ``work``/N)) rounds, fewer when a round gains less than ``tol``."""
    N, b = X.shape
    Xs, ws = X, w
    if N > sample:
        pick = torch.randperm(N, generator=gen)[:sample].sort().values
        Xs, ws = X[pick], w[pick]
    D = _gain_shape_kmeans(Xs, ws, h // 2, gen)
    M = D.shape[0]
    S = X @ D.T  # (N, M)
    a = S.abs().argmax(1)
    t = S.gather(1, a[:, None]).squeeze(1)
    del S
    g = torch.zeros(M).scatter_reduce_(0, a, t.abs(), reduce="amax", include_self=True)
    bank = torch.zeros(h, b)
    bank[:M] = g[:, None] * D
    bank[M : 2 * M] = -g[:, None] * D
    if k == 1:
        idx, wt = torch.where(t >= 0, a, a + M)[:, None], torch.ones(N, 1)
    else:
        ratio = torch.where(g[a] > 0, t / g[a].clamp_min(1e-30), torch.zeros_like(t)).clamp(-1, 1)
        idx, wt = torch.stack([a, a + M], 1), torch.stack([(1 + ratio) / 2, (1 - ratio) / 2], 1)
    total = max(float((w * X.pow(2).sum(1)).double().sum()), 1e-30)
    err = _code_error(X, w, bank, idx, wt) / total
    info = {"kmeans_rel_error": math.sqrt(err)}
    rounds, max_rounds = 0, min(12, max(2, work // max(N, 1)))
    for rounds in range(1, max_rounds + 1):  # noqa: B007  (the rounds run are reported after the loop)
        idx, wt = _convex_codes(X, bank, k, idx, wt)
        bank = _bank_lstsq(X, w, idx, wt, bank)
        new = _code_error(X, w, bank, idx, wt) / total
        done = new > err * (1 - tol)
        err = min(err, new)
        if done:
            break
    info.update(alternations=rounds, subvector_rel_error=math.sqrt(err))
    return bank, idx, wt, info


def _code_error(X: Tensor, w: Tensor, bank: Tensor, idx: Tensor, wt: Tensor) -> float:
    """Σ_n w_n ‖x_n − Σ_s wt[n,s] bank[idx[n,s]]‖²."""
    err = 0.0
    for s in range(0, X.shape[0], _CHUNK):
        R = X[s : s + _CHUNK] - (wt[s : s + _CHUNK, :, None] * bank[idx[s : s + _CHUNK]]).sum(1)
        err += float((w[s : s + _CHUNK] * R.pow(2).sum(1)).double().sum())
    return err


_CHUNK = 2048  # rows per block in the code search (memory: CHUNK × anchors × h floats per temporary)


def _convex_codes(
    X: Tensor,
    bank: Tensor,
    k: int,
    idx: Tensor | None = None,
    wt: Tensor | None = None,
    anchors: int = 4,
    partners: int = 256,
) -> tuple[Tensor, Tensor]:
    """The best convex code of every row of X (N×b) from the bank (h×b).

    k = 1: the nearest bank vector. k ≥ 2: the best point on a segment w·v_i + (1−w)·v_j, for
    the ``anchors`` bank vectors i of largest ⟨x, v_i⟩ (one end of a good segment must have
    ⟨x, v⟩ ≳ ‖x‖²) and, as partners j, every bank vector when h ≤ ``partners``, else the
    partners/2 of largest and the partners/2 of smallest ⟨x, v_j⟩ (segments through x towards
    the far side: the ± pairs of the start are among them). Each (i, j) is scored exactly from
    the Gram matrix, O(anchors·partners) per row. A row keeps its current code (``idx``, ``wt``,
    (N×k'), if given) unless the new one is better.
    Returns idx (N×k') long, wt (N×k') with k' = min(k, 2), rows summing to 1."""
    h = bank.shape[0]
    G = bank @ bank.T
    d = G.diagonal()
    out_i, out_w = [], []
    for s in range(0, X.shape[0], _CHUNK):
        Xc = X[s : s + _CHUNK]
        n = Xc.shape[0]
        P = Xc @ bank.T  # (n, h): ⟨x, v_j⟩
        xx = Xc.pow(2).sum(1)
        if k == 1:
            e = xx[:, None] - 2 * P + d
            best = e.argmin(1)
            cand_i, cand_w, cand_e = best[:, None], torch.ones(n, 1), e.gather(1, best[:, None]).squeeze(1)
        else:
            anc = P.topk(min(anchors, h), dim=1).indices  # (n, c)
            if h <= partners:
                J = torch.arange(h).expand(n, h)  # (n, p): every bank vector
            else:
                J = torch.cat(
                    [
                        P.topk(partners // 2, dim=1).indices,
                        P.topk(partners - partners // 2, dim=1, largest=False).indices,
                    ],
                    1,
                )
            Pj, dj = P.gather(1, J)[:, None, :], d[J][:, None, :]  # (n, 1, p)
            Gij = G[anc[:, :, None], J[:, None, :]]  # (n, c, p)
            num = P.gather(1, anc)[:, :, None] - Pj - Gij + dj  # ⟨x − v_j, v_i − v_j⟩
            den = (d[anc][:, :, None] - 2 * Gij + dj).clamp_min(1e-30)  # ‖v_i − v_j‖²
            wa = (num / den).clamp(0, 1)  # weight on the anchor i
            e = xx[:, None, None] - 2 * Pj + dj - 2 * wa * num + wa * wa * den  # ‖x − v_j − wa(v_i − v_j)‖²
            e.masked_fill_(J[:, None, :] == anc[:, :, None], float("inf"))  # j ≠ i
            p = J.shape[1]
            best = e.reshape(n, -1).argmin(1)
            ai = anc.gather(1, (best // p)[:, None]).squeeze(1)
            aj = J.gather(1, (best % p)[:, None]).squeeze(1)
            wb = wa.reshape(n, -1).gather(1, best[:, None]).squeeze(1)
            cand_i, cand_w = torch.stack([ai, aj], 1), torch.stack([wb, 1 - wb], 1)
            cand_e = e.reshape(n, -1).gather(1, best[:, None]).squeeze(1)
        if idx is not None and wt is not None:
            ic, wc = idx[s : s + _CHUNK], wt[s : s + _CHUNK]
            keep = ((Xc - (wc[:, :, None] * bank[ic]).sum(1)).pow(2).sum(1) <= cand_e)[:, None]
            cand_i, cand_w = torch.where(keep, ic, cand_i), torch.where(keep, wc, cand_w)
        out_i.append(cand_i)
        out_w.append(cand_w)
    return torch.cat(out_i), torch.cat(out_w)


def _bank_lstsq(X: Tensor, w: Tensor, idx: Tensor, wt: Tensor, bank: Tensor, ridge: float = 1e-6) -> Tensor:
    """argmin_V Σ_n w_n ‖x_n − Σ_s wt[n,s] V[idx[n,s]]‖² + λ‖V − bank‖² (normal equations, h×h;
    the small proximal term keeps unused bank vectors where they are)."""
    h, b = bank.shape
    H = torch.zeros(h * h, dtype=torch.float64)
    R = torch.zeros(h, b, dtype=torch.float64)
    for s in range(idx.shape[1]):
        R.index_add_(0, idx[:, s], ((w * wt[:, s])[:, None] * X).double())
        for u in range(idx.shape[1]):
            H.index_add_(0, idx[:, s] * h + idx[:, u], (w * wt[:, s] * wt[:, u]).double())
    H = H.view(h, h)
    lam = ridge * max(float(H.diagonal().mean()), 1e-30)
    eye = torch.eye(h, dtype=torch.float64)
    return torch.linalg.solve(H + lam * eye, R + lam * bank.double()).float()


def _logits_from_codes(
    X: Tensor, bank: Tensor, idx: Tensor, wt: Tensor, k: int, full: bool, margin: float = 4.0, tau: float = 1.0
) -> Tensor | tuple[Tensor, Tensor]:
    """Logits whose top-k softmax reproduces the codes (idx, wt: (N×k')): the coded entries at
    log w (w ≥ 1e-6), every other bank vector j at (margin − tau·cos(x, bank_j)) below the row's
    smallest coded logit, so the next candidates (extra slots when k > 2, or a switch while
    training) are the best-aligned bank vectors. ``full``: the (N×h) soft logits; else the top-k
    (indices, logits), (N×k) each."""
    lw = wt.clamp_min(1e-6).log()
    if not full and idx.shape[1] == k:
        return idx, lw
    bn = bank.norm(dim=1)
    out, out_i, out_v = [], [], []
    for s in range(0, X.shape[0], _CHUNK):
        Xc, ic, lc = X[s : s + _CHUNK], idx[s : s + _CHUNK], lw[s : s + _CHUNK]
        # (n, h); the product of the norms is clamped, not each norm: 1e-30² underflows fp32 to 0
        cos = (Xc @ bank.T) / (Xc.norm(dim=1, keepdim=True) * bn).clamp_min(1e-30)
        L = (lc.min(1, keepdim=True).values - margin + tau * cos).scatter_(1, ic, lc)
        if full:
            out.append(L)
        else:
            v, i = L.topk(k, dim=1)
            out_i.append(i)
            out_v.append(v)
    return torch.cat(out) if full else (torch.cat(out_i), torch.cat(out_v))


def _random_start(
    X: Tensor, h: int, k: int, gen: torch.Generator, full: bool
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """PEFT's start, scaled to the data: bank uniform with the sub-vectors' RMS, logits N(0, 0.1²)
    (``full``: all N×h; else k random distinct indices per row with their k logits)."""
    N, b = X.shape
    rms = float(X.pow(2).mean().sqrt()) or 1.0
    bank = (torch.rand(h, b, generator=gen) * 2 - 1) * (rms * math.sqrt(3))
    if full:
        return bank, torch.randn(N, h, generator=gen) * 0.1
    idx = torch.cat(
        [torch.rand(min(_CHUNK, N - s), h, generator=gen).topk(k, dim=1).indices for s in range(0, N, _CHUNK)]
    )
    return bank, (idx, torch.randn(N, k, generator=gen) * 0.1)
