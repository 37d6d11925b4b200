"""The shared math. Nothing here materialises a dense ΔW.

Conventions: an update is ΔW = B @ A with B (out×r), A (r×in). Σ (in×in) is a module's input
second moment E[x xᵀ]; the Σ-weighted norm is ‖M‖_Σ² = tr(M Σ Mᵀ) = ‖M L‖_F² with Σ = L Lᵀ.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

Tensor = torch.Tensor


def _aw(A: Tensor, Sigma: Tensor | None) -> Tensor:
    """A Σ (r×in), or A when Σ is None."""
    return A if Sigma is None else A @ Sigma


def sq_norm(B: Tensor, A: Tensor, Sigma: Tensor | None = None) -> Tensor:
    """‖B A‖²_Σ = tr(BᵀB · A Σ Aᵀ); cost O((in+out) r²)."""
    return ((B.T @ B) * (_aw(A, Sigma) @ A.T)).sum()


def inner(B1: Tensor, A1: Tensor, B2: Tensor, A2: Tensor, Sigma: Tensor | None = None) -> Tensor:
    """⟨B1 A1, B2 A2⟩_Σ = tr(B1ᵀB2 · A2 Σ A1ᵀ)."""
    return ((B1.T @ B2) * (_aw(A1, Sigma) @ A2.T)).sum()


def sq_error(B: Tensor, A: Tensor, B2: Tensor, A2: Tensor, Sigma: Tensor | None = None) -> Tensor:
    """‖B A − B2 A2‖²_Σ from Gram products (never forms the out×in matrices)."""
    return sq_norm(B, A, Sigma) - 2 * inner(B, A, B2, A2, Sigma) + sq_norm(B2, A2, Sigma)


def sqrt_factor(Sigma: Tensor, damp: float = 1e-6) -> Tensor:
    """L (in×in, lower triangular) with Σ + δI = L Lᵀ, δ = damp · mean(diag Σ)."""
    S = Sigma.double()
    d = damp * float(S.diagonal().mean().clamp_min(1e-30))
    eye = torch.eye(S.shape[0], dtype=S.dtype)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(S + d * eye)
        if int(info) == 0:
            return L.float()
        d *= 10
    raise ValueError("covariance is not positive definite even after damping")


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


def factored_svd(B: Tensor, A: Tensor, L: Tensor | None = None) -> SVD:
    """SVD of B @ A (or of B @ A @ L, mapped back) from the factors: QR of B and Aᵀ, SVD of the
    small core R_b R_aᵀ. Cost O((in+out) r² + r³) (+ O(in² r) for the weighted case)."""
    B = B.double()
    A = A.double()
    AL = A if L is None else A @ L.double()
    Qb, Rb = torch.linalg.qr(B)  # out×r, r×r
    Qa, Ra = torch.linalg.qr(AL.T)  # in×r, r×r
    u, s, vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    U = Qb @ u
    Vh = vh @ Qa.T  # k×in, right singular vectors of B A L
    if L is not None:
        # B A = U S (Vh L⁻¹): solve Vh_orig L = Vh  →  L ᵀ Vh_origᵀ = Vhᵀ
        Vh = torch.linalg.solve_triangular(L.double().T, Vh.T, upper=True).T
    return SVD(U.float(), s.float(), Vh.float())


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


def allocate(gains: list[Tensor], costs: list[float], budget: float, max_ranks: list[int] | None = None) -> list[int]:
    """Greedy rank allocation: direction i of module m gains gains[m][i] (σ², non-increasing)
    and costs costs[m]; take directions by gain per cost, always a prefix per module, while the
    total cost stays within budget. Returns a rank per module."""
    ranks = [0] * len(gains)
    heap = []
    for m, g in enumerate(gains):
        if len(g) and (max_ranks is None or max_ranks[m] > 0):
            heap.append((-float(g[0]) / costs[m], m))
    heapq.heapify(heap)
    spent = 0.0
    while heap:
        _, m = heapq.heappop(heap)
        if spent + costs[m] > budget:
            continue  # this module's next direction does not fit; cheaper modules may
        spent += costs[m]
        ranks[m] += 1
        k = ranks[m]
        cap = len(gains[m]) if max_ranks is None else min(len(gains[m]), max_ranks[m])
        if k < cap:
            heapq.heappush(heap, (-float(gains[m][k]) / costs[m], m))
    return ranks


def lstsq_B(target_B: Tensor, target_A: Tensor, A: Tensor, Sigma: Tensor | None = None, ridge: float = 1e-8) -> Tensor:
    """argmin_B ‖target_B target_A − B A‖²_Σ = target_B (target_A Σ Aᵀ)(A Σ Aᵀ)⁻¹ (out×k)."""
    AS = _aw(A, Sigma)
    G = AS @ A.T  # k×k
    C = _aw(target_A, Sigma) @ A.T  # r×k
    G = G + ridge * G.diagonal().mean().clamp_min(1e-30) * torch.eye(G.shape[0], dtype=G.dtype)
    return torch.linalg.solve(G, (target_B @ C).T).T
