"""Spectrum metrics of an embedding: eigenvalues of its covariance, effective rank and lgIoC, and the
spectrum dynamics FroSSL measures (Skean et al., ECCV 2024, Figure 3): the condition number and the
entropy of the top-k eigenvalues, and the step at which the k-th eigenvalue saturates.

Used by the engine (logged during pretraining, ``spectrum.png``, ``spectrum_topk.png``), the toy lab and
the tests. All computations are float64 and without gradients.

The definitions used for the FroSSL quantities (the paper's Figure 3 uses k = 14; its code for the figure
was not available here, so these are ours, stated precisely): with lambda_1 >= lambda_2 >= ... the
eigenvalues of the embedding covariance (``covariance_spectrum``),

- ``top_k(eigs, k)``: lambda_1 .. lambda_k;
- ``condition_number(eigs, k)``: lambda_1 / lambda_k (inf when lambda_k is 0);
- ``eigenvalue_entropy(eigs, k)``: the Shannon entropy (natural log) of lambda_1 .. lambda_k divided by
  their sum (all eigenvalues when k is None; ``effective_rank`` is exp of that entropy);
- ``saturation_step(rows, k)``: the first logged step from which lambda_k stays within 10% of its final
  value (see its docstring).
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


def _normalised_entropy(e: torch.Tensor) -> float | None:
    """Shannon entropy (nats) of e / sum(e), 0 log 0 = 0; None for an all-zero e. The one place for both
    ``effective_rank`` and ``eigenvalue_entropy``."""
    total = e.sum()
    if total <= 0:
        return None
    p = e / total
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    return k


def effective_rank(eigs) -> float:
    """exp of the Shannon entropy of eigs / sum(eigs) over ALL eigenvalues (Roy & Vetterli); 0 for an
    all-zero spectrum."""
    h = _normalised_entropy(_as_eigs(eigs))
    return 0.0 if h is None else math.exp(h)


def top_k(eigs, k: int) -> torch.Tensor:
    """The k largest eigenvalues, descending (float64); all of them when there are fewer than k."""
    e = _as_eigs(eigs)
    return e.sort(descending=True).values[: _check_k(k)]


def condition_number(eigs, k: int) -> float:
    """lambda_1 / lambda_k over the top-k eigenvalues (FroSSL, Figure 3): 1 for an isotropic spectrum,
    inf when lambda_k is 0 (a collapsed direction, or an all-zero spectrum). With fewer than k eigenvalues
    lambda_k is the smallest there is."""
    e = top_k(eigs, k)
    lk = float(e[-1])
    return float("inf") if lk <= 0 else float(e[0]) / lk


def eigenvalue_entropy(eigs, k: int | None = None) -> float:
    """Shannon entropy (natural log) of the top-k eigenvalues normalised to sum 1 (all of them when k is
    None): log(k) for k equal eigenvalues, 0 when one dominates; 0 for an all-zero spectrum.
    ``effective_rank(eigs) == exp(eigenvalue_entropy(eigs))``."""
    e = _as_eigs(eigs) if k is None else top_k(eigs, k)
    h = _normalised_entropy(e)
    return 0.0 if h is None else h


def saturation_step(rows, k: int, key: str = "top_eigenvalues", band: float = 0.1) -> int | None:
    """The step at which the k-th eigenvalue saturates, from metrics rows (``{"step": s, key: [lambda_1,
    ..., lambda_k, ...]}``, in step order; rows without ``key`` or with fewer than k values are ignored).

    Definition: with v_final the k-th eigenvalue of the last such row, the first step s such that at s and
    at every later row (1 - band) * v_final <= lambda_k <= v_final / (1 - band), i.e. from s on it stays
    within 10% (``band``) of where it ends. Two-sided, so it is the point where lambda_k settles whether it
    grows into its final value (the usual SSL curve) or shrinks into it (whitening), and an early spike
    that falls back does not count. None with fewer than 2 such rows or when v_final is 0 (the k-th
    direction ends collapsed: nothing saturates).
    """
    _check_k(k)
    if not 0 < band < 1:
        raise ValueError(f"band must be in (0, 1), got {band!r}")
    pts = [(int(r["step"]), float(r[key][k - 1])) for r in rows
           if isinstance(r.get(key), (list, tuple)) and len(r[key]) >= k and "step" in r]
    if len(pts) < 2:
        return None
    final = pts[-1][1]
    if not final > 0:
        return None
    lo, hi = (1 - band) * final, final / (1 - band)
    step = pts[-1][0]
    for s, v in reversed(pts):
        if not lo <= v <= hi:
            break
        step = s
    return step


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
