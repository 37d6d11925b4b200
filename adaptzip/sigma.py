"""Σ statistics that fit in memory: a streamed sketch of a module's input second moment.

The Σ-weighted fit needs Σ_m = E[x xᵀ] (in×in) of every adapted module's input. At the scale
users have that matrix is the problem (Llama-7B's down_proj: 11008² fp32 = 484 MB per layer). What
the fits need is less:

* the svd form's Σ-optimum and every source norm ‖B A‖²_Σ need only A Σ Aᵀ (r×r), i.e. Σ on the
  row space of the source's A;
* forms whose rows leave that row space (shared parts, MASA's group A, VB-LoRA's bank) need Σ in
  other directions too, but only as a weight, not exactly.

:class:`SigmaSketch` keeps

    Σ ≈ L Lᵀ + P diag(d) P,     P = I − U Uᵀ,

with U (in×p) an orthonormal basis of the A rows of every module fed this input (q/k/v share one
input, gate/up another), L (in×m) and d (in,) ≥ 0. It is built in one streaming pass by a Nyström
sketch (Tropp, Yurtsever, Udell & Cevher 2017, "Fixed-rank approximation of a positive-
semidefinite matrix from streaming data") with the test matrix Ω = [U, G], G a seeded Gaussian
(in×q, q = ``OVERSAMPLE``·rank): the pass accumulates Y = Σ_x x (xᵀ Ω) (in×(p+q)), diag Σ and
the token count, O(tokens·in·(p+q)) per batch instead of O(tokens·in²). :func:`reconstruct` then
splits the Nyström approximation Y (Ωᵀ Y)⁺ Yᵀ in two (a block Cholesky on [U, G]):

1. L_U = Y_U (Uᵀ Y_U)^{-1/2}: Nyström on span(U) alone, so L_U L_Uᵀ U = Σ U — **exact on the
   source's row space**: A Σ, A Σ Aᵀ and hence the svd form's Σ-optimum are Σ's own (up to the
   fp32 rounding of the accumulation, which the dense Σ has as well);
2. L_G: the stable (shifted) Nyström of the remainder Σ' = Σ − L_U L_Uᵀ (zero on span U) on the
   Gaussian directions, truncated to ``rank`` columns (Tropp et al.: a sketch of 2·rank columns
   truncated to rank is near the best rank-``rank`` approximation); its columns are kept
   orthogonal to U, so part 1 stays exact;
3. d: what the low-rank part misses on the diagonal. The residual E = Σ − L Lᵀ is PSD and zero
   on span(U) (E = P E P), so it is modelled as P diag(d) P with d ≥ 0 solved so that the
   sketch's diagonal equals diag Σ — exactly where that solution is non-negative; where it is not,
   d_i is clamped at 0 and the sketch's diagonal exceeds Σ's by what P spreads there from the
   other coordinates (rare, and O(p/in) of diag Σ).

The sketch is PSD, its diagonal is Σ's, it is exact on span(U), and the low-rank part's trace
error is within about twice the best rank-``rank`` error (the bound of Tropp et al. for a 2×
oversampled sketch). The error it costs a fit is measured in ``bench/bench_sigma.py``.

A slot keeps the exact dense Σ when it would be no larger than the sketch (in ≤ rank + 2p + 1,
:func:`stored_values`), and embeddings (one-hot inputs) keep Σ = diag(token frequencies) exactly,
as a sketch with m = p = 0. Nothing here builds an in×in matrix for a sketch, except
:meth:`SigmaSketch.dense` (tests).

The accumulators (:class:`DenseAccumulator`, :class:`SketchAccumulator`, :class:`DiagAccumulator`)
hold one slot's streamed sums; :class:`adaptzip.calibrate.SigmaHooks` feeds them from forward
hooks, ``bench/bench_sigma.py`` from synthetic activations, through the same calls.
"""

from __future__ import annotations

import abc

import torch

Tensor = torch.Tensor

#: Default stored rank of the Gaussian part of a sketch (``SigmaHooks(sketch=...)``).
SKETCH_RANK = 128
#: Gaussian test columns per stored rank (Tropp et al.: oversample, then truncate).
OVERSAMPLE = 2
#: Rounding of the fp32 accumulation: the scale of the Nyström shift and of the cut-offs.
_EPS32 = float(torch.finfo(torch.float32).eps)


