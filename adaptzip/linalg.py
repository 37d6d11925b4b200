"""The shared math: factored Gram errors, the SVD of B@A from its factors, Σ-weighted products,
the greedy allocator, least squares against a fixed A, and the row basis a group of updates shares
(zoo sharing). Nothing here materialises a dense ΔW.

Conventions: an update is ΔW = B @ A with B (out×r), A (r×in). Σ (in×in) is a module's input
second moment E[x xᵀ]; the Σ-weighted norm is ‖M‖_Σ² = tr(M Σ Mᵀ). Σ is a dense tensor or a
:class:`~adaptzip.sigma.SigmaSketch`; every use goes through :func:`weigh` (A Σ) and :func:`gram`
(A Σ A2ᵀ), which never build an in×in matrix for a sketch.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .sigma import SigmaSketch

Tensor = torch.Tensor
#: A module's Σ: the dense in×in tensor or its sketch.
SigmaLike = Tensor | SigmaSketch


def weigh(A: Tensor, Sigma: SigmaLike | None) -> Tensor:
    """A Σ (k×in) in A's dtype, or A when Σ is None."""
    return A if Sigma is None else A @ Sigma.to(A.dtype)


def gram(A: Tensor, Sigma: SigmaLike | None, A2: Tensor | None = None) -> Tensor:
    """A Σ A2ᵀ (k×k2; A2 = A when None; Σ = I when None) in A's dtype. For a sketch this costs
    O((k + k2)·in·(m + p)) and never forms A Σ."""
    B = A if A2 is None else A2
    if Sigma is None:
        return A @ B.T
    if isinstance(Sigma, SigmaSketch):
        return Sigma.to(A.dtype).gram(A, A2)
    return (A @ Sigma.to(A.dtype)) @ B.T


def sigma_trace(Sigma: SigmaLike) -> float:
    """tr Σ."""
    return float(Sigma.trace())


def sq_norm(B: Tensor, A: Tensor, Sigma: SigmaLike | None = None) -> Tensor:
    """‖B A‖²_Σ = tr(BᵀB · A Σ Aᵀ); cost O((in+out) r²) (+ A Σ Aᵀ)."""
    return ((B.T @ B) * gram(A, Sigma)).sum()


def inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor, Sigma: SigmaLike | None = None) -> Tensor:
    """⟨B1 A1, B2 A2⟩_Σ = tr(B1ᵀB2 · A2 Σ A1ᵀ)."""
    return ((B1.T @ B2) * gram(A1, Sigma, A2)).sum()


def sq_error(B: Tensor, A: Tensor, B2: Tensor, A2: Tensor, Sigma: SigmaLike | None = None) -> Tensor:
    """‖B A − B2 A2‖²_Σ from Gram products (never forms the out×in matrices)."""
    return sq_norm(B, A, Sigma) - 2 * inner(B, A, B2, A2, Sigma) + sq_norm(B2, A2, Sigma)


def psd_root(G: Tensor) -> Tensor:
    """F (k×k) with F Fᵀ = G for a symmetric PSD G (eigh; rounding-negative eigenvalues count as 0)."""
    lam, V = torch.linalg.eigh((G + G.T) / 2)
    return V * lam.clamp_min(0).sqrt()


@dataclass
class SVD:
    """ΔW = U diag(S) Vh, thin: U (out×k), S (k,), Vh (k×in). In the weighted case Vh is
    expressed in the original input coordinates (ΔW = U S Vh exactly, and the truncations of
    U S Vh are the Σ-optimal ones)."""

    U: Tensor
    S: Tensor
    Vh: Tensor

    def truncate(self, k: int) -> tuple[Tensor, Tensor]:
        """Balanced rank-k factors (B = U√S, A = √S Vh)."""
        s = self.S[:k].sqrt()
        return self.U[:, :k] * s, s[:, None] * self.Vh[:k]


