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
the partner factor's squared norms, which make sub-vector errors first-order ΔW errors); then
Adam on bank + logits (soft), freeze the top-k, Adam on bank + weights (hard), round the weights
to fp16 and polish the bank. ``fit_info`` records the init, soft and final hard errors.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..adapter import Adapter, ModuleInfo
from ..errors import ContainerError, OptionError
from . import svd as svd_form
from .base import FitContext, Form, TensorSpecs, register

Tensor = torch.Tensor
INIT_METHODS = ("kmeans", "random")
MAX_BANK = 2**15  # int16 indices
MIN_WEIGHT = 2.0**-24  # smallest fp16 subnormal: stored weights stay > 0, so their logs are finite


@dataclass
class VbloraConfig:
    bank: int = field(default=256, metadata={"help": "vectors in the shared bank h (indices are uint8 when h ≤ 256, else int16)"})
    vector_len: int = field(default=256, metadata={"help": "sub-vector length b; must divide every module's in and out features"})
    topk: int = field(default=2, metadata={"help": "bank vectors mixed per sub-vector k (k−1 fp16 weights stored)"})
    rank: int | None = field(default=None, metadata={"help": "rank r of every module (default: the source's largest module rank; one global r as in PEFT)"})
    init: str = field(default="kmeans", metadata={"help": "bank start: kmeans (gain-shape k-means of the balanced sub-vectors) or random (PEFT-like)"})
    steps: int = field(default=150, metadata={"help": "max Adam steps with trainable top-k selection (soft logits)"})
    refit_steps: int = field(default=150, metadata={"help": "max Adam steps on bank + weights after freezing the top-k"})
    lr: float = field(default=0.02, metadata={"help": "Adam learning rate (bank is parametrised at unit RMS, so one rate serves bank and logits)"})

    def __post_init__(self):
        if not 1 <= self.topk:
            raise ValueError(f"topk must be ≥ 1, got {self.topk}")
        if not (max(2, self.topk) <= self.bank <= MAX_BANK):
            raise ValueError(f"bank must be between max(2, topk)={max(2, self.topk)} and {MAX_BANK}, got {self.bank}")
        if self.vector_len < 1:
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
            hint = (f"values that divide every module's dimensions: {', '.join(map(str, ok))}" if ok
                    else "no vector length > 1 divides every module's dimensions")
            raise OptionError(path, f"vblora: --vector-len {b} does not divide module {m.name} "
                                    f"(in {m.in_features}, out {m.out_features}); {hint}")


def default_rank(modules: Sequence[ModuleInfo], config: VbloraConfig) -> int:
    return config.rank if config.rank is not None else max(m.rank for m in modules)


