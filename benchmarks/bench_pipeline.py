"""Data pipeline: images per second per core of the pretraining augmentation, from ImageNet-like JPEGs.

Baseline: the reference code's way (``benchmarks.baselines``: full-size PIL decode, torchvision v1 PIL
transforms, one Compose per view). Candidate: ``pretrain.augment.build_view_transform`` fed the way
``pretrain.data.RobustImageFolder`` feeds it (an opened, not yet decoded file). Same files, same
process, one thread (per-core numbers), variants interleaved. Cases: the paper's 2 views (Table 4) and
the 6-crop multi-crop (Table 5), at the paper's crop sizes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from benchmarks.baselines import pil_loader, reference_view_pipeline
from benchmarks.common import Row, interleaved
from benchmarks.images import write_imagenet_like
from pretrain.augment import build_view_transform

NAME = "pipeline"


def image_dir() -> Path:
    return Path(tempfile.gettempdir()) / "intl-bench-imagenet-like"


def _epoch(paths, fn):
    def run():
        for p in paths:
            fn(p)
    return run


def run(quick: bool = False, warmup: int = 1, repeats: int = 5, num_images: int = 64, log=print) -> list[Row]:
    if quick:
        num_images, sizes = 4, ((120, 90), (90, 120))
        cases = {"2-view": {"views": [{"size": 32}, {"size": 32, "blur_prob": 0.1, "solarize_prob": 0.2}]},
                 "6-crop": {"preset": "synthetic_multicrop"}}
    else:
        sizes = None
        cases = {"2-view 224": {"preset": "imagenet"}, "6-crop 2x224+192+160+128+96": {"preset": "imagenet_multicrop"}}
    out = image_dir() / ("quick" if quick else "full")
    kw = {"sizes": sizes} if sizes else {}
    paths = write_imagenet_like(out, num_images, **kw)
    avg_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    log(f"[pipeline] {len(paths)} JPEGs in {out} (avg {avg_kb:.0f} KB)")
    rows: list[Row] = []
    for case, cfg in cases.items():
        ref = reference_view_pipeline(cfg)
        fast = build_view_transform(cfg)
        fns = {
            "reference (PIL decode + torchvision v1 PIL ops)": _epoch(paths, lambda p: ref(pil_loader(p))),
            "pretrain.augment (lazy/draft decode, v2 uint8 resize, OpenCV colour)": _epoch(paths, lambda p: fast(Image.open(p))),
        }
        log(f"[pipeline] {case}: {len(fns)} variants x {repeats} repeats of {len(paths)} images")
        times = interleaved(fns, warmup, repeats, progress=lambda m: log(f"[pipeline] {case}: {m}"))
        base = next(iter(fns))
        for name, ts in times.items():
            rows.append(Row(NAME, case, name, "img/s/core", [len(paths) / t for t in ts],
                            baseline=None if name == base else base, higher_is_better=True,
                            extra={"images": len(paths), "avg_jpeg_kb": round(avg_kb, 1), "views": len(fast.sizes)}))
    return rows