def factored_svd(B: Tensor, A: Tensor, Sigma: SigmaLike | None = None, damp: float = 1e-6) -> SVD:
    """SVD of B @ A from the factors: QR of B and Aᵀ, SVD of the small core R_b R_aᵀ; cost
    O((in+out) r² + r³).

    With Σ, the SVD of B A R (R Rᵀ = Σ + δI, δ = ``damp``·mean diag Σ), mapped back to input
    coordinates, whose truncations are the Σ-optimal ones. It depends on Σ only through the r×r
    G = A (Σ + δI) Aᵀ: with B = Q_b R_b and F Fᵀ = G, B A R has the left singular vectors Q_b u
    and values s of R_b F = u s vᵀ, and B A = U S Vh with Vh = S⁻¹ uᵀ R_b A (rows whose s is
    below 1e-12·s_max carry nothing and are zero). So a sketch exact on A's row space gives the
    exact weighted SVD."""
    B = B.double()
    A = A.double()
    Qb, Rb = torch.linalg.qr(B)  # out×r, r×r
    if Sigma is None:
        Qa, Ra = torch.linalg.qr(A.T)  # in×r, r×r
        u, s, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
        return SVD((Qb @ u).float(), s.float(), (vh @ Qa.T).float())
    delta = damp * max(sigma_trace(Sigma) / A.shape[1], 1e-30)
    G = gram(A, Sigma) + delta * (A @ A.T)
    u, s, _ = torch.linalg.svd(Rb @ psd_root(G), full_matrices=False)
    ok = s > 1e-12 * float(s.max()) if s.numel() else s.bool()
    Vh = (u.T @ Rb @ A) / torch.where(ok, s, torch.ones_like(s))[:, None]
    Vh[~ok] = 0
    return SVD((Qb @ u).float(), s.float(), Vh.float())


