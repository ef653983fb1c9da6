"""The paper's view pipelines: 2 views (Table 4), 6-crop multi-crop (Table 5), 32-px CIFAR, synthetic.

``build_view_transform(cfg_aug)`` returns a callable ``PIL.Image -> list[Tensor]`` (one float tensor per
view, ``3 x size x size``, normalised with ``mean``/``std``, ImageNet's by default).

Every view applies, in the order of the reference code (github.com/winci-ai/INTL ``src/transform.py``):
random resized crop (bicubic) -> colour jitter (prob ``jitter_prob``, random order of brightness /
contrast / saturation / hue) -> grayscale (``grayscale_prob``) -> Gaussian blur (sigma ~ U(blur_sigma),
per-view ``blur_prob``) -> solarize (threshold 128, per-view ``solarize_prob``) -> horizontal flip.

How it is fast without changing what is sampled (measured by ``python -m benchmarks --only pipeline``, with a
per-operation profile, ``ViewTransform.profile``):
- the random parameters have torchvision's distributions (``RandomResizedCrop.get_params``: same tries and
  fallback, ``random_resized_crop_box``; ``ColorJitter.get_params``: a uniform order and uniform factors;
  coins ``u < p`` like RandomApply / Random*), computed from one ``torch.rand`` draw per image (torchvision's
  samplers make ~25 one-element tensors per view: 0.45 ms, 11% of the 2-view pipeline); they are drawn for
  all views *before* decoding, so the image is decoded once;
- decode: a JPEG at full scale by ``torchvision.io.decode_jpeg`` (the same libjpeg-turbo pixels as PIL, straight
  into an array: no PIL-to-numpy copy), and at reduced scale (PIL draft mode: DCT-domain downscaling) only
  when every crop is still downscaled ``DRAFT_MARGIN`` (4) times after it, so the views keep their sharpness;
- crop + resize: torchvision v2 ``resize`` (antialiased bicubic) of the crop as a channels-last uint8
  tensor, which reproduces PIL's resampling (mean difference < 0.01 grey levels) at 2-4x its speed;
- colour ops on uint8 arrays with OpenCV (look-up tables for brightness / contrast / solarize,
  ``cvtColor`` for grayscale and the HSV hue rotation, ``addWeighted``, ``GaussianBlur``) instead of
  PIL's HSV round trip, the costliest step of the reference (3 ms per 224-px view);
- uint8 -> normalised float32 plane by plane through a per-channel float table (one pass, contiguous).
``tests/pretrain/test_augment.py`` checks each op against torchvision's PIL op with the same parameters, the
output statistics against the reference pipeline, the sampled parameters against the spec and the crop boxes
against torchvision's sampler, the decode against PIL's pixels and the draft decode's sharpness.
Run it in DataLoader workers (one thread each, as torch sets them): in a process with several torch
threads, small resizes pay thread wake-ups, which is slow on a loaded machine.

Config keys (``AugConfig`` / ``ViewSpec``, defaults = the paper's 2-view ImageNet setting); a ``preset``
key (one of ``PRESETS``) starts from a named setting and the other keys override it.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF2
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from common.errors import ConfigError

try:  # OpenCV is part of the pinned environment (opencv-python-headless); say so if it is missing.
    import cv2
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError("pretrain.augment needs OpenCV: pip install opencv-python-headless "
                      "(it is pinned in requirements/lock.txt)") from e

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}


@dataclass
class ViewSpec:
    """One view (crop) of an image; the per-view settings of the paper."""
    size: int = 224
    min_scale: float = 0.08
    max_scale: float = 1.0
    blur_prob: float = 1.0
    solarize_prob: float = 0.0


@dataclass
class AugConfig:
    """Keys of ``cfg_aug``. Defaults: the paper's 2-view ImageNet pipeline (Table 4)."""
    preset: str | None = None
    views: list = field(default_factory=lambda: [
        ViewSpec(224, 0.08, 1.0, blur_prob=1.0, solarize_prob=0.0),
        ViewSpec(224, 0.08, 1.0, blur_prob=0.1, solarize_prob=0.2),
    ])
    ratio: tuple = (3 / 4, 4 / 3)
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    flip_prob: float = 0.5
    blur_sigma: tuple = (0.1, 2.0)
    solarize_threshold: int = 128
    interpolation: str = "bicubic"
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    fast_decode: bool = True  # JPEG decode by torchvision, at reduced scale (draft) when every crop allows it


