"""The paper's view pipelines: 2 views (Table 4), 6-crop multi-crop (Table 5), 32-px CIFAR, synthetic.

``build_view_transform(cfg_aug)`` returns a callable ``PIL.Image -> list[Tensor]`` (one float tensor per
view, ``3 x size x size``, normalised with ``mean``/``std``, ImageNet's by default).

Every view applies, in the order of the reference code (github.com/winci-ai/INTL ``src/transform.py``):
random resized crop (bicubic) -> colour jitter (prob ``jitter_prob``, random order of brightness /
contrast / saturation / hue) -> grayscale (``grayscale_prob``) -> Gaussian blur (sigma ~ U(blur_sigma),
per-view ``blur_prob``) -> solarize (threshold 128, per-view ``solarize_prob``) -> horizontal flip.

How it is fast without changing what is sampled (measured by ``python -m benchmarks --only pipeline``):
- the random parameters come from torchvision's own samplers (``RandomResizedCrop.get_params``,
  ``ColorJitter.get_params``, ``torch.rand`` draws compared like torchvision's RandomApply/Random*),
  drawn for all views *before* decoding, so the image is decoded once and, when every crop will be
  downscaled by >= 2x, at reduced scale (PIL JPEG draft mode: DCT-domain downscaling);
- crop + resize: torchvision v2 ``resize`` (antialiased bicubic) of the crop as a channels-last uint8
  tensor, which reproduces PIL's resampling (mean difference < 0.01 grey levels) at 2-4x its speed;
- colour ops on uint8 arrays with OpenCV (look-up tables for brightness / contrast / solarize,
  ``cvtColor`` for grayscale and the HSV hue rotation, ``addWeighted``, ``GaussianBlur``) instead of
  PIL's HSV round trip, the costliest step of the reference (3 ms per 224-px view);
- uint8 -> normalised float32 plane by plane (contiguous) in one pass.
``tests/pretrain/test_augment.py`` checks each op against torchvision's PIL op with the same parameters, the
output statistics against the reference pipeline, and the sampled parameters against the spec.
Run it in DataLoader workers (one thread each, as torch sets them): in a process with several torch
threads, small resizes pay thread wake-ups, which is slow on a loaded machine.

Config keys (``AugConfig`` / ``ViewSpec``, defaults = the paper's 2-view ImageNet setting); a ``preset``
key (one of ``PRESETS``) starts from a named setting and the other keys override it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.v2.functional as TF2
from PIL import Image

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
    fast_decode: bool = True  # JPEG draft-mode decode at reduced scale when every crop allows it


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


class ViewTransform:
    """``PIL.Image -> list[Tensor]``: the configured views of one image (see the module docstring)."""

    accepts_lazy_image = True  # RobustImageFolder hands over undecoded images (for draft-mode decode)

    def __init__(self, cfg: AugConfig):
        self.cfg = cfg
        self.views = list(cfg.views)
        self.sizes = [v.size for v in self.views]
        self.num_views = len(self.views)
        self._interp = INTERPOLATIONS[cfg.interpolation]
        self._jitter_ranges = (_range(cfg.brightness), _range(cfg.contrast), _range(cfg.saturation),
                               _range(cfg.hue, centre=0.0))
        self._jitter_on = any(r is not None for r in self._jitter_ranges)
        self._mean255 = torch.tensor(cfg.mean, dtype=torch.float32).view(3, 1, 1) * 255.0
        self._inv_std255 = 1.0 / (torch.tensor(cfg.std, dtype=torch.float32).view(3, 1, 1) * 255.0)
        t = int(cfg.solarize_threshold)
        self._solarize_lut = np.array([i if i < t else 255 - i for i in range(256)], dtype=np.uint8)

    def __repr__(self) -> str:
        return f"ViewTransform(sizes={self.sizes}, cfg={self.cfg})"

    # -- sampling: torchvision's samplers, same comparisons as torchvision's RandomApply/Random* ----------
    def sample_params(self, width: int, height: int) -> list[ViewParams]:
        shape_only = torch.empty(1, 1, 1).expand(1, height, width)  # get_params only reads the size
        cfg = self.cfg
        out = []
        for v in self.views:
            box = T.RandomResizedCrop.get_params(shape_only, [v.min_scale, v.max_scale], list(cfg.ratio))
            u = torch.rand(5).tolist()
            jitter = None
            if self._jitter_on and u[0] < cfg.jitter_prob:
                fn_idx, b, c, s, h = T.ColorJitter.get_params(*self._jitter_ranges)
                jitter = (tuple(fn_idx.tolist()), b, c, s, h)
            sigma = None
            if u[2] < v.blur_prob:
                sigma = float(torch.empty(1).uniform_(cfg.blur_sigma[0], cfg.blur_sigma[1]))
            out.append(ViewParams(box=tuple(int(x) for x in box), jitter=jitter, grayscale=u[1] < cfg.grayscale_prob,
                                  blur_sigma=sigma, solarize=u[3] < v.solarize_prob, flip=u[4] < cfg.flip_prob))
        return out

    # -- decoding -------------------------------------------------------------------------------------
    def decode(self, img: Image.Image, params: Sequence[ViewParams]) -> Image.Image:
        """RGB image, decoded at the smallest JPEG scale (1, 1/2, 1/4, 1/8) that still downsamples every crop."""
        if self.cfg.fast_decode and getattr(img, "format", None) == "JPEG" and getattr(img, "tile", None):
            w0, h0 = img.size
            shrink = min(min(p.box[2], p.box[3]) / size for p, size in zip(params, self.sizes))
            if shrink >= 2:
                img.draft("RGB", (math.ceil(w0 / shrink), math.ceil(h0 / shrink)))
        if img.mode != "RGB":
            return img.convert("RGB")
        img.load()
        return img

    # -- application ----------------------------------------------------------------------------------
    def apply(self, img: Image.Image | np.ndarray, p: ViewParams, size: int,
              scale: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
        """One view of a decoded RGB image (PIL or H x W x 3 uint8 array).

        ``scale`` maps original-pixel boxes to this image's pixels (after a reduced-scale decode).
        """
        hwc = img if isinstance(img, np.ndarray) else np.array(img)
        top, left, h, w = _scale_box(p.box, scale, hwc.shape[0], hwc.shape[1])
        # Copy the crop out first: a contiguous H x W x 3 block is a channels-last tensor, which torch
        # resizes ~2x faster than a strided view and returns channels-last, i.e. already H x W x 3 for
        # OpenCV (no strided copy afterwards).
        crop = torch.from_numpy(np.ascontiguousarray(hwc[top:top + h, left:left + w])).permute(2, 0, 1)
        out = TF2.resize(crop, [size, size], interpolation=self._interp, antialias=True)
        x = out.permute(1, 2, 0).numpy()
        if not x.flags.c_contiguous:  # (1 x 1 crops and other degenerate shapes)
            x = np.ascontiguousarray(x)
        if p.jitter is not None:
            order, b, c, s, hue = p.jitter
            for fn in order:
                if fn == 0 and b is not None:
                    x = cv2.LUT(x, _blend_lut(0.0, b))
                elif fn == 1 and c is not None:
                    mean = int(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean() + 0.5)  # PIL ImageEnhance.Contrast
                    x = cv2.LUT(x, _blend_lut(float(mean), c))
                elif fn == 2 and s is not None:
                    gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
                    # gamma -0.5: OpenCV rounds, PIL's blend truncates
                    x = cv2.addWeighted(x, s, gray, 1.0 - s, -0.5)
                elif fn == 3 and hue is not None:
                    x = _shift_hue(x, hue)
        if p.grayscale:
            x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        if p.blur_sigma is not None:
            x = cv2.GaussianBlur(x, (0, 0), sigmaX=p.blur_sigma, sigmaY=p.blur_sigma, borderType=cv2.BORDER_REPLICATE)
        if p.solarize:
            x = cv2.LUT(x, self._solarize_lut)
        if p.flip:
            x = cv2.flip(x, 1)
        return self._normalise(x)

    def _normalise(self, x: np.ndarray) -> torch.Tensor:
        """H x W x 3 uint8 -> 3 x H x W float32 ``(x / 255 - mean) / std``, contiguous.

        Splitting the planes first keeps every step contiguous (a strided HWC->CHW float conversion is
        4x slower).
        """
        out = torch.empty((3, x.shape[0], x.shape[1]), dtype=torch.float32)
        for c, plane in enumerate(cv2.split(x)):
            out[c].copy_(torch.from_numpy(plane))
        return out.sub_(self._mean255).mul_(self._inv_std255)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        _single_threaded_opencv()
        width, height = img.size
        params = self.sample_params(width, height)
        img = self.decode(img, params)
        scale = (img.width / width, img.height / height)
        hwc = np.array(img)  # writable H x W x 3 uint8 (torch refuses to wrap read-only memory)
        return [self.apply(hwc, p, size, scale) for p, size in zip(params, self.sizes)]


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


def _blend_lut(base: float, factor: float) -> np.ndarray:
    """PIL ``Image.blend(const, img, factor)`` as a 256-entry table (PIL truncates after clipping)."""
    v = base + factor * (np.arange(256, dtype=np.float32) - base)
    return np.clip(v, 0, 255).astype(np.uint8)


def _shift_hue(x: np.ndarray, hue_factor: float) -> np.ndarray:
    """torchvision's PIL ``adjust_hue``: rotate H by ``uint8(hue_factor * 255)`` of 255ths of a turn.

    OpenCV's 8-bit HSV_FULL stores H in 256ths of a turn, hence the rescaled shift.
    """
    k = int(hue_factor * 255)  # the reference adds np.uint8(hue_factor * 255), i.e. this value mod 256
    shift = int(round(k * 256 / 255)) % 256
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(shift)  # uint8 arithmetic wraps around the hue circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def build_view_transform(cfg_aug: Any = None) -> ViewTransform:
    """The view pipeline for ``cfg_aug`` (dict / DictConfig / AugConfig / None = the paper's 2 views)."""
    return ViewTransform(aug_config_from(cfg_aug))
