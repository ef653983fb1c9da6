"""Spectrum metrics of an embedding: eigenvalues of its covariance, effective rank and lgIoC.

Used by the engine (logged during pretraining, ``spectrum.png``), the toy lab and the tests. All
computations are float64 and without gradients.
"""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def covariance_spectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, float64, CPU) of the d x d covariance of z (m, d), centred over the batch,
    divided by m - 1. Tiny negative round-off eigenvalues are clipped to 0.

    Only the min(d, m - 1) eigenvalues a batch of m samples can make non-zero are returned: when d >= m
    the other d - m + 1 are zero for any embedding, collapsed or not (the 8192-d projector at batch 256),
    and keeping them would pin lgIoC at its floor. When d > m the eigenvalues come from the m x m Gram
    matrix (the same non-zero eigenvalues, a smaller eigendecomposition)."""
    if z.dim() != 2:
        raise ValueError(f"z must be (samples, features), got shape {tuple(z.shape)}")
    m, d = z.shape
    if m < 2:
        raise ValueError(f"need at least 2 samples for a covariance, got {m}")
    z = z.detach().to(device="cpu", dtype=torch.float64)
    zc = z - z.mean(dim=0, keepdim=True)
    mat = (zc @ zc.T if d > m else zc.T @ zc) / (m - 1)
    eigs = torch.linalg.eigvalsh(0.5 * (mat + mat.T))
    return eigs.clamp(min=0).flip(0)[: min(d, m - 1)]


def _as_eigs(eigs) -> torch.Tensor:
    e = torch.as_tensor(eigs, dtype=torch.float64).flatten().clamp(min=0)
    if e.numel() == 0:
        raise ValueError("empty spectrum")
    return e


def effective_rank(eigs) -> float:
    """exp of the Shannon entropy of eigs / sum(eigs) (Roy & Vetterli); 0 for an all-zero spectrum."""
    e = _as_eigs(eigs)
    total = e.sum()
    if total <= 0:
        return 0.0
    p = e / total
    p = p[p > 0]
    return float(math.exp(float(-(p * p.log()).sum())))


def lg_ioc(eigs) -> float:
    """log10(lambda_min / lambda_max), the paper's lgIoC (0 = all eigenvalues equal).

    lambda_min is clamped at lambda_max * float64 eps (below that it is round-off), so a collapsed
    spectrum gives about -15.7 rather than -inf. An all-zero spectrum returns -inf.
    """
    e = _as_eigs(eigs)
    lmax = float(e.max())
    if lmax <= 0:
        return float("-inf")
    lmin = max(float(e.min()), lmax * torch.finfo(torch.float64).eps)
    return math.log10(lmin / lmax)