AUG_KEYS = tuple(f.name for f in fields(AugConfig))
VIEW_KEYS = tuple(f.name for f in fields(ViewSpec))


def _views(sizes, mins, maxs, blur, sol) -> list[dict]:
    return [dict(size=s, min_scale=a, max_scale=b, blur_prob=p, solarize_prob=q)
            for s, a, b, p, q in zip(sizes, mins, maxs, blur, sol)]


# Table 5 / official MultiCrops(cfg.multicrop == 3): 2x224 + 192 + 160 + 128 + 96.
_MC_MIN = (0.2, 0.2, 0.171, 0.143, 0.114, 0.086)
_MC_MAX = (1.0, 1.0, 0.857, 0.714, 0.571, 0.429)
_MC_BLUR = (0.5,) * 6
_MC_SOL = (0.1,) * 6
# STL-10's per-channel mean / std (solo-learn solo/data/pretrain_dataloader.py, as FroSSL runs it).
STL10_MEAN = (0.4914, 0.4823, 0.4466)
STL10_STD = (0.247, 0.243, 0.261)

PRESETS: dict[str, dict] = {
    # Table 4: two 224-px views, blur 1.0 / 0.1, solarize 0 / 0.2.
    "imagenet": dict(views=_views((224, 224), (0.08, 0.08), (1.0, 1.0), (1.0, 0.1), (0.0, 0.2))),
    # Table 5: the 6-crop multi-crop of the official code.
    "imagenet_multicrop": dict(views=_views((224, 224, 192, 160, 128, 96), _MC_MIN, _MC_MAX, _MC_BLUR, _MC_SOL)),
    # CIFAR-10/100 (official cifar/transform.py): 32 px, no blur, solarize 0 / 0.2.
    "cifar": dict(views=_views((32, 32), (0.08, 0.08), (1.0, 1.0), (0.0, 0.0), (0.0, 0.2))),
    # STL-10 (96-px images): the paper's two views (Table 4) at 96 px, STL-10's mean/std (solo-learn's).
    "stl10": dict(views=_views((96, 96), (0.08, 0.08), (1.0, 1.0), (1.0, 0.1), (0.0, 0.2)),
                  mean=STL10_MEAN, std=STL10_STD),
    # FroSSL's STL-10 views (OFSkean/FroSSL scripts/pretrain/stl10/augmentations/symmetric_weak.yaml): 96 px,
    # jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, blur 0.5 on both views, no solarization.
    "stl10_frossl": dict(views=_views((96, 96), (0.08, 0.08), (1.0, 1.0), (0.5, 0.5), (0.0, 0.0)),
                         saturation=0.4, mean=STL10_MEAN, std=STL10_STD),
    # The embedded 64-px synthetic set: the ImageNet settings at 32 px ...
    "synthetic": dict(views=_views((32, 32), (0.08, 0.08), (1.0, 1.0), (1.0, 0.1), (0.0, 0.2))),
    # ... and the 6-crop multi-crop scaled by 48/224.
    "synthetic_multicrop": dict(views=_views((48, 48, 41, 34, 27, 21), _MC_MIN, _MC_MAX, _MC_BLUR, _MC_SOL)),
}


class AugConfigError(ConfigError):
    """A bad ``cfg_aug``: the message names the key and the allowed values."""


def config_dict(cfg_aug: Any = None) -> dict:
    """``cfg_aug`` validated and written out with every key (its preset's views and the defaults filled
    in), as plain YAML-able data: what the run's config.yaml records."""
    cfg = aug_config_from(cfg_aug)
    out = asdict(cfg)
    out["views"] = [asdict(v) if not isinstance(v, dict) else dict(v) for v in cfg.views]
    for k in ("ratio", "blur_sigma", "mean", "std"):
        out[k] = list(out[k])
    return out


