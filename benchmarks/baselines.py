"""Baselines written the plain way, for benchmarks to compare against (never used for training).

- ``reference_view_pipeline(cfg)``: the view pipeline as the reference code builds it (official INTL
  ``src/transform.py``): full-size PIL decode (torchvision ImageFolder's ``pil_loader``), then one
  torchvision v1 ``Compose`` of PIL transforms per view.
- Whitening as practitioners write it, for the timing and robustness comparison with IterNorm
  (``benchmarks.bench_whitening``): ``zca_whiten`` (Sigma^-1/2 by ``torch.linalg.eigh``: plain, with a ridge
  ``eps`` as Decorrelated BatchNorm adds one, or with an eigenvalue ``floor`` as our ``st_power`` clamps) and
  ``cholesky_whiten`` (W-MSE: the inverse Cholesky factor of the shrunk covariance), the decomposition in
  float32 or float64. Every ridge and floor is relative (to the mean eigenvalue tr(Sigma)/n, or to the largest
  eigenvalue), so the comparison does not depend on the embedding's scale (IterNorm is scale-invariant).
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter, ImageOps

from pretrain.augment import aug_config_from
from pretrain.losses import axis_covariance, centre


def pil_loader(path) -> Image.Image:
    """torchvision ImageFolder's default loader: decode at full size, convert to RGB."""
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class _PILGaussianBlur:
    """SimCLR/INTL blur: PIL GaussianBlur with sigma ~ U(lo, hi) (torch RNG, like the rest of T)."""

    def __init__(self, sigma):
        self.sigma = sigma

    def __call__(self, img):
        s = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))


class _PILSolarize:
    def __init__(self, threshold: int):
        self.threshold = threshold

    def __call__(self, img):
        return ImageOps.solarize(img, self.threshold)


class ReferenceViews:
    """``PIL.Image -> list[Tensor]``: one v1 Compose per view on the fully decoded image."""

    def __init__(self, cfg_aug: Any = None):
        cfg = aug_config_from(cfg_aug)
        self.cfg = cfg
        interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[cfg.interpolation]
        self.transforms = [T.Compose([
            T.RandomResizedCrop(v.size, scale=(v.min_scale, v.max_scale), ratio=tuple(cfg.ratio), interpolation=interp),
            T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_prob),
            T.RandomGrayscale(p=cfg.grayscale_prob),
            T.RandomApply([_PILGaussianBlur(cfg.blur_sigma)], p=v.blur_prob),
            T.RandomApply([_PILSolarize(cfg.solarize_threshold)], p=v.solarize_prob),
            T.RandomHorizontalFlip(p=cfg.flip_prob),
            T.ToTensor(),
            T.Normalize(cfg.mean, cfg.std),
        ]) for v in cfg.views]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]


def reference_view_pipeline(cfg_aug: Any = None) -> ReferenceViews:
    return ReferenceViews(cfg_aug)


def _covariance(z: torch.Tensor, axis: str, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(centred z, its covariance along ``axis`` in ``dtype``, default z's): the matrices IterNorm whitens."""
    zc = centre(z, axis)
    sigma = axis_covariance(zc, axis)
    return zc, sigma.to(dtype or sigma.dtype)


def _mean_eigenvalue(sigma: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(sigma).sum().detach() / sigma.shape[0]  # a constant of the batch, like a fixed eps


def _apply_whitening(w: torch.Tensor, zc: torch.Tensor, axis: str) -> torch.Tensor:
    """``w`` (n x n, with w Sigma w^T = I) applied along ``axis``, back in z's precision."""
    w = w.to(zc.dtype)
    return w @ zc if axis == "channel" else zc @ w.T


def zca_whiten(z: torch.Tensor, axis: str = "channel", eps: float = 0.0, floor: float | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """ZCA whitening ``Sigma^{-1/2} z_c`` by ``torch.linalg.eigh`` in ``dtype`` (default z's).

    ``eps``: ridge ``Sigma + eps * mean eigenvalue * I`` before the decomposition (Decorrelated BatchNorm's
    epsilon); ``floor``: eigenvalues clamped below at ``floor * lambda_max`` (``pretrain.losses.power_matrix``,
    our ``st_power``); neither: the textbook form. The covariance and the product with z stay in z's dtype
    (float32 in training), only the decomposition runs in ``dtype``. Same centring / covariance as
    ``pretrain.losses.iternorm`` (imported), so every method whitens exactly the same matrix. Raises
    ``torch.linalg.LinAlgError`` when eigh fails.
    """
    zc, sigma = _covariance(z, axis, dtype)
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    if eps:
        sigma = sigma + eps * _mean_eigenvalue(sigma) * eye
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    if floor is not None:
        eigvals = eigvals.clamp(min=floor * eigvals.detach().max())
    return _apply_whitening((eigvecs * eigvals.rsqrt()) @ eigvecs.T, zc, axis)


def cholesky_whiten(z: torch.Tensor, axis: str = "channel", ridge: float = 1e-4,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """W-MSE's whitening: ``W = L^{-1}`` for the Cholesky factor L of the shrunk covariance
    ``(1 - ridge) Sigma + ridge * mean eigenvalue * I`` (W-MSE shrinks towards I with an absolute eps), the
    decomposition and the triangular solve in ``dtype`` (default z's). Raises ``torch.linalg.LinAlgError``
    when the matrix is not numerically positive definite."""
    zc, sigma = _covariance(z, axis, dtype)
    eye = torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    shrunk = (1 - ridge) * sigma + ridge * _mean_eigenvalue(sigma) * eye
    chol = torch.linalg.cholesky(shrunk)
    return _apply_whitening(torch.linalg.solve_triangular(chol, eye, upper=False), zc, axis)
