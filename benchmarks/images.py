"""ImageNet-like JPEGs for the data-pipeline benchmark, generated deterministically (no downloads).

Sizes follow ImageNet's most common shapes (500 x 375, 375 x 500, 500 x 333, ...), the content is
photographic-like rather than flat colour (what matters for JPEG decode cost and for colour ops):
a 1/f ("pink") colour noise background (natural images have roughly 1/f^2 power spectra), a few
shaded ellipses and polygons with soft edges, mild sensor noise, saved at quality 90 with 4:2:0 chroma
subsampling like most camera / ImageNet JPEGs (~50-120 KB each).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (500, 375), (333, 500), (450, 350))


def _pink_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    out = np.empty((h, w, 3), np.float32)
    mix = rng.normal(0, 1, (3, 3)) * 0.4 + np.eye(3)  # correlated colour channels, as in photographs
    base = [np.fft.irfft2((rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f, s=(h, w))
            for _ in range(3)]
    for c in range(3):
        out[..., c] = sum(mix[c, k] * base[k] for k in range(3))
    out -= out.mean()
    out *= 45.0 / (out.std() + 1e-8)
    return out + rng.uniform(70, 180, size=3)


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    arr = np.clip(_pink_noise(rng, height, width), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    overlay = Image.new("RGB", (width, height))
    mask = Image.new("L", (width, height), 0)
    draw, mdraw = ImageDraw.Draw(overlay), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(3, 8))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.35) * min(width, height)
        if rng.random() < 0.5:
            box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5)]
            draw.ellipse(box, fill=colour)
            mdraw.ellipse(box, fill=int(rng.integers(120, 256)))
        else:
            k = int(rng.integers(3, 7))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in ang]
            draw.polygon(pts, fill=colour)
            mdraw.polygon(pts, fill=int(rng.integers(120, 256)))
    mask = mask.filter(ImageFilter.GaussianBlur(2.0))
    img = Image.composite(overlay, img, mask)
    noisy = np.asarray(img, np.float32) + rng.normal(0, 3.0, (height, width, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def write_imagenet_like(out: str | Path, n: int, seed: int = 0, quality: int = 90,
                        sizes=IMAGENET_LIKE_SIZES) -> list[Path]:
    """Writes ``n`` JPEGs into ``out`` (reused when already there with the same parameters)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"img_{seed}_{quality}_{i:05d}.jpg"
        if not path.exists():
            rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
            w, h = sizes[i % len(sizes)]
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # unique: concurrent runs share the cache
            photo_like(rng, w, h).save(tmp, "JPEG", quality=quality, subsampling="4:2:0")
            tmp.replace(path)
        paths.append(path)
    return paths