def _plain(cfg: Any) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import OmegaConf
        if OmegaConf.is_config(cfg):
            cfg = OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(cfg, Mapping):
        raise AugConfigError(f"cfg_aug must be a mapping of {list(AUG_KEYS)}, got {type(cfg).__name__}")
    return dict(cfg)


def aug_config_from(cfg_aug: Any) -> AugConfig:
    """Validated ``AugConfig`` from a dict / DictConfig / AugConfig (unknown keys are an error)."""
    if isinstance(cfg_aug, AugConfig):
        raw = asdict(cfg_aug)
    else:
        raw = _plain(cfg_aug)
    unknown = sorted(set(raw) - set(AUG_KEYS))
    if unknown:
        raise AugConfigError(f"unknown augmentation key(s) {unknown}; valid keys: {list(AUG_KEYS)}")
    preset = raw.get("preset")
    merged: dict = {}
    if preset is not None:
        if preset not in PRESETS:
            raise AugConfigError(f"unknown augmentation preset {preset!r}; choose one of {sorted(PRESETS)}")
        merged.update(PRESETS[preset])
    merged.update({k: v for k, v in raw.items() if v is not None or k == "preset"})
    views = merged.pop("views", None)
    cfg = AugConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in merged.items()})
    if views is not None:
        cfg.views = [_view_from(v, i) for i, v in enumerate(views)]
    else:
        cfg.views = [ViewSpec(**asdict(v)) for v in cfg.views]
    try:
        _validate(cfg)
    except TypeError as e:  # e.g. a quoted number in YAML compared with a float
        raise AugConfigError(f"augmentation config has a value of the wrong type ({e}); numbers must be "
                             f"numbers, sizes integers: {cfg}") from None
    return cfg


def _view_from(v: Any, i: int) -> ViewSpec:
    if isinstance(v, ViewSpec):
        return ViewSpec(**asdict(v))
    v = _plain(v)
    unknown = sorted(set(v) - set(VIEW_KEYS))
    if unknown:
        raise AugConfigError(f"views[{i}]: unknown key(s) {unknown}; valid view keys: {list(VIEW_KEYS)}")
    return ViewSpec(**v)


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise AugConfigError(msg)