class SigmaSketch:
    """Σ ≈ L Lᵀ + P diag(d) P with P = I − U Uᵀ: L (n×m), U (n×p, orthonormal columns), d (n,) ≥ 0.

    Behaves like the n×n tensor it stands for where the fits use Σ, without building it:
    ``A @ S`` (k×n, O(k·n·(m+p))), ``S @ M``, :meth:`gram` (A Σ A2ᵀ), :meth:`diagonal`,
    :meth:`trace`, ``.shape``, ``.dtype``, ``.to(dtype)`` / ``.double()`` / ``.float()``.
    :meth:`dense` builds the matrix (tests only)."""

    __slots__ = ("L", "U", "d")

    def __init__(self, L: Tensor, U: Tensor, d: Tensor):
        n = d.shape[0]
        if d.dim() != 1 or L.dim() != 2 or U.dim() != 2 or L.shape[0] != n or U.shape[0] != n:
            raise ValueError(f"sigma sketch: L {tuple(L.shape)}, U {tuple(U.shape)}, d {tuple(d.shape)} do not agree")
        self.L, self.U, self.d = L, U, d

    # -- tensor-like facts -------------------------------------------------------
    @property
    def shape(self) -> torch.Size:
        n = self.d.shape[0]
        return torch.Size((n, n))

    @property
    def dtype(self) -> torch.dtype:
        return self.L.dtype

    @property
    def device(self) -> torch.device:
        return self.L.device

    def to(self, *args, **kwargs) -> SigmaSketch:
        L = self.L.to(*args, **kwargs)
        if L is self.L:
            return self
        return SigmaSketch(L, self.U.to(*args, **kwargs), self.d.to(*args, **kwargs))

    def double(self) -> SigmaSketch:
        return self.to(torch.float64)

    def float(self) -> SigmaSketch:
        return self.to(torch.float32)

    def cpu(self) -> SigmaSketch:
        return self.to("cpu")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.L, self.U, self.d))

    def __repr__(self) -> str:
        n, m, p = self.d.shape[0], self.L.shape[1], self.U.shape[1]
        return f"SigmaSketch(n={n}, rank={m}, exact_rows={p}, dtype={self.dtype})"

    # -- products ----------------------------------------------------------------
    def _perp(self, X: Tensor) -> Tensor:
        """X P = X − (X U) Uᵀ (rows of X with their span(U) part removed)."""
        return X if self.U.shape[1] == 0 else X - (X @ self.U) @ self.U.T

    def weigh(self, A: Tensor) -> Tensor:
        """A Σ (k×n) = (A L) Lᵀ + ((A P) ∘ d) P."""
        return (A @ self.L) @ self.L.T + self._perp(self._perp(A) * self.d)

    def gram(self, A: Tensor, A2: Tensor | None = None) -> Tensor:
        """A Σ A2ᵀ (k×k2; A2 = A when None) = (A L)(A2 L)ᵀ + ((A P) ∘ d)(A2 P)ᵀ."""
        AL, AP = A @ self.L, self._perp(A)
        if A2 is None:
            return AL @ AL.T + (AP * self.d) @ AP.T
        return AL @ (A2 @ self.L).T + (AP * self.d) @ self._perp(A2).T

    def __rmatmul__(self, A: Tensor) -> Tensor:
        return self.weigh(A)

    def __matmul__(self, M: Tensor) -> Tensor:
        return self.weigh(M.T).T  # Σ is symmetric: Σ M = (Mᵀ Σ)ᵀ

    def diagonal(self) -> Tensor:
        """diag Σ = rowsq(L) + diag(P D P), diag(P D P)_i = (1 − 2h_i) d_i + u_iᵀ (Uᵀ D U) u_i
        (u_i row i of U, h_i = ‖u_i‖²); O(n·(m + p²))."""
        return (self.L * self.L).sum(1) + _pdp_diagonal(self.U, self.d)

    def trace(self) -> Tensor:
        """tr Σ = ‖L‖²_F + Σ_i d_i (1 − h_i)."""
        h = (self.U * self.U).sum(1)
        return (self.L * self.L).sum() + (self.d * (1 - h)).sum()

    def dense(self) -> Tensor:
        """The n×n matrix (for tests and small checks only)."""
        n = self.d.shape[0]
        P = torch.eye(n, dtype=self.dtype, device=self.device) - self.U @ self.U.T
        return self.L @ self.L.T + (P * self.d) @ P

    def tensors(self) -> dict[str, Tensor]:
        """The stored parts by name: ``L``, ``U``, ``d``."""
        return {"L": self.L, "U": self.U, "d": self.d}


