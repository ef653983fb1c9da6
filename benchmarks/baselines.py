"""Baselines written the plain way, for benchmarks to compare against (never used for training).

- ``reference_view_pipeline(cfg)``: the view pipeline as the reference code builds it (official INTL
  ``src/transform.py``): full-size PIL decode (torchvision ImageFolder's ``pil_loader``), then one
  torchvision v1 ``Compose`` of PIL transforms per view.
- ``zca_whiten(z, axis)``: hard (ZCA) whitening by ``torch.linalg.eigh`` in float32 without safeguards,
  the textbook alternative to IterNorm (W-MSE-style), for the timing and robustness comparison.
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


def zca_whiten(z: torch.Tensor, axis: str = "channel", eps: float = 0.0) -> torch.Tensor:
    """ZCA whitening ``Sigma^{-1/2} z_c`` by eigendecomposition, float32, no clamping beyond ``eps``.

    Same centring / covariance as ``pretrain.losses.iternorm`` (imported, not re-derived), so the two
    are compared on exactly the same matrix. Raises ``torch.linalg.LinAlgError`` when eigh fails.
    """
    zc = centre(z, axis)
    sigma = axis_covariance(zc, axis)
    eigvals, eigvecs = torch.linalg.eigh(sigma)
    w = (eigvecs * (eigvals + eps).rsqrt()) @ eigvecs.T
    return w @ zc if axis == "channel" else zc @ w