def _validate(cfg: AugConfig) -> None:
    _check(len(cfg.views) >= 1, "views: give at least one view (the method needs two or more)")
    for i, v in enumerate(cfg.views):
        _check(isinstance(v.size, int) and v.size >= 4, f"views[{i}].size must be an int >= 4, got {v.size!r}")
        _check(0 < v.min_scale <= v.max_scale <= 1, f"views[{i}]: need 0 < min_scale <= max_scale <= 1, "
                                                   f"got {v.min_scale}, {v.max_scale}")
        for k in ("blur_prob", "solarize_prob"):
            _check(0 <= getattr(v, k) <= 1, f"views[{i}].{k} must be a probability in [0, 1], got {getattr(v, k)}")
    for k in ("jitter_prob", "grayscale_prob", "flip_prob"):
        _check(0 <= getattr(cfg, k) <= 1, f"{k} must be a probability in [0, 1], got {getattr(cfg, k)}")
    for k in ("brightness", "contrast", "saturation"):
        _check(getattr(cfg, k) >= 0, f"{k} must be >= 0, got {getattr(cfg, k)}")
    _check(0 <= cfg.hue <= 0.5, f"hue must be in [0, 0.5], got {cfg.hue}")
    _check(len(cfg.ratio) == 2 and 0 < cfg.ratio[0] <= cfg.ratio[1],
           f"ratio must be [lo, hi] with 0 < lo <= hi, got {cfg.ratio}")
    _check(len(cfg.blur_sigma) == 2 and 0 < cfg.blur_sigma[0] <= cfg.blur_sigma[1],
           f"blur_sigma must be [lo, hi] with 0 < lo <= hi, got {cfg.blur_sigma}")
    _check(0 <= cfg.solarize_threshold <= 256, f"solarize_threshold must be in [0, 256], got {cfg.solarize_threshold}")
    _check(cfg.interpolation in INTERPOLATIONS,
           f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {cfg.interpolation!r}")
    _check(len(cfg.mean) == 3 and len(cfg.std) == 3 and all(s > 0 for s in cfg.std),
           f"mean and std must have 3 entries (RGB), std > 0; got {cfg.mean}, {cfg.std}")


# ---------------------------------------------------------------------------------------- parameters
@dataclass
class ViewParams:
    """Everything random about one view; ``box`` = (top, left, height, width) in original pixels."""
    box: tuple[int, int, int, int]
    jitter: tuple[tuple[int, ...], float | None, float | None, float | None, float | None] | None
    grayscale: bool
    blur_sigma: float | None
    solarize: bool
    flip: bool


def _range(strength: float, centre: float = 1.0) -> list[float] | None:
    if strength == 0:
        return None
    return [max(0.0, centre - strength), centre + strength] if centre else [-strength, strength]


# Uniform draws per view, taken from one ``torch.rand`` per image: 10 tries x 4 for the crop (area, log aspect
# ratio, top, left), the 5 coins (jitter, grayscale, blur, solarize, flip), 4 keys for the jitter order, the 4
# jitter factors and the blur sigma.
CROP_TRIES = 10
DRAWS_PER_VIEW = 4 * CROP_TRIES + 5 + 4 + 4 + 1


def random_resized_crop_box(u: Sequence[float], height: int, width: int, scale: Sequence[float],
                            ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) drawn as torchvision's ``RandomResizedCrop.get_params`` draws it (area ~ U(scale) x
    image area, log aspect ratio ~ U(log ratio), up to 10 tries, then its centre-crop fallback), from the
    ``4 x CROP_TRIES`` uniforms in [0, 1) of ``u`` instead of ~25 one-element tensors (0.15 ms per view)."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(0, 4 * CROP_TRIES, 4):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u[k])
        aspect = math.exp(lo + (hi - lo) * u[k + 1])
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:  # top, left uniform over the integer positions (torch.randint's)
            return int(u[k + 2] * (height - h + 1)), int(u[k + 3] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


# ------------------------------------------------------------------------------- operations (H x W x 3 uint8)
def _blend(x: np.ndarray, base: float, factor: float) -> np.ndarray:
    """PIL ``Image.blend(const, img, factor)`` = ``base + factor * (x - base)``, clipped and truncated like PIL.

    One SIMD pass (``addWeighted`` computes in float and rounds; the -0.4999 offset turns its rounding into PIL's
    truncation): the same values as PIL's table on all but ~1e-4 of the pixels (by one level, at float ties),
    at less than half the time of building a 256-entry table and applying it with ``cv2.LUT``.
    """
    return cv2.addWeighted(x, factor, x, 0.0, base * (1.0 - factor) - 0.4999)


def _gray(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(x, cv2.COLOR_RGB2GRAY)


def _brightness(x: np.ndarray, factor: float) -> np.ndarray:
    return _blend(x, 0.0, factor)


def _contrast(x: np.ndarray, factor: float) -> np.ndarray:
    mean = int(cv2.mean(_gray(x))[0] + 0.5)  # PIL ImageEnhance.Contrast: blend with the mean grey level
    return _blend(x, float(mean), factor)


def _saturation(x: np.ndarray, factor: float) -> np.ndarray:
    gray = cv2.cvtColor(_gray(x), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(x, factor, gray, 1.0 - factor, -0.5)  # gamma -0.5: OpenCV rounds, PIL's blend truncates


def _shift_hue(x: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's PIL ``adjust_hue``: rotate H by ``uint8(factor * 255)`` of 255ths of a turn.

    OpenCV's 8-bit HSV_FULL stores H in 256ths of a turn, hence the rescaled shift.
    """
    k = int(factor * 255)  # the reference adds np.uint8(factor * 255), i.e. this value mod 256
    shift = int(round(k * 256 / 255)) % 256
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(shift)  # uint8 arithmetic wraps around the hue circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def _grayscale(x: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(_gray(x), cv2.COLOR_GRAY2RGB)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(x, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)


def _lut(x: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(x, table)


def _hflip(x: np.ndarray) -> np.ndarray:
    return cv2.flip(x, 1)


JITTER_OPS = (("brightness", _brightness), ("contrast", _contrast), ("saturation", _saturation), ("hue", _shift_hue))
# The names of the per-op profile (``ViewTransform.profile``), in pipeline order.
OP_NAMES = ("sample", "decode", "crop+resize", *(name for name, _ in JITTER_OPS), "grayscale", "blur", "solarize",
            "flip", "to-tensor+normalise")


class _Clock:
    """Adds the seconds since the previous ``lap`` to ``timings[name]`` (the per-op profile); ``timings=None``:
    does nothing (the normal run)."""

    def __init__(self, timings: dict | None):
        self.timings = timings
        self.t = time.perf_counter() if timings is not None else 0.0

    def lap(self, name: str) -> None:
        if self.timings is not None:
            now = time.perf_counter()
            self.timings[name] = self.timings.get(name, 0.0) + now - self.t
            self.t = now


# The DCT-domain downscale of a draft decode is a sharper low-pass than the antialiased bicubic resize of the
# reference: with the resize left to do 1-2x, views were 5% (up to 17%) sharper or blurrier (std of the
# Laplacian) than from the full decode; with at least 4x left to the bicubic resize, within 1.5%
# (tests/pretrain/test_augment.py::test_reduced_scale_decode_keeps_the_sharpness_of_the_views).
DRAFT_MARGIN = 4


class ViewTransform:
    """``PIL.Image -> list[Tensor]``: the configured views of one image (see the module docstring)."""

    accepts_lazy_image = True  # RobustImageFolder hands over undecoded images (decoded here: torchvision or draft mode)

    def __init__(self, cfg: AugConfig):
        self.cfg = cfg
        self.views = list(cfg.views)
        self.sizes = [v.size for v in self.views]
        self.num_views = len(self.views)
        self._interp = INTERPOLATIONS[cfg.interpolation]
        self._jitter_ranges = (_range(cfg.brightness), _range(cfg.contrast), _range(cfg.saturation),
                               _range(cfg.hue, centre=0.0))
        self._jitter_on = any(r is not None for r in self._jitter_ranges)
        # uint8 level -> (level / 255 - mean) / std, one float32 table per channel (to_tensor's one pass)
        levels = np.arange(256, dtype=np.float64) / 255.0
        self._normalise_luts = [((levels - m) / s).astype(np.float32) for m, s in zip(cfg.mean, cfg.std)]
        t = int(cfg.solarize_threshold)
        self._solarize_lut = np.array([i if i < t else 255 - i for i in range(256)], dtype=np.uint8)

    def __repr__(self) -> str:
        return f"ViewTransform(sizes={self.sizes}, cfg={self.cfg})"

    # -- sampling: torchvision's distributions, same comparisons as its RandomApply/Random* ----------------
    def sample_params(self, width: int, height: int) -> list[ViewParams]:
        """The random parameters of every view, from one ``torch.rand`` draw (``DRAWS_PER_VIEW`` per view).

        The distributions are torchvision's: the crop box as ``RandomResizedCrop.get_params``
        (``random_resized_crop_box``), the jitter as ``ColorJitter.get_params`` (a uniformly random order of the
        four ops, factors uniform in their ranges), ``RandomApply`` / ``RandomGrayscale`` / ``RandomHorizontalFlip``
        as coins ``u < p``, the blur sigma uniform in ``blur_sigma``.
        """
        cfg, n = self.cfg, DRAWS_PER_VIEW
        u = torch.rand(n * self.num_views, dtype=torch.float64).tolist()
        out = []
        for k, v in enumerate(self.views):
            d = u[k * n:(k + 1) * n]
            box = random_resized_crop_box(d, height, width, (v.min_scale, v.max_scale), cfg.ratio)
            c = 4 * CROP_TRIES  # the coins, then the jitter order keys, the jitter factors, sigma
            jitter = None
            if self._jitter_on and d[c] < cfg.jitter_prob:
                order = tuple(sorted(range(4), key=d[c + 5:c + 9].__getitem__))  # a uniform permutation
                factors = tuple(None if r is None else r[0] + (r[1] - r[0]) * x
                                for r, x in zip(self._jitter_ranges, d[c + 9:c + 13]))
                jitter = (order, *factors)
            lo, hi = cfg.blur_sigma
            sigma = lo + (hi - lo) * d[c + 13] if d[c + 2] < v.blur_prob else None
            out.append(ViewParams(box=box, jitter=jitter, grayscale=d[c + 1] < cfg.grayscale_prob, blur_sigma=sigma,
                                  solarize=d[c + 3] < v.solarize_prob, flip=d[c + 4] < cfg.flip_prob))
        return out

    # -- decoding -------------------------------------------------------------------------------------
    def decode(self, img: Image.Image, params: Sequence[ViewParams]) -> np.ndarray:
        """H x W x 3 uint8 RGB array (writable) of ``img``.

        A JPEG is decoded at reduced scale (1/2, 1/4, 1/8: PIL draft mode) when every crop is still downscaled by
        ``DRAFT_MARGIN`` or more after it; at full scale by ``torchvision.io.decode_jpeg`` (libjpeg-turbo as in PIL,
        the same pixels, without PIL's image-to-array copy) when it can (``_decode_jpeg_full``). Anything else: PIL.
        """
        if self.cfg.fast_decode and getattr(img, "format", None) == "JPEG" and getattr(img, "tile", None):
            w0, h0 = img.size
            shrink = min(min(p.box[2], p.box[3]) / size for p, size in zip(params, self.sizes)) / DRAFT_MARGIN
            if shrink >= 2:  # PIL picks the largest DCT scale that keeps the image at least this size
                img.draft("RGB", (math.ceil(w0 / shrink), math.ceil(h0 / shrink)))
            else:
                hwc = _decode_jpeg_full(img)
                if hwc is not None:
                    return hwc
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.array(img)  # writable (torch refuses to wrap read-only memory)

    # -- application ----------------------------------------------------------------------------------
    def crop_resize(self, hwc: np.ndarray, box: tuple[int, int, int, int], size: int,
                    scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
        """The crop ``box`` (original pixels; ``scale`` maps them to this decode's) resized to ``size`` x ``size``."""
        top, left, h, w = _scale_box(box, scale, hwc.shape[0], hwc.shape[1])
        # Copy the crop out first: a contiguous H x W x 3 block is a channels-last tensor, which torch
        # resizes ~2x faster than a strided view and returns channels-last, i.e. already H x W x 3 for
        # OpenCV (no strided copy afterwards).
        crop = torch.from_numpy(np.ascontiguousarray(hwc[top:top + h, left:left + w])).permute(2, 0, 1)
        out = TF2.resize(crop, [size, size], interpolation=self._interp, antialias=True)
        x = out.permute(1, 2, 0).numpy()
        return x if x.flags.c_contiguous else np.ascontiguousarray(x)  # (1 x 1 crops and other degenerate shapes)

    def colour_ops(self, p: ViewParams) -> list[tuple[str, Callable[[np.ndarray], np.ndarray]]]:
        """The view's operations after crop + resize, in the reference order: (name, function of the
        H x W x 3 uint8 array)."""
        ops: list = []
        if p.jitter is not None:
            order, *factors = p.jitter
            for fn in order:
                if factors[fn] is not None:
                    name, op = JITTER_OPS[fn]
                    ops.append((name, partial(op, factor=factors[fn])))
        if p.grayscale:
            ops.append(("grayscale", _grayscale))
        if p.blur_sigma is not None:
            ops.append(("blur", partial(_blur, sigma=p.blur_sigma)))
        if p.solarize:
            ops.append(("solarize", partial(_lut, table=self._solarize_lut)))
        if p.flip:
            ops.append(("flip", _hflip))
        return ops

    def to_tensor(self, x: np.ndarray) -> torch.Tensor:
        """H x W x 3 uint8 -> 3 x H x W float32 ``(x / 255 - mean) / std``, contiguous: each uint8 plane goes
        through its channel's float table straight into the output (one pass; no float arithmetic)."""
        out = torch.empty((3, x.shape[0], x.shape[1]), dtype=torch.float32)
        planes = out.numpy()
        for c, plane in enumerate(cv2.split(x)):
            cv2.LUT(plane, self._normalise_luts[c], dst=planes[c])
        return out

    def apply(self, img: Image.Image | np.ndarray, p: ViewParams, size: int,
              scale: tuple[float, float] = (1.0, 1.0), clock: _Clock | None = None) -> torch.Tensor:
        """One view of a decoded RGB image (PIL or H x W x 3 uint8 array).

        ``scale`` maps original-pixel boxes to this image's pixels (after a reduced-scale decode).
        """
        clock = clock or _Clock(None)
        hwc = img if isinstance(img, np.ndarray) else np.array(img)
        x = self.crop_resize(hwc, p.box, size, scale)
        clock.lap("crop+resize")
        for name, op in self.colour_ops(p):
            x = op(x)
            clock.lap(name)
        out = self.to_tensor(x)
        clock.lap("to-tensor+normalise")
        return out

    def _run(self, img: Image.Image, clock: _Clock) -> list[torch.Tensor]:
        _single_threaded_opencv()
        width, height = img.size
        params = self.sample_params(width, height)
        clock.lap("sample")
        hwc = self.decode(img, params)
        clock.lap("decode")
        scale = (hwc.shape[1] / width, hwc.shape[0] / height)
        return [self.apply(hwc, p, size, scale, clock) for p, size in zip(params, self.sizes)]

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return self._run(img, _Clock(None))

    def profile(self, img: Image.Image, timings: dict[str, float]) -> list[torch.Tensor]:
        """``self(img)``, adding the seconds each operation took to ``timings[name]`` (names: ``OP_NAMES``);
        what ``python -m benchmarks --only pipeline`` reports as the per-op profile."""
        return self._run(img, _Clock(timings))


def _decode_jpeg_full(img: Image.Image) -> np.ndarray | None:
    """The full-scale RGB pixels of a lazily opened JPEG by ``torchvision.io.decode_jpeg``, as H x W x 3
    (a view of the decoded buffer), or None to let PIL decode it: no file to read, a file that does not end
    with the end-of-image marker (truncated: PIL reports it as unreadable, where libjpeg would fill in grey;
    trailing bytes after the marker also take PIL's path), or a JPEG torchvision cannot decode to RGB (CMYK)."""
    fp = getattr(img, "fp", None)
    if fp is None:
        return None
    try:
        fp.seek(0)
        data = bytearray(fp.read())
    except (OSError, ValueError, AttributeError):
        return None
    if data[-2:] != b"\xff\xd9":
        return None
    try:
        chw = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:
        return None
    if img.filename:  # opened from a path: the file is PIL's own, and no longer needed
        img.close()
    return np.ascontiguousarray(chw.permute(1, 2, 0).numpy())


_OPENCV_PID: int | None = None


def _single_threaded_opencv() -> None:
    """Once per process: OpenCV's own thread pool off. The pipeline's parallelism is the DataLoader
    workers; a pool per worker only oversubscribes the cores (torch does the same for itself in workers)."""
    global _OPENCV_PID
    if _OPENCV_PID != os.getpid():
        cv2.setNumThreads(1)
        _OPENCV_PID = os.getpid()


def _scale_box(box: tuple[int, int, int, int], scale: tuple[float, float], height: int, width: int):
    """A (top, left, h, w) box in original pixels -> the same region in a decode scaled by ``scale``."""
    if scale == (1.0, 1.0):
        return box
    top, left, h, w = box
    sx, sy = scale
    t, lft = int(round(top * sy)), int(round(left * sx))
    return t, lft, max(1, min(int(round(h * sy)), height - t)), max(1, min(int(round(w * sx)), width - lft))


def build_view_transform(cfg_aug: Any = None) -> ViewTransform:
    """The view pipeline for ``cfg_aug`` (dict / DictConfig / AugConfig / None = the paper's 2 views)."""
    return ViewTransform(aug_config_from(cfg_aug))