def _pdp_diagonal(U: Tensor, d: Tensor) -> Tensor:
    """diag((I − U Uᵀ) diag(d) (I − U Uᵀ)) without the n×n matrix."""
    if U.shape[1] == 0:
        return d
    h = (U * U).sum(1)
    M = (U * d[:, None]).T @ U  # Uᵀ D U: p×p
    return (1 - 2 * h) * d + ((U @ M) * U).sum(1)


def _solve_diagonal(e: Tensor, U: Tensor, steps: int = 50, tol: float = 1e-10) -> Tensor:
    """d ≥ 0 with diag(P diag(d) P) = e (P = I − U Uᵀ), by Jacobi steps: the diagonal of the map
    is (1 − h_i)², its off-diagonal part Σ_{j≠i} (u_i·u_j)² d_j is small (≤ h_i max d), so the
    iteration contracts while h < 0.38. Coordinates with (1 − h_i)² < 1e-6 lie inside span(U),
    where P removes them anyway: d_i = 0 there."""
    if U.shape[1] == 0:
        return e.clamp_min(0)
    h = (U * U).sum(1)
    den = (1 - h) ** 2
    free = den >= 1e-6
    d = torch.where(free, e / den.clamp_min(1e-6), torch.zeros_like(e)).clamp_min(0)
    scale = float(e.abs().max()) if e.numel() else 0.0
    for _ in range(steps):
        off = _pdp_diagonal(U, d) - den * d  # Σ_{j≠i} (u_i·u_j)² d_j
        new = torch.where(free, (e - off) / den.clamp_min(1e-6), torch.zeros_like(e)).clamp_min(0)
        done = float((new - d).abs().max()) <= tol * scale
        d = new
        if done:
            break
    return d


def orth_complement_basis(U: Tensor, rows: Tensor, rel_tol: float = 1e-6) -> Tensor:
    """Orthonormal columns (n×k, fp64) spanning the part of ``rows``' (r×n) row space that is
    not already in span(U) (U n×p orthonormal; directions below ``rel_tol``·max row norm dropped)."""
    R = rows.double()
    if R.numel() == 0:
        return R.new_zeros(R.shape[1], 0)
    scale = float(R.norm(dim=1).max())
    if U.shape[1]:
        R = R - (R @ U) @ U.T
    if scale == 0:
        return R.new_zeros(R.shape[1], 0)
    Q, S, _ = torch.linalg.svd(R.T, full_matrices=False)
    return Q[:, S > rel_tol * scale]


def reconstruct(Y: Tensor, U: Tensor, G: Tensor, diag: Tensor, rank: int) -> SigmaSketch:
    """The sketch of Σ from Y = Σ [U, G] (n×(p+q)), U (n×p orthonormal), G (n×q) and diag Σ,
    computed in fp64 (see the module docstring; O(n·(p+q)²), a few n×q fp64 buffers at a time).
    ``rank``: the columns kept of the Gaussian part."""
    Y, U, diag = Y.double(), U.double(), diag.double()
    n, p = U.shape
    Yu, Yg = Y[:, :p], Y[:, p:]
    # 1. span(U): Nyström on U alone. Directions Σ hardly sees (eigenvalues of UᵀΣU below the fp32
    #    rounding level of its largest) are dropped: their contribution is rounding noise.
    if p:
        W = U.T @ Yu
        lam, V = torch.linalg.eigh((W + W.T) / 2)
        keep = lam > _EPS32 * float(lam.max().clamp_min(0))
        Lu = Yu @ (V[:, keep] / lam[keep].sqrt())
    else:
        Lu = Y.new_zeros(n, 0)
    # 2. the remainder Σ' = Σ − Lu Luᵀ (zero on span U) on the Gaussian directions G⊥ = (I − UUᵀ) G:
    #    Σ' G = Yg − Lu (Luᵀ G) = Σ' G⊥, and with G⊥ᵀG⊥ = V S² Vᵀ, Q = G⊥ V S⁻¹ is an orthonormal
    #    basis of G⊥ (a Gaussian G⊥ is well conditioned: its Gram loses nothing) and Z = Σ' Q.
    k = min(rank, G.shape[1])
    if k > 0:
        Gp = G.double()
        LuG = Lu.T @ Gp
        if p:
            Gp -= U @ (U.T @ Gp)
        s2, V = torch.linalg.eigh(Gp.T @ Gp)
        ok = s2 > 1e-12 * float(s2.max())
        T = V[:, ok] / s2[ok].sqrt()  # Q = G⊥ T
        nu = _EPS32 * float(torch.linalg.eigvalsh(Yg.T @ Yg)[-1].clamp_min(0).sqrt())  # eps32·‖Yg‖₂
        Z = (Yg - Lu @ LuG) @ T
        del Y, Yu, Yg  # the fp64 copy of Y is not needed any more
        Q = Gp @ T
        del Gp
        Lg = _shifted_nystrom(Z, Q, k, nu)
        if p:
            Lg -= U @ (U.T @ Lg)  # exactly orthogonal to span(U): part 1 stays exact
    else:
        Lg = Lu.new_zeros(n, 0)
    L = torch.cat([Lu, Lg], 1)
    L = L[:, (L * L).sum(0) > 0]
    # 3. the diagonal the low-rank part misses, as P diag(d) P
    e = (diag - (L * L).sum(1)).clamp_min(0)
    d = _solve_diagonal(e, U)
    return SigmaSketch(L.float().contiguous(), U.float().contiguous(), d.float().contiguous())


