"""Adapter-product algebra without dense matrices (docs/STRATEGIES.md).

A LoRA pair contributes the product P = s·B·A (d_out × d_in) to a layer. Robust rules must
compare these products, not the raw factors, because (B M)(M⁻¹ A) = B A: two schools can send
very different factors for the same update. Products are big (the SmolLM2 adapter stands for
~100 M dense entries), so everything here works from the factors:

  gram(...)     ⟨P_i, P_j⟩ summed over layers, from r×r blocks: tr(B_iᵀB_j · A_jA_iᵀ).
                Distances between updates follow from it, exactly.
  combine(...)  Σ_i c_i P_i re-factorised to rank r by a thin SVD of stacked factors
                (QR of [c_i B_i] and [A_i]ᵀ, then the SVD of a small core); the truncation
                error ‖·‖_F of what rank r drops is returned (FlexLoRA's logged quantity).
  row_block()   how many rows of dense P_i fit a memory budget (coordinate-wise rules).

A "basis" is a function (i, key) -> tensor giving state i's factors; index conventions are
the caller's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch

Loader = Callable[[int, str], torch.Tensor]


def pairs(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(A key, B key) per adapted module; every lora_A must have its lora_B."""
    keys = set(keys)
    out = []
    for a in sorted(k for k in keys if "lora_A" in k):
        b = a.replace("lora_A", "lora_B")
        if b not in keys:
            raise ValueError(f"adapter tensor {a} has no matching {b}")
        out.append((a, b))
    if not out:
        raise ValueError("no LoRA pairs (lora_A / lora_B tensors) in the adapter")
    return out


def gram(load: Loader, n: int, modules: Sequence[tuple[str, str]], scale: float) -> torch.Tensor:
    """G[i, j] = Σ_layers ⟨s B_i A_i, s B_j A_j⟩_F, float64, for i, j < n."""
    g = torch.zeros(n, n, dtype=torch.float64)
    for a_key, b_key in modules:
        a = torch.stack([load(i, a_key) for i in range(n)]).to(torch.float64)   # n × r × d_in
        b = torch.stack([load(i, b_key) for i in range(n)]).to(torch.float64)   # n × d_out × r
        r = a.shape[1]
        aat = a.reshape(n * r, -1) @ a.reshape(n * r, -1).T                      # (n r) × (n r)
        btb = b.permute(0, 2, 1).reshape(n * r, -1) @ b.permute(1, 0, 2).reshape(-1, n * r)
        g += (btb * aat).reshape(n, r, n, r).sum(dim=(1, 3))
    return g * scale * scale


def product_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> float:
    """⟨B1 A1, B2 A2⟩_F = tr(B1ᵀB2 · A2A1ᵀ), without forming either product; ranks may differ."""
    return float(((b1.double().T @ b2.double()) * (a1.double() @ a2.double().T)).sum())


def distances(g: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Pairwise squared distances between vectors given as rows of `coeffs` over the basis."""
    inner = coeffs @ g @ coeffs.T
    d = inner.diag()
    return (d[:, None] + d[None, :] - 2 * inner).clamp_min(0)


def combine(load: Loader, coeffs: Sequence[float], modules: Sequence[tuple[str, str]], rank: int,
            scale: float) -> tuple[dict[str, torch.Tensor], float]:
    """Factors (A, B) of rank `rank` whose product best approximates Σ_i c_i B_i A_i, per
    module, and the total truncation error sqrt(Σ dropped σ²)·s over all modules.
    B takes the singular values (B = U S, A = Vᵀ): A keeps orthonormal rows, so no LoRA
    component is left with both factors at zero (it could never train again)."""
    terms = [(i, float(c)) for i, c in enumerate(coeffs) if c != 0.0]
    if not terms:
        raise ValueError("combine() with all coefficients zero")
    out: dict[str, torch.Tensor] = {}
    dropped = 0.0
    for a_key, b_key in modules:
        a_parts = [load(i, a_key) for i, _ in terms]
        dtype = a_parts[0].dtype
        a = torch.cat([t.to(torch.float64) for t in a_parts])                                 # (m r) × d_in
        b = torch.cat([c * load(i, b_key).to(torch.float64) for i, c in terms], dim=1)        # d_out × (m r)
        u, s, vh = thin_svd(b, a)
        k = min(rank, s.numel())
        dropped += float((s[k:] ** 2).sum())
        new_b = torch.zeros(b.shape[0], rank, dtype=torch.float64)
        new_a = torch.zeros(rank, a.shape[1], dtype=torch.float64)
        new_b[:, :k] = u[:, :k] * s[:k]
        new_a[:k] = vh[:k]
        if k < rank:   # fewer directions than the rank: complete A's rows with an orthonormal basis
            new_a[k:] = _orthonormal_complement(vh[:k], rank - k, a.shape[1])
        out[a_key], out[b_key] = new_a.to(dtype), new_b.to(dtype)
    return out, math.sqrt(dropped) * scale


def thin_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of b @ a (d_out × m)(m × d_in) without forming it when m is small."""
    m = a.shape[0]
    if m >= min(b.shape[0], a.shape[1]):
        u, s, vh = torch.linalg.svd(b @ a, full_matrices=False)
        return u, s, vh
    qb, rb = torch.linalg.qr(b)          # d_out × m, m × m
    qa, ra = torch.linalg.qr(a.T)        # d_in × m, m × m
    uc, s, vhc = torch.linalg.svd(rb @ ra.T)
    return qb @ uc, s, vhc @ qa.T


def _orthonormal_complement(rows: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    if rows.numel():
        x -= (x @ rows.T) @ rows
    q: torch.Tensor
    q, _ = torch.linalg.qr(x.T)
    return q.T[:k]


def row_block(d_out: int, d_in: int, n: int, budget_bytes: int) -> int:
    """Rows per block so n dense blocks of float32 fit in the budget (at least one row)."""
    return max(1, min(d_out, budget_bytes // max(1, 4 * d_in * n)))


def step_norm(old: dict[str, torch.Tensor], new: dict[str, torch.Tensor], scale: float) -> float:
    """‖Σ_layers (s B'A' − s B A)‖_F: how far a round moved the model, in product space."""
    states = (old, new)
    g = gram(lambda i, k: states[i][k], 2, pairs(old), scale)
    return math.sqrt(max(0.0, float(g[0, 0] + g[1, 1] - 2 * g[0, 1])))