def effective_rank(S: Tensor) -> float:
    """Roy & Vetterli's effective rank exp(H(p)), p = σ/Σσ."""
    p = S / S.sum().clamp_min(1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0


def energy_top(S: Tensor, k: int) -> float:
    """Fraction of ‖ΔW‖² in the top-k singular values."""
    e = S.double() ** 2
    tot = float(e.sum())
    return float(e[:k].sum()) / tot if tot > 0 else 0.0


def allocate(
    gains: Sequence[Sequence[float] | Tensor],
    costs: Sequence[float | Sequence[float]],
    budget: float = math.inf,
    max_ranks: Sequence[int] | None = None,
    *,
    after: Sequence[int | None] | None = None,
    target_gain: float | None = None,
) -> list[int] | None:
    """Greedy allocation by gain per cost, the one allocator (svd and BSLoRA ranks within a
    budget, zoo shared-basis ranks to an error target).

    Chain m offers moves j = 0, 1, … in that order (a prefix is always taken), each gaining
    ``gains[m][j]`` (e.g. σ², non-increasing) at ``costs[m]`` (a number: every move of the chain)
    or ``costs[m][j]``. The best gain per cost among the chains' next moves is taken first (ties:
    the lower chain index); a move that would bring the total cost above ``budget`` is not taken
    and closes its chain (cheaper moves elsewhere still may be). ``max_ranks[m]`` caps chain m's
    moves; ``after[m] = p`` opens chain m only once chain p has taken its first move (None: open
    from the start). With ``target_gain``, stops as soon as the gains taken reach it (nothing when
    it is ≤ 0) and returns None when every allowed move is taken first. Returns the moves taken
    per chain (a rank per module)."""
    n = len(gains)
    caps = [len(g) if max_ranks is None else min(len(g), max_ranks[m]) for m, g in enumerate(gains)]

    def cost(m: int, j: int) -> float:
        c = costs[m]
        return c if isinstance(c, numbers.Real) else c[j]

    waiting: dict[int, list[int]] = {}
    for m in range(n):
        p = None if after is None else after[m]
        if p is not None:
            waiting.setdefault(p, []).append(m)
    taken = [0] * n
    heap: list[tuple[float, int]] = []

    def push(m: int) -> None:
        j = taken[m]
        if j < caps[m]:
            heapq.heappush(heap, (-float(gains[m][j]) / cost(m, j), m))

    for m in range(n):
        if after is None or after[m] is None:
            push(m)
    spent = 0.0
    need = target_gain
    while need is None or need > 0:
        if not heap:
            return None if need is not None else taken
        _, m = heapq.heappop(heap)
        j = taken[m]
        c = cost(m, j)
        if spent + c > budget:
            continue  # this chain's next move does not fit; cheaper moves may
        spent += c
        if need is not None:
            need -= float(gains[m][j])
        taken[m] = j + 1
        push(m)
        if j == 0:
            for q in waiting.get(m, ()):
                push(q)
    return taken


def lstsq_B(
    target_B: Tensor, target_A: Tensor, A: Tensor, Sigma: SigmaLike | None = None, ridge: float = 1e-8
) -> Tensor:
    """argmin_B ‖target_B target_A − B A‖²_Σ = target_B (target_A Σ Aᵀ)(A Σ Aᵀ)⁻¹ (out×k)."""
    G = gram(A, Sigma)  # k×k
    C = gram(target_A, Sigma, A)  # r×k
    G = G + ridge * G.diagonal().mean().clamp_min(1e-30) * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.solve(G, (target_B @ C).T).T


# ------------------------------------------------------------------ Σ-weighted coordinates
@dataclass
class WeightedCoords:
    """Coordinates in which Σ-weighted norms of updates are Frobenius norms, for updates whose rows
    lie in the row space of a stack of A factors: with Q (in×R, R ≤ Σ r_a) an orthonormal basis of
    that row space (None: the identity, when Σ r_a ≥ in) and the symmetric F = (Qᵀ (Σ + δI) Q)^½ (R×R), an update
    X Qᵀ has ‖X Qᵀ‖²_Σ + δ‖X‖² = ‖X F‖²_F. So a fit of the reduced factors (B, :meth:`reduce` (A))
    in the plain norm is the Σ-weighted fit, and a reduced row basis maps back with
    :meth:`to_input`. δ = ``damp``·tr Σ / in keeps F invertible (as :func:`factored_svd`)."""

    Q: Tensor | None
    F: Tensor
    Finv: Tensor

    def reduce(self, A: Tensor) -> Tensor:
        """A (r×in, rows in the stacked row space) in the weighted coordinates: A Q F (r×R)."""
        A = A.double()
        return (A if self.Q is None else A @ self.Q) @ self.F

    def to_input(self, Vr: Tensor) -> Tensor:
        """A reduced row basis Vr (k×R) as rows in input coordinates, V = Vr F⁻¹ Qᵀ, each scaled to
        unit length (a least-squares core or B fitted on V absorbs any row scale; the leading k
        rows span the same subspaces). V Σ Vᵀ is the identity up to that scale and δ."""
        V = Vr.double() @ self.Finv
        if self.Q is not None:
            V = V @ self.Q.T
        return V / V.norm(dim=1, keepdim=True).clamp_min(1e-300)


def weighted_coords(As: Sequence[Tensor], Sigma: SigmaLike, damp: float = 1e-6) -> WeightedCoords:
    """The Σ-weighted coordinates (:class:`WeightedCoords`) of the row space of the stacked ``As``
    (each r_a×in). Costs one R×R eigendecomposition and Qᵀ Σ Q (never an in×in product for a
    sketch when R < in)."""
    Aall = torch.cat([A.double() for A in As], 0)
    R, n_in = Aall.shape
    Q = None if R >= n_in else orth_rows(Aall).T  # numerically null directions dropped
    basis = torch.eye(n_in, dtype=torch.float64) if Q is None else Q.T
    delta = damp * max(sigma_trace(Sigma) / n_in, 1e-30)
    G = gram(basis, Sigma)
    lam, W = torch.linalg.eigh((G + G.T) / 2 + delta * torch.eye(G.shape[0], dtype=torch.float64))
    root = lam.clamp_min(delta).sqrt()
    return WeightedCoords(Q, (W * root) @ W.T, (W / root) @ W.T)


# ------------------------------------------------------------------ a row basis shared by many updates
def orth_rows(A: Tensor, tol: float = 1e-7) -> Tensor:
    """Orthonormal basis (k×in) of A's row space (numerically zero directions dropped)."""
    if A.shape[0] == 0:
        return A
    U, S, _ = torch.linalg.svd(A.T, full_matrices=False)
    keep = S > tol * float(S.max().clamp_min(1e-300))
    return U[:, keep].T


def subspace_overlap(qa: Tensor, qb: Tensor) -> float:
    """Mean cos² of the principal angles between two row spaces (orthonormal rows)."""
    k = min(qa.shape[0], qb.shape[0])
    return float((qa @ qb.T).pow(2).sum()) / k if k else 0.0


def _sum_pair_min(ranks: list[int]) -> int:
    """Σ_{a≠b} min(r_a, r_b) (the largest Σ tr(P_a P_b) can be)."""
    rs = sorted(ranks)
    n = len(rs)
    return 2 * sum(r * (n - 1 - i) for i, r in enumerate(rs))


@dataclass
class ModuleBasis:
    """The stacked spectrum of one module across a group: eigenvalues λ (descending, = σ² of the
    stacked updates), the top ``cap`` right singular vectors V (cap×in, orthonormal rows), the
    mean pairwise cos² between the adapters' A row spaces (``overlap``) and between their B column
    spaces (``overlap_out``; NaN where not measured, see :func:`module_basis`), and each
    adapter's ‖ΔW‖²."""

    lam: Tensor
    V: Tensor
    overlap: float
    norms: list[float]
    overlap_out: float


def module_basis(
    factors: Iterable[tuple[Tensor, Tensor]],
    n_in: int,
    cap: int | None = None,
    total_rank: int | None = None,
    Sigma: SigmaLike | None = None,
) -> ModuleBasis:
    """From the factors (B_a out×r_a, A_a r_a×in) of one module of n adapters, without any
    dense ΔW: when Σ r_a ≤ in, QR of the stacked Aᵀ and an eigendecomposition of the small
    (Σr)×(Σr) Gram of the stacked cores; otherwise the in×in Gram Σ_a A_aᵀ(B_aᵀB_a)A_a, streamed
    (one adapter's factors in memory at a time; give ``total_rank`` = Σ r_a to choose this path
    before reading). Memory is O((in + out)·in) either way, so on the streamed path the B
    overlap is measured only where out ≤ in (its out×out Gram is then no larger than the in×in one).

    With ``Sigma``: the Σ-weighted basis (λ and the norms in ‖·‖²_Σ), computed in
    :func:`weighted_coords` and returned as unit rows in input coordinates (not orthonormal);
    the overlap stays that of the plain A row spaces."""
    if Sigma is not None:
        fs = [(B.double(), A.double()) for B, A in factors]
        wc = weighted_coords([A for _, A in fs], Sigma)
        red = module_basis([(B, wc.reduce(A)) for B, A in fs], wc.F.shape[0], cap=cap)
        qs = [orth_rows(A) for _, A in fs]
        f2 = float(sum(float((qa @ qb.T).pow(2).sum()) for qa in qs for qb in qs))
        # the output side is not weighted: B's overlap is the reduced basis's
        return _finish_basis(
            red.lam, wc.to_input(red.V), f2, [q.shape[0] for q in qs], red.norms, None, red.overlap_out
        )
    if total_rank is not None and total_rank > n_in:
        G = torch.zeros(n_in, n_in, dtype=torch.float64)
        S = torch.zeros(n_in, n_in, dtype=torch.float64)
        Sb: Tensor | None = None  # Σ_a of the B column spaces' projectors, where out ≤ in
        norms, rk, rkb = [], [], []
        for B, A in factors:
            B, A = B.double(), A.double()
            BtB = B.T @ B
            G += A.T @ BtB @ A
            q = orth_rows(A)
            S += q.T @ q
            if B.shape[0] <= n_in:
                qb = orth_rows(B.T)
                Sb = qb.T @ qb if Sb is None else Sb + qb.T @ qb
                rkb.append(qb.shape[0])
            norms.append(float((BtB * (A @ A.T)).sum()))
            rk.append(q.shape[0])
        ov_out = float("nan") if Sb is None else _mean_pair_cos2(float(Sb.pow(2).sum()), rkb)
        return _basis_from_gram(G, float(S.pow(2).sum()), rk, norms, cap, ov_out)
    fs = [(B.double(), A.double()) for B, A in factors]
    R = sum(A.shape[0] for _, A in fs)
    norms = [float(((B.T @ B) * (A @ A.T)).sum()) for B, A in fs]
    qs = [orth_rows(A) for _, A in fs]
    rk = [q.shape[0] for q in qs]
    qbs = [orth_rows(B.T) for B, _ in fs]
    overlap_out = _mean_pair_cos2(_stacked_f2(qbs), [q.shape[0] for q in qbs])
    if R > n_in:
        G = sum(A.T @ (B.T @ B) @ A for B, A in fs)
        S = sum(q.T @ q for q in qs)
        return _basis_from_gram(G, float(S.pow(2).sum()), rk, norms, cap, overlap_out)
    # Σr ≤ in: stacked A = Rᵀ Qᵀ (QR of the stacked Aᵀ); B_a A_a = C_a Qᵀ; eigen of Σ_a C_aᵀ C_a (R×R)
    Aall = torch.cat([A for _, A in fs], 0)  # R×in
    Q, Rr = torch.linalg.qr(Aall.T)  # in×R, R×R
    M = torch.zeros(R, R, dtype=torch.float64)
    off = 0
    for B, A in fs:
        r = A.shape[0]
        Ra = Rr[:, off : off + r]  # R×r: A_a = R_aᵀ Qᵀ, so B_a A_a = (B_a R_aᵀ) Qᵀ
        M += Ra @ (B.T @ B) @ Ra.T  # (B_a R_aᵀ)ᵀ(B_a R_aᵀ) through the r×r Gram: O(out·r² + r·R²)
        off += r
    lam, W = torch.linalg.eigh(M)
    lam, W = lam.flip(0), W.flip(1)
    V = (Q @ W).T  # R×in
    return _finish_basis(lam, V, _stacked_f2(qs), rk, norms, cap, overlap_out)


def _stacked_f2(qs: list[Tensor]) -> float:
    """‖Σ_a P_a‖²_F for the projectors P_a = q_aᵀ q_a (q_a: orthonormal rows), through the smaller
    of the stacked Gram (Σr×Σr) and Σ_a P_a (d×d)."""
    Q = torch.cat(qs, 0)
    return float((Q @ Q.T).pow(2).sum() if Q.shape[0] <= Q.shape[1] else (Q.T @ Q).pow(2).sum())


def _basis_from_gram(
    G: Tensor, f2: float, rk: list[int], norms: list[float], cap: int | None, overlap_out: float
) -> ModuleBasis:
    lam, W = torch.linalg.eigh(G)
    return _finish_basis(lam.flip(0), W.flip(1).T, f2, rk, norms, cap, overlap_out)


def _mean_pair_cos2(f2: float, rk: list[int]) -> float:
    """The mean pairwise cos² of n subspaces of ranks ``rk`` from f2 = ‖Σ_a P_a‖²_F = Σ_{a,b} tr(P_a P_b):
    (f2 − Σ_a r_a) / Σ_{a≠b} min(r_a, r_b); NaN for fewer than two."""
    pairs = _sum_pair_min(rk)
    return (f2 - sum(rk)) / pairs if pairs > 0 else float("nan")


def _finish_basis(
    lam: Tensor, V: Tensor, f2: float, rk: list[int], norms: list[float], cap: int | None, overlap_out: float
) -> ModuleBasis:
    """f2 = ‖Σ_a P_a‖²_F = Σ_{a,b} tr(P_a P_b) (P_a: projector on A_a's row space)."""
    k = V.shape[0] if cap is None else min(cap, V.shape[0])
    return ModuleBasis(lam.clamp_min(0), V[:k].contiguous(), _mean_pair_cos2(f2, rk), norms, overlap_out)


# ----------------------------------------------------------------------------- joint (zoo) bases
@dataclass
class JointBasis:
    """One module's joint basis across n adapters (Compress-then-Serve): U (out×K) and V (K×in)
    with orthonormal columns/rows (Σ-weighted fits: V has unit rows, see :func:`joint_basis`), so that ΔW_a ≈ U C_a V with C_a = Uᵀ ΔW_a Vᵀ (K×K).
    Directions are ordered so that the leading k×k blocks are the strongest (see
    :func:`joint_basis`); ``energy_full[k]`` / ``energy_diag[k]``: Σ_a of the energy of C_a's
    leading (k+1)×(k+1) block / of its first k+1 diagonal entries (the cores themselves are not
    kept: n·K² values); ``norms``: each adapter's ‖ΔW_a‖²."""

    U: Tensor
    V: Tensor
    energy_full: Tensor
    energy_diag: Tensor
    norms: list[float]

    def gains(self, diagonal: bool) -> Tensor:
        """Energy each added direction captures: E(k) − E(k−1) (``diagonal``: diagonal cores)."""
        E = torch.cat([torch.zeros(1, dtype=torch.float64), self.energy_diag if diagonal else self.energy_full])
        return (E[1:] - E[:-1]).clamp_min(0)


def _orth_cols(X: Tensor) -> Tensor:
    return torch.linalg.qr(X)[0]


def joint_basis(
    factors: Sequence[tuple[Tensor, Tensor]], K: int, iters: int = 8, Sigma: SigmaLike | None = None
) -> JointBasis:
    """U (out×K), V (K×in) maximising Σ_a ‖Uᵀ ΔW_a Vᵀ‖² (a Tucker-2 / HOSVD-style alternating fit)
    from the factors (B_a out×r_a, A_a r_a×in, scale folded in) of one module of n adapters, never
    forming a dense ΔW_a. Initialised from the stacked SVDs (U: top-K left singular vectors of
    [ΔW_1 … ΔW_n], V: top-K right singular vectors of [ΔW_1; …; ΔW_n], :func:`module_basis`);
    then ``iters`` alternations, each a subspace-iteration step of the exact ALS update (U ←
    orth(Σ_a M_a M_aᵀ U) with M_a = ΔW_a Vᵀ; V likewise), O(n·(in + out)·K·r) each, so the
    captured energy never falls. Finally the directions are rotated to the eigenbases of
    Σ_a C_a C_aᵀ (U side) and Σ_a C_aᵀ C_a (V side), strongest first.

    With ``Sigma``: the fit maximises the Σ-weighted energy Σ_a ‖Uᵀ ΔW_a Σ Vᵀ‖² over V Σ Vᵀ = I
    (the same alternation in :func:`weighted_coords`); V comes back as unit rows in input
    coordinates and the energies and norms are Σ-weighted. Fit the cores with the same Σ."""
    fs = [(B.double(), A.double()) for B, A in factors]
    if Sigma is not None:
        wc = weighted_coords([A for _, A in fs], Sigma)
        jb = joint_basis([(B, wc.reduce(A)) for B, A in fs], K, iters)
        return JointBasis(jb.U, wc.to_input(jb.V), jb.energy_full, jb.energy_diag, jb.norms)
    n_out, n_in = fs[0][0].shape[0], fs[0][1].shape[1]
    K = max(0, min(K, n_out, n_in, sum(A.shape[0] for _, A in fs)))
    norms = [float(((B.T @ B) * (A @ A.T)).sum()) for B, A in fs]
    if K == 0:
        none = torch.zeros(0, dtype=torch.float64)
        return JointBasis(
            torch.zeros(n_out, 0, dtype=torch.float64), torch.zeros(0, n_in, dtype=torch.float64), none, none, norms
        )

    V = module_basis(fs, n_in, cap=K).V  # K×in
    U = module_basis(((A.T, B.T) for B, A in fs), n_out, cap=K).V.T  # out×K
    for _ in range(iters):
        U = _orth_cols(sum(B @ ((A @ V.T) @ ((V @ A.T) @ (B.T @ U))) for B, A in fs))
        V = _orth_cols(sum(A.T @ ((B.T @ U) @ ((U.T @ B) @ (A @ V.T))) for B, A in fs)).T
    Su = torch.zeros(K, K, dtype=torch.float64)
    Sv = torch.zeros(K, K, dtype=torch.float64)
    for B, A in fs:
        C = (U.T @ B) @ (A @ V.T)
        Su += C @ C.T
        Sv += C.T @ C
    _, Wu = torch.linalg.eigh(Su)
    _, Wv = torch.linalg.eigh(Sv)
    U, V = U @ Wu.flip(1), (V.T @ Wv.flip(1)).T
    full = torch.zeros(K, dtype=torch.float64)
    diag = torch.zeros(K, dtype=torch.float64)
    for B, A in fs:  # E(k): the diagonal of the 2-D prefix sums of C_a² (one core in memory at a time)
        c2 = ((U.T @ B) @ (A @ V.T)).pow(2)
        full += c2.cumsum(0).cumsum(1).diagonal()
        diag += c2.diagonal().cumsum(0)
    return JointBasis(U, V, full, diag, norms)


def joint_cores(
    U: Tensor,
    V: Tensor,
    B: Tensor,
    A: Tensor,
    diagonal: bool,
    ridge: float = 1e-10,
    Sigma: SigmaLike | None = None,
) -> Tensor:
    """The best core of ΔW = B A on a fixed basis (U out×k, V k×in, e.g. as rounded to the
    storage dtype, so not exactly orthonormal): argmin_C ‖B A − U C V‖_Σ, C = (UᵀU)⁻¹ Uᵀ B A Σ Vᵀ
    (V Σ Vᵀ)⁻¹ (k×k; Σ = I when None); ``diagonal``: argmin_d ‖B A − U diag(d) V‖_Σ, solving
    (UᵀU ∘ V Σ Vᵀ) d = diag(Uᵀ B A Σ Vᵀ) (∘: elementwise)."""
    U, V, B, A = U.double(), V.double(), B.double(), A.double()
    k = U.shape[1]
    if k == 0:
        return torch.zeros(0 if diagonal else (0, 0), dtype=torch.float64)
    eye = torch.eye(k, dtype=torch.float64)
    Gu, Gv = U.T @ U, gram(V, Sigma)
    P = (U.T @ B) @ gram(A, Sigma, V)  # k×k
    if diagonal:
        M = Gu * Gv
        return torch.linalg.solve(M + ridge * M.diagonal().mean().clamp_min(1e-30) * eye, P.diagonal())
    Gu = Gu + ridge * Gu.diagonal().mean().clamp_min(1e-30) * eye
    Gv = Gv + ridge * Gv.diagonal().mean().clamp_min(1e-30) * eye
    return torch.linalg.solve(Gu, torch.linalg.solve(Gv, P.T).T)