def _shifted_nystrom(Z: Tensor, Q: Tensor, k: int, nu: float) -> Tensor:
    """Tropp et al.'s stable fixed-rank Nyström: F with F Fᵀ ≈ [Σ']_k from Z = Σ' Q (Q orthonormal):
    Z_ν = Z + νQ, C = chol(Qᵀ Z_ν), F₀ = Z_ν C⁻ᵀ = P S Vᵀ (from the eigenpairs of F₀ᵀF₀: the values
    below ν, the only inaccurate ones, are cut anyway), F = P_k (S_k² − ν)₊^{1/2}. The shift ν, the
    fp32 rounding level of the data (eps·‖Y_G‖₂; Tropp et al. add a safety factor √n, which cuts
    more of the spectrum than the accumulation's rounding needs), keeps the Cholesky factor well
    defined; it is raised ×10 until the factorisation succeeds. ``Z`` is overwritten."""
    nu = max(nu, 1e-300)
    for _ in range(12):
        Z += nu * Q
        K = Q.T @ Z
        C, info = torch.linalg.cholesky_ex((K + K.T) / 2)
        if int(info) == 0:
            break
        Z -= nu * Q
        nu *= 10
    else:
        return Z.new_zeros(Z.shape[0], 0)
    del Q
    F = torch.linalg.solve_triangular(C.T, Z, upper=True, left=False)  # F₀ Cᵀ = Z_ν
    del Z
    s2, V = torch.linalg.eigh(F.T @ F)
    s2, V = s2.flip(0)[:k], V.flip(1)[:, :k]
    lam = (s2 - nu).clamp_min(0)
    return (F @ V) * (lam / s2.clamp_min(1e-300)).sqrt()  # P_k S_k = F₀ V_k


# --------------------------------------------------------------------------- accumulators
class Accumulator(abc.ABC):
    """The streamed sums of one slot (modules fed the same input). A batch's contribution is
    computed by :meth:`part` from the inputs (tokens×in, or token ids for embeddings) and added
    with :meth:`add` (sign −1 takes it out again, for the exact split of a slot)."""

    count: int

    @abc.abstractmethod
    def part(self, x: Tensor) -> tuple[tuple[Tensor, ...], int]:
        """This batch's sums and token count."""

    @abc.abstractmethod
    def add(self, part: tuple[tuple[Tensor, ...], int]) -> None:
        """Add a part computed by :meth:`part` of this accumulator (or of a copy of it)."""

    @abc.abstractmethod
    def copy(self) -> Accumulator:
        """An independent accumulator with the same sums (and the same test matrix)."""

    @abc.abstractmethod
    def result(self) -> Tensor | SigmaSketch:
        """Σ = sums / count, on the CPU (the accumulator's sums are released)."""

    def extend(self, rows: Tensor | None, x: Tensor) -> None:
        """Make the statistics exact on ``rows``' row space too, while the sums hold exactly the
        one batch ``x`` (a module joining the slot on its first batch). The default does nothing:
        dense and diagonal sums are exact in every direction already."""
        return None