def n_subvectors(modules: Sequence[ModuleInfo], r: int, b: int) -> int:
    """N = Σ_i r·(in_i + out_i)/b."""
    return sum(r * (m.in_features + m.out_features) // b for m in modules)


def stored_bytes(n_sub: int, h: int, b: int, k: int, float_bytes: int) -> int:
    """Payload bytes: bank h·b floats + N·k indices + N·(k−1) fp16 weights."""
    ib = torch.empty(0, dtype=index_dtype(h)).element_size()
    return h * b * float_bytes + n_sub * k * ib + n_sub * (k - 1) * 2


def _pow2_scale(x: Tensor) -> float:
    """A power of two near the RMS of x (1.0 for a zero tensor): dividing and multiplying by it is
    exact, so bank = bank_raw · scale round-trips bit for bit."""
    rms = float(x.double().pow(2).mean().sqrt()) if x.numel() else 0.0
    return 2.0 ** round(math.log2(rms)) if rms > 0 and math.isfinite(rms) else 1.0


@register
class VbloraForm(Form):
    name = "vblora"
    summary = "VB-LoRA: A/B sub-vectors are top-k convex mixes of one shared vector bank (PEFT VBLORA export)"
    Config = VbloraConfig

    def __init__(self, modules: Sequence[ModuleInfo], config: VbloraConfig, rank: int, bank: Tensor, *,
                 logits: list[tuple[Tensor, Tensor]] | None = None,
                 topk: list[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None):
        """``bank`` (h×b). Soft mode: ``logits`` [(L_A (r, n_in, h), L_B (n_out, r, h))] per module.
        Hard mode: ``topk`` [(idx_A (r, n_in, k), wlog_A, idx_B (n_out, r, k), wlog_B)]."""
        super().__init__(modules, config)
        self.rank = int(rank)
        self.b = config.vector_len
        self.k = config.topk
        self.bank_scale = _pow2_scale(bank)
        self.bank_raw = nn.Parameter((bank.float() / self.bank_scale).contiguous())  # unit-RMS parametrisation
        self.logits_A = nn.ParameterList()
        self.logits_B = nn.ParameterList()
        self.wlog_A = nn.ParameterList()
        self.wlog_B = nn.ParameterList()
        self.state_info = {"rank": self.rank, "subvectors": n_subvectors(modules, self.rank, self.b)}
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
        h = self.bank_raw.shape[0]
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
        """The bank (h×b), differentiable in ``bank_raw``."""
        return self.bank_raw * self.bank_scale

    def _mix(self, bank: Tensor, idx: Tensor, wlog: Tensor) -> Tensor:
        """Σ_s softmax(wlog)_s · bank[idx_s]: idx, wlog (..., k) → (..., b)."""
        return (torch.softmax(wlog, -1).unsqueeze(-1) * bank[idx]).sum(-2)

    def factors(self, i: int) -> tuple[Tensor, Tensor]:
        m = self.modules_info[i]
        bank = self.bank()
        if self.soft:
            va, ia = self.logits_A[i].topk(self.k, dim=-1)
            vb, ib = self.logits_B[i].topk(self.k, dim=-1)
        else:
            (ia, ib), va, vb = self.idx(i), self.wlog_A[i], self.wlog_B[i]
        A = self._mix(bank, ia, va).reshape(self.rank, m.in_features)  # (r, n_in, b) → (r, in)
        B = self._mix(bank, ib, vb).transpose(1, 2).reshape(m.out_features, self.rank)  # (n_out, r, b) → (n_out, b, r) → (out, r)
        return B, A

    def trainable_groups(self) -> list[dict]:
        """Two groups (bank at unit RMS; logits or top-k weight logits), one learning rate fits both."""
        logits = list(self.logits_A) + list(self.logits_B) if self.soft else list(self.wlog_A) + list(self.wlog_B)
        return [{"params": [self.bank_raw], "name": "vblora_bank"}, {"params": logits, "name": "vblora_logits"}]

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
        h = self.bank_raw.shape[0]
        out = {"bank": self.bank().detach().clone(), "topk_indices": idx.to(index_dtype(h)).contiguous()}
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
    def from_tensors(cls, modules, config, state, tensors) -> "VbloraForm":
        r, b, k, h = int(state["rank"]), config.vector_len, config.topk, config.bank
        idx = tensors["topk_indices"].long()
        if k > 1:
            w = _grid_weights(tensors["topk_weights"])
        else:
            w = torch.ones(idx.shape[0], 1)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= h):
            raise ContainerError(None, f"vblora: top-k index out of range [0, {h}) (max {int(idx.max())})")
        topk, off = [], 0
        for m in modules:
            na, nb = r * (m.in_features // b), (m.out_features // b) * r
            ia, wa = idx[off:off + na].reshape(r, -1, k), w[off:off + na].reshape(r, -1, k).log()
            off += na
            ib, wb = idx[off:off + nb].reshape(-1, r, k), w[off:off + nb].reshape(-1, r, k).log()
            off += nb
            topk.append((ia, wa, ib, wb))
        return cls(modules, config, r, tensors["bank"].float(), topk=topk)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def config_for_budget(cls, adapter: Adapter, config: VbloraConfig, budget_bytes: int, float_bytes: int,
                          ctx: FitContext) -> VbloraConfig:
        """The largest bank h (up to 2¹⁵) whose payload fits, at the configured rank (lowered, down
        to 1, only when even a bank of max(2, k) vectors does not fit)."""
        b, k = config.vector_len, config.topk
        check_vector_len(adapter.modules, b, adapter.path)
        r0 = default_rank(adapter.modules, config)
        for r in range(r0, 0, -1):
            n = n_subvectors(adapter.modules, r, b)
            best = None
            for lo, hi in ((max(2, k), 256), (257, MAX_BANK)):
                fixed = stored_bytes(n, lo, b, k, float_bytes) - lo * b * float_bytes
                h = min(hi, (budget_bytes - fixed) // (b * float_bytes))
                if h >= lo:
                    best = h
            if best is not None:
                return dataclasses.replace(config, bank=int(best), rank=r)
        need = stored_bytes(n_subvectors(adapter.modules, 1, b), max(2, k), b, k, float_bytes)
        raise OptionError(adapter.path, f"vblora: a payload of {budget_bytes} bytes is too small: rank 1 with a bank of "
                                        f"{max(2, k)} vectors of length {b} needs {need}; raise --budget or --vector-len")

    @classmethod
    def fit(cls, adapter: Adapter, config: VbloraConfig, ctx: FitContext) -> "VbloraForm":
        from .. import fit as fitter  # the shared objective and optimiser (fit imports forms.base, not us)

        t0 = time.perf_counter()
        modules = adapter.modules
        b, k, h = config.vector_len, config.topk, config.bank
        check_vector_len(modules, b, adapter.path)
        r = default_rank(modules, config)
        gen = torch.Generator().manual_seed(ctx.seed)
        with torch.no_grad():
            parts = [_balanced_subvectors(s, m, r, b) for s, m in zip(svd_form.spectra(adapter, ctx), modules)]
            X = torch.cat([x for p in parts for x in (p[0], p[2])])  # (N, b)
            wts = torch.cat([w for p in parts for w in (p[1], p[3])])  # (N,)
            if config.init == "kmeans":
                bank, logits_flat = _kmeans_start(X, wts, h, k, gen)
            else:
                bank, logits_flat = _random_start(X, h, gen)
        logits, off = [], 0
        for m, (xa, _, xb, _) in zip(modules, parts):
            na, nb = xa.shape[0], xb.shape[0]
            logits.append((logits_flat[off:off + na].reshape(r, m.in_features // b, h),
                           logits_flat[off + na:off + na + nb].reshape(m.out_features // b, r, h)))
            off += na + nb
        del parts, X, wts, logits_flat
        form = cls(modules, config, r, bank, logits=logits)
        del logits
        info: dict = {"init": config.init, "rank": r}
        info["init_rel_error"] = fitter.evaluate(form, adapter, ctx).rel_error
        hist = fitter.optimise(form, adapter, ctx, lr=config.lr, max_steps=config.steps, label="vblora soft")
        info["soft_steps"] = len(hist)
        info["soft_rel_error"] = fitter.evaluate(form, adapter, ctx).rel_error
        form.freeze()
        hist = fitter.optimise(form, adapter, ctx, lr=config.lr, max_steps=config.refit_steps, label="vblora hard")
        info["hard_steps"] = len(hist)
        info["hard_unrounded_rel_error"] = fitter.evaluate(form, adapter, ctx).rel_error
        form.finalize()
        # the fp16 weights are fixed now; a short bank-only polish absorbs their rounding
        fitter.optimise(form, adapter, ctx, lr=config.lr / 4, max_steps=max(1, config.refit_steps // 5),
                        params=[form.bank_raw], label="vblora polish")
        info["hard_rel_error"] = fitter.evaluate(form, adapter, ctx).rel_error
        info["fit_seconds"] = round(time.perf_counter() - t0, 3)
        form.fit_info = info
        return form


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


def _gain_shape_kmeans(X: Tensor, w: Tensor, M: int, gen: torch.Generator, iters: int = 12) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted, sign-invariant gain-shape k-means: M unit directions D (M×b) maximising
    Σ_n w_n max_m ⟨x_n, d_m⟩². Seeds drawn ∝ w‖x‖²; each update is one power step of the
    cluster's weighted scatter (d_m ∝ Σ w t x); empty clusters are re-seeded with the worst-coded
    sub-vectors. Returns D, assignments a (N,), gains t (N,) with x ≈ t·d_a."""
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
    S = X @ D.T
    a = S.abs().argmax(1)
    return D, a, S.gather(1, a[:, None]).squeeze(1)


def _kmeans_start(X: Tensor, w: Tensor, h: int, k: int, gen: torch.Generator,
                  margin: float = 2.0, tau: float = 1.0) -> tuple[Tensor, Tensor]:
    """Bank (h×b) = [g_m d_m; −g_m d_m] (+ zero rows when h is odd or exceeds 2N) from the
    gain-shape k-means, g_m the largest |t| of cluster m; logits (N×h): the pair (m, m+M) at
    log((1 ± t/g)/2), every other entry (margin − tau·cos(x, bank_j)) below the pair's smaller
    logit, so the next candidates are the best-aligned bank vectors."""
    N, b = X.shape
    D, a, t = _gain_shape_kmeans(X, w, h // 2, gen)
    M = D.shape[0]
    g = torch.zeros(M).scatter_reduce_(0, a, t.abs(), reduce="amax", include_self=True)
    bank = torch.zeros(h, b)
    bank[:M] = g[:, None] * D
    bank[M:2 * M] = -g[:, None] * D
    ratio = torch.where(g[a] > 0, t / g[a].clamp_min(1e-30), torch.zeros_like(t)).clamp(-1, 1)
    wp = ((1 + ratio) / 2).clamp(1e-6, 1.0)
    wn = ((1 - ratio) / 2).clamp(1e-6, 1.0)
    lp, ln = wp.log(), wn.log()
    cos = (X @ bank.T) / (X.norm(dim=1, keepdim=True) * bank.norm(dim=1)[None, :]).clamp_min(1e-30)  # (N, h)
    logits = torch.minimum(lp, ln)[:, None] - margin + tau * cos
    logits.scatter_(1, a[:, None], lp[:, None])
    logits.scatter_(1, (a + M)[:, None], ln[:, None])
    return bank, logits


def _random_start(X: Tensor, h: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """PEFT's start, scaled to the data: bank uniform with the sub-vectors' RMS, logits N(0, 0.1²)."""
    N, b = X.shape
    rms = float(X.pow(2).mean().sqrt()) or 1.0
    bank = (torch.rand(h, b, generator=gen) * 2 - 1) * (rms * math.sqrt(3))
    return bank, torch.randn(N, h, generator=gen) * 0.1