class DenseAccumulator(Accumulator):
    """Σ_x x xᵀ (in×in fp32): the exact full Σ."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.S = torch.zeros(n, n, device=device)
        self.count = 0

    def part(self, x):
        return (x.T @ x,), int(x.shape[0])

    def add(self, part, sign: float = 1.0):
        (xtx,), n = part
        self.S.add_(xtx, alpha=sign)
        self.count += int(sign) * n

    def copy(self):
        c = DenseAccumulator.__new__(DenseAccumulator)
        c.S, c.count = self.S.clone(), self.count
        return c

    def result(self):
        S = self.S.double().div_(max(self.count, 1)).float().cpu()
        del self.S
        return S


class DiagAccumulator(Accumulator):
    """Token counts of an embedding's one-hot inputs: Σ = diag(frequencies), exact."""

    def __init__(self, n: int, device: torch.device | str = "cpu"):
        self.c = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def part(self, ids):
        ids = ids.reshape(-1)
        return (torch.bincount(ids, minlength=self.c.shape[0]).double(),), int(ids.numel())

    def add(self, part, sign: float = 1.0):
        (cnt,), n = part
        self.c.add_(cnt, alpha=sign)
        self.count += int(sign) * n

    def copy(self):
        c = DiagAccumulator.__new__(DiagAccumulator)
        c.c, c.count = self.c.clone(), self.count
        return c

    def result(self):
        d = (self.c / max(self.count, 1)).float().cpu()
        del self.c
        n = d.shape[0]
        return SigmaSketch(torch.zeros(n, 0), torch.zeros(n, 0), d)


class SketchAccumulator(Accumulator):
    """Y = Σ_x x (xᵀ Ω) (in×(p+q) fp32), Σ_x x∘x (fp64) and the count, for Ω = [U, G]: U the
    orthonormal basis of the slot's A rows (fp32), G seeded Gaussian (in×q, stored fp16 —
    its values are exact in fp32, so G is simply the test matrix)."""

    def __init__(
        self,
        n: int,
        rows: Tensor | None,
        rank: int,
        gen: torch.Generator,
        device: torch.device | str = "cpu",
    ):
        U = orth_complement_basis(
            torch.zeros(n, 0, dtype=torch.float64), rows if rows is not None else torch.zeros(0, n)
        )
        q = max(0, min(OVERSAMPLE * rank, n - U.shape[1]))
        self.rank = rank
        self.U = U.float().to(device)
        self.G = torch.randn(n, q, generator=gen).half().to(device)
        self.Y = torch.zeros(n, U.shape[1] + q, device=device)
        self.diag = torch.zeros(n, dtype=torch.float64, device=device)
        self.count = 0

    def _xo(self, x: Tensor) -> Tensor:
        return torch.cat([x @ self.U, x @ self.G.float()], 1)  # x Ω: tokens×(p+q)

    def part(self, x):
        return (x.T @ self._xo(x), (x * x).sum(0).double()), int(x.shape[0])

    def add(self, part, sign: float = 1.0):
        (y, dg), n = part
        self.Y.add_(y, alpha=sign)
        self.diag.add_(dg, alpha=sign)
        self.count += int(sign) * n

    def copy(self):
        c = SketchAccumulator.__new__(SketchAccumulator)
        c.rank, c.U, c.G = self.rank, self.U, self.G  # never changed in place: shared
        c.Y, c.diag, c.count = self.Y.clone(), self.diag.clone(), self.count
        return c

    def extend(self, rows, x):
        if rows is None:
            return
        new = orth_complement_basis(self.U.double().cpu(), rows.cpu()).float().to(self.U.device)
        if new.shape[1] == 0:
            return
        p = self.U.shape[1]
        self.Y = torch.cat([self.Y[:, :p], x.T @ (x @ new), self.Y[:, p:]], 1)
        self.U = torch.cat([self.U, new], 1)

    def result(self):
        c = max(self.count, 1)
        out = reconstruct(self.Y.div_(c).cpu(), self.U.cpu(), self.G.cpu(), self.diag.cpu() / c, self.rank)
        del self.Y, self.G
        return out


def stored_values(n: int, p: int, rank: int | None) -> int:
    """Floats a slot of ``n`` inputs stores: n² for the dense Σ (``rank`` None, or when that is no
    more), else at most n·(2p + rank + 1) for a sketch (L: n×(p + rank), U: n×p, d: n), p the
    number of exact rows (Σ of the A ranks of the slot's modules)."""
    sketch = n * (2 * p + rank + 1) if rank is not None else n * n
    return min(n * n, sketch)


def accumulator(
    n: int,
    kind: str,
    rows: Tensor | None,
    sketch: int | None,
    gen: torch.Generator,
    device: torch.device | str = "cpu",
) -> Accumulator:
    """The accumulator for a new slot of ``n`` inputs: embeddings count tokens; ``sketch`` None
    keeps the exact Σ; otherwise a sketch of rank ``sketch``, unless the dense Σ would be no
    larger (:func:`stored_values`, p the rank of ``rows``)."""
    if kind == "embedding":
        return DiagAccumulator(n, device)
    p = 0 if rows is None else min(int(rows.shape[0]), n)
    if sketch is None or stored_values(n, p, sketch) == n * n:
        return DenseAccumulator(n, device)
    return SketchAccumulator(n, rows, sketch, gen, device)
